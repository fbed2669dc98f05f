"""scripts/gpu_fuzz.py --workers: the workers' reports merge into one (CPU; the fuzz itself
needs a GPU). Counts add up, failures are kept, a worker that wrote no report is a failure."""

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))

import gpu_fuzz  # noqa: E402


def worker_report(cases, failed, worst, by_kind):
    return dict(cases=cases, failures=len(failed), worst_ratio=worst[0]["ratio"],
                by_kind=by_kind, failed_cases=failed, worst_cases=worst)


def test_merge_adds_the_workers_up(tmp_path):
    bad = dict(index=3, ratio=float("inf"), where="exception", error="boom")
    reports = [
        worker_report(125, [], [dict(index=0, ratio=0.4, where="a")],
                      {"dense/float16": dict(cases=100, failures=0),
                       "varlen/bfloat16": dict(cases=25, failures=0)}),
        worker_report(120, [bad], [bad, dict(index=1, ratio=0.7, where="b")],
                      {"dense/float16": dict(cases=120, failures=1)}),
    ]
    for i, r in enumerate(reports):
        text = json.dumps(r, default=str).replace("Infinity", '"inf"')  # as the workers write
        (tmp_path / f"worker_{i}.json").write_text(text)
    (tmp_path / "worker_2.log").write_text("Traceback ...\nRuntimeError: CUDA error\n")
    cases, failures, candidates, by_kind = gpu_fuzz.merge(
        [tmp_path / f"worker_{i}" for i in range(3)])
    assert cases == 245
    assert [f.get("index", f.get("worker")) for f in failures] == [3, "worker_2"]
    assert failures[0]["ratio"] == float("inf") and "CUDA error" in failures[1]["error"]
    assert sorted(c["ratio"] for c in candidates) == [0.4, 0.7, float("inf")]
    assert by_kind == {"dense/float16": dict(cases=220, failures=1),
                       "varlen/bfloat16": dict(cases=25, failures=0)}
