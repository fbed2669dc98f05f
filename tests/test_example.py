"""examples/train_gpt.py: its tiny configuration, a few steps with each attention, compared.

The two runs share the seed, the initial weights and the batches, and both compute in float32:
the attention kernel is the only difference, so the loss curves agree to rounding. Measured on
the CPU (Triton interpreter), over 8 steps and 16 seeds: at most 1.5e-7 relative between the two
losses of a step, one or two float32 ulps. AdamW carries the rounding into the weights (they
differ by about 1e-6 after one step, 4e-6 after eight, 3e-5 after 24), so the gap grows with the
step count: one 30-step run had a single step at 2.4e-5, from one sensitive token. RTOL is for
8 steps, over 100x the largest difference seen there. A faulty attention stays above it even
this early, when the freshly initialised model barely uses attention (largest relative
difference over 8 steps, one seed): no causal mask 1.2e-3, the diagonal shifted by one 3.5e-4,
softmax scale 1 instead of 1/sqrt(D) 1.6e-4.
"""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
from conftest import SEED

from flashtile.testing import device

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "train_gpt.py"
STEPS = 8  # about 12 s through the interpreter, most of it flashtile's backward
RTOL = 2e-5


def _load_example():
    spec = importlib.util.spec_from_file_location("train_gpt", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while the class is made
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """main() end to end, once for the module: both attentions, float32 also on a GPU."""
    out = tmp_path_factory.mktemp("train_gpt")
    argv = ["--tiny", "--attention", "both", "--steps", str(STEPS), "--eval-batches", "1",
            "--dtype", "float32", "--device", str(device()), "--seed", str(SEED),
            "--no-progress", "--out", str(out)]
    assert _load_example().main(argv) == 0
    return json.loads((out / "results.json").read_text()), out


def _relative_diffs(a: list[float], b: list[float]) -> list[float]:
    return [abs(x - y) / abs(y) for x, y in zip(a, b, strict=True)]


def test_loss_curves_agree(run):
    report, _ = run
    flash, sdpa = report["runs"]["flashtile"], report["runs"]["sdpa"]
    assert len(flash["losses"]) == len(sdpa["losses"]) == STEPS
    rel = _relative_diffs(flash["losses"], sdpa["losses"])
    worst = max(range(STEPS), key=rel.__getitem__)
    assert rel[worst] <= RTOL, (
        f"loss curves differ by {rel[worst]:.3g} relative at step {worst + 1} "
        f"(flashtile {flash['losses'][worst]!r}, sdpa {sdpa['losses'][worst]!r}; "
        f"mean {sum(rel) / STEPS:.3g}, tolerance {RTOL:g}); seed {SEED}")
    val_rel = _relative_diffs([flash["val_loss"]], [sdpa["val_loss"]])[0]
    assert val_rel <= RTOL, (f"val losses {flash['val_loss']!r} and {sdpa['val_loss']!r} differ "
                             f"by {val_rel:.3g} relative; seed {SEED}")
    assert report["comparison"]["max_rel_diff"] == pytest.approx(max(rel))


def test_loss_decreases(run):
    # Over 40 seeds the first loss lay within 0.03 of ln(vocab), the uniform guess of a fresh
    # model, and 8 steps took at least 0.66 off it (the last two steps' worse one).
    report, _ = run
    for attention, r in report["runs"].items():
        losses = r["losses"]
        uniform = math.log(report["data"]["vocab_size"])
        assert abs(losses[0] - uniform) < 0.1, (
            f"{attention}: first loss {losses[0]:.4f}, expected about ln(vocab) = {uniform:.4f}")
        assert max(losses[-2:]) < losses[0] - 0.4, (
            f"{attention}: loss went from {losses[0]:.4f} to {losses[-2:]} in {STEPS} steps; "
            f"seed {SEED}")


def test_reports_written(run):
    report, out = run
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert report["config"]["steps"] == STEPS and report["config"]["dtype"] == "float32"
    for r in report["runs"].values():
        assert r["tokens_per_s"] > 0
        assert (r["peak_memory_bytes"] is None) == (device().type == "cpu")
