"""`flashtile bench` on the CPU: everything but the timings, which need a GPU.

The FLOP count, the shape grid, the harness (check before timing, skips and failures) with a
stand-in for do_bench, the reports from made-up results, and the exit status without a GPU.
"""

import json

import pytest
import torch

from flashtile.bench import measure
from flashtile.bench.measure import Result, Shape, attention_flops, measure_provider
from flashtile.bench.providers import Unavailable, naive
from flashtile.bench.report import notes, tflops_table, write_reports
from flashtile.bench.run import PRESETS, main, shape_grid
from flashtile.cli import main as cli_main

# --------------------------------------------------------------------------------------------
# The FLOP formula: 4·B·H·N²·D forward, halved when causal; bwd 2.5×, fwdbwd 3.5×.


@pytest.mark.parametrize("shape, mode, flops", [
    (Shape(128, False, 1024, 16, 16), "fwd", 2**37),  # 4 · 16 · 16 · 2^20 · 128
    (Shape(128, True, 1024, 16, 16), "fwd", 2**36),
    (Shape(128, False, 1024, 16, 16), "bwd", 343_597_383_680),  # 2.5 · 2^37
    (Shape(128, True, 1024, 16, 16), "fwdbwd", 240_518_168_576),  # 3.5 · 2^36
    (Shape(64, True, 512, 32, 32), "fwd", 2**35),
    (Shape(96, False, 1000, 3, 5), "fwd", 5_760_000_000),  # 4 · 3 · 5 · 10^6 · 96
    (Shape(96, False, 1000, 3, 5), "bwd", 14_400_000_000),
    (Shape(96, True, 1000, 3, 5), "fwdbwd", 10_080_000_000),
])
def test_attention_flops(shape, mode, flops):
    assert attention_flops(shape, mode) == flops


# --------------------------------------------------------------------------------------------
# Shapes


def test_full_grid_holds_16k_tokens_of_width_2048():
    full = PRESETS["full"]
    shapes = shape_grid(list(full.dims), list(full.seqlens))
    assert len(shapes) == 2 * 2 * 6
    assert [s.seqlen for s in shapes[:6]] == [512, 1024, 2048, 4096, 8192, 16384]
    assert [(s.head_dim, s.causal) for s in shapes[::6]] == [
        (64, False), (64, True), (128, False), (128, True)]
    for s in shapes:
        assert s.batch * s.seqlen == 16384
        assert s.heads == 2048 // s.head_dim and s.heads * s.head_dim == 2048
    assert (shapes[0].batch, shapes[0].heads) == (32, 32)
    assert (shapes[-1].batch, shapes[-1].heads) == (1, 16)


def test_long_grid_is_one_sequence_of_16_heads():
    long = PRESETS["long"]
    shapes = shape_grid(list(long.dims), list(long.seqlens), long.batch, long.heads)
    assert [(s.seqlen, s.causal) for s in shapes] == [
        (32768, False), (65536, False), (131072, False),
        (32768, True), (65536, True), (131072, True)]
    assert {(s.batch, s.heads, s.head_dim) for s in shapes} == {(1, 16, 128)}


# --------------------------------------------------------------------------------------------
# The harness, with do_bench replaced: a correct provider is timed, a wrong one is not.


@pytest.fixture
def fake_timer(monkeypatch):
    calls = []

    def do_bench(fn, warmup, rep, grad_to_none, return_mode):
        calls.append(return_mode)
        fn()
        return 2.0  # ms

    monkeypatch.setattr(measure, "do_bench", do_bench)
    monkeypatch.setattr(measure, "peak_memory_mib", lambda forward, dout, leaves: 12.5)
    return calls


def _run(factory, shape, modes=("fwd", "bwd")):
    size = (shape.batch, shape.heads, shape.seqlen, shape.head_dim)
    q, k, v = (torch.randn(size, requires_grad=True) for _ in range(3))
    lines = []
    results = measure_provider("p", factory, shape, q, k, v, torch.randn(size), list(modes),
                               warmup_ms=1, rep_ms=1, log=lines.append)
    return results, lines


def test_harness_checks_then_times(fake_timer):
    shape = Shape(16, True, 64, 2, 3)
    results, lines = _run(naive, shape)
    assert fake_timer == ["median", "median"]
    assert [(r.mode, r.status, r.ms, r.peak_mib) for r in results] == [
        ("fwd", "ok", 2.0, 12.5), ("bwd", "ok", 2.0, 12.5)]
    assert results[0].tflops == pytest.approx(attention_flops(shape, "fwd") / 2e-3 / 1e12)
    assert results[1].tflops == pytest.approx(2.5 * results[0].tflops)
    assert results[0].check_err <= results[0].check_tol
    assert "check ok" in lines[0] and len(lines) == 4


def test_harness_never_times_a_wrong_or_broken_provider(fake_timer):
    shape = Shape(16, True, 64, 2, 3)

    def wrong(q, k, v, causal):
        return naive(q, k, v, not causal)

    def broken(q, k, v, causal):
        raise RuntimeError("no kernel for this shape\nmore detail")

    def absent(q, k, v, causal):
        raise Unavailable("not installed")

    results, lines = _run(wrong, shape)
    assert [r.status for r in results] == ["failed", "failed"]
    assert results[0].check_err > results[0].check_tol and "tolerance" in results[0].note
    results, _ = _run(broken, shape)
    assert [r.note for r in results] == ["does not run: RuntimeError: no kernel for this shape"] * 2
    results, _ = _run(absent, shape)
    assert [(r.status, r.note) for r in results] == [("skipped", "not installed")] * 2
    assert fake_timer == []


