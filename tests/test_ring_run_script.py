"""scripts/ring_run.py, issue 9's multi-GPU run, checked on the CPU: two gloo ranks under
torchrun (Triton's interpreter, float32, 48 and 96 tokens) run every part of it. The ring's
results unsharded must pass FlashAttention's rule against the float64 reference and against
flash_attn_func on the whole sequence; every timing must be a positive number; the report must
say NVLink multicast was off."""

import json
import os
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "ring_run.py"


def test_ring_run_on_two_cpu_ranks(tmp_path):
    env = {**os.environ, "TRITON_INTERPRET": "1", "NCCL_NVLS_ENABLE": "1"}  # the script sets 0
    run = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
         str(SCRIPT), "--cpu", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp_path / "ring_run.json").read_text())
    assert report["world_size"] == 2 and "NCCL_NVLS_ENABLE=0" in report["setup"]
    assert len(report["correctness"]) == 4
    for case in report["correctness"]:
        assert case["passed"], case
        for field in ("out", "dq", "dk", "dv"):
            assert 0 < case[field]["vs_reference"] <= 1, (case, field)
            assert 0 <= case[field]["vs_one_device"] <= 1, (case, field)
    assert [(r["tokens"], r["causal"]) for r in report["throughput"]] == [(96, False),
                                                                         (96, True)]
    for row in report["throughput"]:
        for mode in ("fwd", "fwd_bwd"):
            assert row[f"ring_{mode}_TFLOPs_per_gpu"] > 0
            assert row[f"one_gpu_{mode}_TFLOPs"] > 0  # 96 tokens fit on one device
    for row in report["steps"]:
        assert row["per_gpu"] == 48
        for mode in ("fwd", "bwd"):
            m = row[mode]
            assert m["step"] > 0 and m["kernel"] > 0 and m["transfer"] > 0
            assert m["overlap"] is None or 0 <= m["overlap"] <= 1
            # K and V of 48 tokens, 1 head, D 16, float32; the backward adds dK, dV (float32)
            kv_bytes = 2 * 48 * 16 * 4
            assert m["bytes"] == (2 * kv_bytes if mode == "bwd" else kv_bytes)
            assert m["model"]["step"] >= m["model"]["transfer"] > 0
    assert report["step_latency_s"] > 0
    assert "## One ring step" in (tmp_path / "ring_run.md").read_text()