# --------------------------------------------------------------------------------------------
# Reports from made-up results

A = Shape(128, False, 4096, 4, 16)
B = Shape(128, True, 8192, 2, 16)
META = {"gpu": "Test GPU 80GB", "driver": "580.1", "torch": "2.13", "cuda": "13.0",
        "triton": "3.6.0", "cudnn": 91900, "flashtile": "0.1.0", "commit": "abc1234",
        "date": "2026-01-01T00:00:00+00:00", "command": "flashtile bench", "dtype": "bfloat16",
        "warmup_ms": 50, "rep_ms": 200,
        "ceilings": {"matmul_bf16_tflops": 781.4, "copy_gbps": 2987.6}}


def _ok(shape, provider, mode, tflops, peak=None):
    ms = attention_flops(shape, mode) / (tflops * 1e9)
    return Result(shape, provider, mode, "ok", ms=ms, tflops=tflops, peak_mib=peak)


def _fake_results():
    return [
        _ok(A, "flashtile", "fwd", 300.0, 100.0), _ok(A, "flashtile", "bwd", 250.0, 100.0),
        _ok(A, "sdpa-cudnn", "fwd", 600.0, 80.0), _ok(A, "sdpa-cudnn", "bwd", 500.0, 80.0),
        _ok(A, "flex", "fwd", 150.0, 90.0),
        Result(A, "flex", "bwd", "error", note="OutOfMemoryError: CUDA out of memory"),
        Result(A, "fa4", "fwd", "skipped", note="flash_attn.cute does not import"),
        Result(A, "fa4", "bwd", "skipped", note="flash_attn.cute does not import"),
        _ok(B, "flashtile", "fwd", 45.3), _ok(B, "flashtile", "bwd", 40.0),
        _ok(B, "sdpa-cudnn", "fwd", 90.6), _ok(B, "sdpa-cudnn", "bwd", 160.0),
        Result(B, "flex", "fwd", "failed", note="out: max |diff| 1e-1 > tolerance 1e-2"),
        Result(B, "flex", "bwd", "failed", note="out: max |diff| 1e-1 > tolerance 1e-2"),
        Result(B, "fa4", "fwd", "skipped", note="flash_attn.cute does not import"),
        Result(B, "fa4", "bwd", "skipped", note="flash_attn.cute does not import"),
    ]


def _cells(table: str) -> list[list[str]]:
    return [[c.strip() for c in line.strip("|").split("|")] for line in table.splitlines()]


def test_tflops_table_has_numbers_and_ratios():
    rows = _cells(tflops_table(_fake_results()))
    # fa4 was skipped everywhere: no column for it, only a note.
    assert rows[0] == ["D", "causal", "N", "B", "H", "mode", "flashtile", "sdpa-cudnn", "flex",
                       "÷ sdpa-cudnn", "÷ flex"]
    assert rows[2:] == [
        ["128", "0", "4096", "4", "16", "fwd", "300", "600", "150", "0.50", "2.00"],
        ["128", "0", "4096", "4", "16", "bwd", "250", "500", "err", "0.50", "-"],
        ["128", "1", "8192", "2", "16", "fwd", "45.3", "90.6", "FAIL", "0.50", "-"],
        ["128", "1", "8192", "2", "16", "bwd", "40.0", "160", "FAIL", "0.25", "-"],
    ]


def test_notes_say_what_was_not_measured_and_where():
    assert notes(_fake_results()) == [
        "- flex error at D=128 causal=0 N=4096 B=4 H=16 bwd: OutOfMemoryError: CUDA out of "
        "memory",
        "- fa4 skipped at every shape: flash_attn.cute does not import",
        "- flex failed at D=128 causal=1 N=8192 B=2 H=16: out: max |diff| 1e-1 > tolerance 1e-2",
    ]


def test_reports_are_written(tmp_path):
    results = _fake_results()
    write_reports(tmp_path / "out", results, META)

    md = (tmp_path / "out" / "bench.md").read_text()
    for fact in ("Test GPU 80GB, driver 580.1", "cuDNN 91900", "commit abc1234",
                 "bf16 matmul 8192³ 781 TFLOP/s", "device copy 2988 GB/s",
                 tflops_table(results), "fa4 skipped at every shape"):
        assert fact in md
    memory = _cells(md.split("(MiB)\n\n")[1].split("\n\n")[0])
    assert memory[0] == ["D", "causal", "N", "B", "H", "flashtile", "sdpa-cudnn", "flex"]
    assert memory[2:] == [["128", "0", "4096", "4", "16", "100", "80", "90"],
                          ["128", "1", "8192", "2", "16", "-", "-", "-"]]

    data = json.loads((tmp_path / "out" / "bench.json").read_text())
    assert data["metadata"] == META
    assert len(data["results"]) == len(results)
    first = data["results"][0]
    assert (first["shape"], first["provider"], first["mode"], first["tflops"]) == (
        {"head_dim": 128, "causal": False, "seqlen": 4096, "batch": 4, "heads": 16},
        "flashtile", "fwd", 300.0)
    assert first["ms"] == pytest.approx(attention_flops(A, "fwd") / 300e9)

    png = (tmp_path / "out" / "bench.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000


# --------------------------------------------------------------------------------------------
# No GPU: a clear message and exit status 2, from the module and from the command line.


def test_without_gpu_bench_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--quick"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert cli_main(["bench"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_bad_arguments_are_refused(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--modes", "fwd,sideways"])
    assert exit_.value.code == 2
    assert "unknown sideways" in capsys.readouterr().err
