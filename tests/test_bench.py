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


# --------------------------------------------------------------------------------------------
# --features (bench/features.py): issue 4's cases. Everything but the GPU timings: the cases,
# their masks and FLOPs, the harness with a stand-in timer, and the reports from made-up times.

from flashtile.bench import features  # noqa: E402
from flashtile.bench.features import (  # noqa: E402
    Case,
    FeatureResult,
    check_case,
    document_ids,
    feature_cases,
    measure_feature,
    speedups,
    write_feature_reports,
)
from flashtile.bench.run import parse_args  # noqa: E402
from flashtile.reference import attention_naive, keep_mask  # noqa: E402


def test_features_is_a_preset_beside_quick_and_long(capsys):
    args = parse_args(["--features"])
    assert args.features and not args.quick and not args.long
    assert not parse_args(["--quick"]).features
    args = parse_args(["--features", "--modes", "fwd", "--providers", "flex", "--seqlens", "4k"])
    assert (args.modes, args.providers, args.seqlens) == (["fwd"], ["flex"], [4096])
    with pytest.raises(SystemExit):
        parse_args(["--features", "--long"])
    assert "not allowed with argument" in capsys.readouterr().err
    preset = PRESETS["features"]
    assert (preset.dims, preset.seqlens, preset.batch, preset.heads) == ((128,), (16384,), 1, 16)
    assert preset.providers == ("flashtile", "flex") and preset.modes == ("fwd", "bwd", "fwdbwd")


def test_features_without_gpu_exits_2(monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main(["--features"]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err


def test_feature_cases_of_issue_4():
    full, window, gqa, document = feature_cases()
    assert [c.name for c in (full, window, gqa, document)] == ["full", "window", "gqa",
                                                               "document"]
    for c in (full, window, gqa, document):
        assert (c.batch, c.heads, c.seqlen, c.head_dim) == (1, 16, 16384, 128)
    assert (full.kv_heads, window.kv_heads, gqa.kv_heads, document.kv_heads) == (16, 16, 2, 16)
    assert (window.window, document.documents) == (1024, 8)
    assert full.pairs() == gqa.pairs() == 16384**2
    assert window.pairs() == 1024 * 16384 - 1024 * 1023 // 2
    assert document.pairs() == 8 * 2048**2
    assert full.flops("fwd") == 4 * 16 * 16384**2 * 128
    assert document.flops("bwd") == 2.5 * full.flops("fwd") / 8
    assert "window_size=(1023, 0)" in window.describe()
    with pytest.raises(ValueError, match="multiple of 8 documents"):
        feature_cases(seqlen=1001)


def test_document_ids_are_8_runs_of_2048():
    ids = document_ids(16384, 8)
    assert ids.dtype == torch.int32 and ids.shape == (16384,)
    assert torch.equal(ids.bincount(), torch.full((8,), 2048))
    assert ids[0] == 0 and ids[2047] == 0 and ids[2048] == 1 and ids[-1] == 7
    assert bool((ids[1:] >= ids[:-1]).all())
    with pytest.raises(ValueError):
        document_ids(100, 8)


def test_checked_rows_and_heads():
    assert features.check_slices(16384) == [(0, 2560), (13824, 16384)]  # cross 2048, 14336
    assert features.check_slices(2000) == [(0, 2000)]
    assert features.check_heads(16) == [0, 1, 15] and features.check_heads(1) == [0]
    # absolute below 1, relative above: one bf16 ulp at 4 (2^-5) passes, 0.03 at 0.5 does not
    ref = torch.tensor([0.5, 4.0])
    assert features.output_diff(ref + torch.tensor([0.0, 2**-5]), ref) == 2**-7
    assert features.output_diff(ref + torch.tensor([0.03, 0.0]), ref) > features.MAX_DIFF


def _flex_keep(mask_mod, n):
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    return mask_mod(0, 0, i, j).expand(n, n)


def test_flex_masks_are_flashtiles():
    """Flex's window predicate is FlashAttention's window_size=(w - 1, 0); both predicates keep
    exactly Case.pairs() pairs."""
    n = 256
    window = Case("window", n, 16, window=64)
    keep = _flex_keep(features.window_mask_mod(64), n)
    assert torch.equal(keep, keep_mask(n, n, causal=False, window_size=(63, 0)))
    assert int(keep.sum()) == window.pairs()
    doc = Case("document", n, 16, documents=4)
    ids = document_ids(n, 4)
    keep = _flex_keep(features.document_mask_mod(ids), n)
    assert torch.equal(keep, ids[:, None] == ids[None, :]) and int(keep.sum()) == doc.pairs()


def _naive_features(case, q, k, v, doc_ids):
    """A stand-in for a provider, on the CPU: attention_naive with each case's mask."""
    kwargs = {"window_size": (case.window - 1, 0)} if case.window is not None else {}
    if case.documents is not None:
        kwargs["mask"] = doc_ids[:, None] == doc_ids[None, :]
    return lambda: attention_naive(q, k, v, **kwargs)[0]


SMALL = feature_cases(seqlen=256, head_dim=16, heads=4, window=64, kv_heads=2, documents=4)


@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_feature_harness_checks_then_times(monkeypatch, case):
    monkeypatch.setattr(features, "CHECK_ROWS", 96)  # two slices of rows: 0:96, 160:256
    def do_bench(fn, warmup, rep, grad_to_none, return_mode):
        fn()
        return 2.0

    monkeypatch.setattr(measure, "do_bench", do_bench)
    q, k, v, dout = features.case_inputs(case, torch.float32, "cpu")
    doc_ids = document_ids(case.seqlen, case.documents) if case.documents else None
    lines = []
    results, out = measure_feature(case, "p", _naive_features, q, k, v, dout, doc_ids,
                                   ["fwd", "bwd"], 1, 1, log=lines.append)
    assert [(r.mode, r.status, r.ms) for r in results] == [("fwd", "ok", 2.0), ("bwd", "ok", 2.0)]
    assert results[0].tflops == pytest.approx(case.flops("fwd") / 2e-3 / 1e12)
    assert results[0].check_err <= results[0].check_tol and results[0].diff is None
    assert out.shape == q.shape and "check ok" in lines[0]
    # A provider whose output differs from flashtile's fails and is never timed.
    results, _ = measure_feature(case, "q", _naive_features, q, k, v, dout, doc_ids, ["fwd"], 1,
                                 1, compare_to=out + 0.1, log=lines.append)
    assert results[0].status == "failed" and "flashtile's out" in results[0].note
    # So does one that ignores the mask, or that pairs query head h with kv head h % H_kv.
    def wrong(c, q, k, v, doc_ids):
        if c.kv_heads != c.heads:
            k, v = (t.repeat(1, c.heads // c.kv_heads, 1, 1) for t in (k, v))
        return _naive_features(Case("full", c.seqlen, c.head_dim, c.heads, c.heads), q, k, v,
                               doc_ids)

    if case.name != "full":
        results, _ = measure_feature(case, "r", wrong, q, k, v, dout, doc_ids, ["fwd"], 1, 1,
                                     log=lines.append)
        assert results[0].status == "failed" and "tolerance" in results[0].note


@pytest.mark.filterwarnings("ignore:flex_attention called without torch.compile")
@pytest.mark.parametrize("case", SMALL, ids=lambda c: c.name)
def test_flex_provider_agrees_with_the_reference_on_cpu(monkeypatch, case):
    """Flex's masks and enable_gqa, through eager flex_attention (forward only on the CPU)."""
    from torch.nn.attention.flex_attention import flex_attention

    monkeypatch.setattr(features, "_compiled_flex", lambda: flex_attention)
    monkeypatch.setattr(features, "CHECK_ROWS", 96)
    q, k, v, _ = (t.detach() for t in features.case_inputs(case, torch.float32, "cpu"))
    doc_ids = document_ids(case.seqlen, case.documents) if case.documents else None
    out = features.flex_features(case, q, k, v, doc_ids)()
    err, tol, message = check_case(case, out, q, k, v, doc_ids)
    assert message == "" and err <= tol


FULL, WINDOW, GQA, DOC = feature_cases()


def _fr(case, provider, mode, ms):
    return FeatureResult(case, provider, mode, "ok", ms=ms,
                         tflops=case.flops(mode) / (ms * 1e-3) / 1e12, check_err=1e-3,
                         check_tol=4e-3, diff=None if provider == "flashtile" else 5e-4)


def _fake_feature_results():
    times = {  # (flashtile, flex) ms for fwd, bwd
        FULL: ((10.0, 12.0), (30.0, 40.0)), WINDOW: ((1.6, 2.0), (7.5, 8.0)),
        GQA: ((9.0, 11.0), (32.0, 36.0)), DOC: ((2.0, 3.0), (6.0, 8.0))}
    results = []
    for case, ((ft_fwd, fx_fwd), (ft_bwd, fx_bwd)) in times.items():
        results += [_fr(case, "flashtile", "fwd", ft_fwd), _fr(case, "flashtile", "bwd", ft_bwd)]
        if case is DOC:
            results += [FeatureResult(case, "flex", m, "failed", check_err=0.5, check_tol=4e-3,
                                      diff=0.5, note="out rows 0:2560: max |diff| too big")
                        for m in ("fwd", "bwd")]
        else:
            results += [_fr(case, "flex", "fwd", fx_fwd), _fr(case, "flex", "bwd", fx_bwd)]
    return results


def test_feature_speedups_and_targets():
    found = {(s["case"], s["provider"], s["mode"]): s for s in speedups(_fake_feature_results())}
    assert found["window", "flashtile", "fwd"]["speedup"] == pytest.approx(6.25)
    assert found["window", "flashtile", "fwd"]["met"] is True
    assert found["window", "flashtile", "bwd"]["speedup"] == pytest.approx(4.0)
    assert found["window", "flashtile", "bwd"]["met"] is False
    assert found["window", "flex", "fwd"]["met"] is None  # the targets are flashtile's
    assert found["gqa", "flashtile", "fwd"]["met"] and not found["gqa", "flashtile", "bwd"]["met"]
    assert found["document", "flashtile", "fwd"]["speedup"] == pytest.approx(5.0)
    assert ("document", "flex", "fwd") not in found  # flex failed there
    assert len(found) == 10


def test_feature_reports_are_written(tmp_path):
    results = _fake_feature_results()
    write_feature_reports(tmp_path, results, META)
    md = (tmp_path / "features.md").read_text()
    times = _cells(md.split("## Times (median ms)\n\n")[1].split("\n\n")[1])
    assert times[0] == ["case", "N", "D", "mode", "flashtile ms", "flex ms",
                        "flashtile µs/q-head", "flex µs/q-head", "flashtile ÷ flex",
                        "flashtile TFLOP/s", "flex TFLOP/s"]
    assert times[2][:9] == ["full", "16384", "128", "fwd", "10.000", "12.000", "625.0",
                            "750.0", "1.20"]
    assert times[2][9] == f"{FULL.flops('fwd') / 1e-2 / 1e12:.0f}"
    assert times[-1][:9] == ["document", "16384", "128", "bwd", "6.000", "FAIL", "375.0",
                             "FAIL", "-"]
    table = md.split("## Speedup over full attention of the same provider\n\n")[1]
    rows = _cells(table.split("\n\n")[1])
    assert rows[0] == ["case", "N", "D", "mode", "flashtile", "flex", "target",
                       "flashtile meets"]
    assert rows[2:] == [
        ["window", "16384", "128", "fwd", "6.25", "6.00", ">= 5", "yes"],
        ["window", "16384", "128", "bwd", "4.00", "5.00", ">= 5", "NO"],
        ["gqa", "16384", "128", "fwd", "1.11", "1.09", ">= 1", "yes"],
        ["gqa", "16384", "128", "bwd", "0.94", "1.11", ">= 1", "NO"],
        ["document", "16384", "128", "fwd", "5.00", "-", ">= 4", "yes"],
        ["document", "16384", "128", "bwd", "5.00", "-", ">= 4", "yes"],
    ]
    assert "- flex failed at document N=16384 D=128: out rows 0:2560" in md
    checks = _cells(md.split("## Checks before timing\n\n")[1].split("\n\n")[1])
    assert checks[0] == ["case", "N", "D", "provider", "max err vs float64", "tolerance",
                         "max diff to flashtile", "check"]
    assert checks[2] == ["full", "16384", "128", "flashtile", "1.00e-03", "4.00e-03", "-", "ok"]
    assert checks[-1] == ["document", "16384", "128", "flex", "5.00e-01", "4.00e-03",
                          "5.00e-01", "FAIL"]
    assert "TFLOP/s = 4·B·H·pairs·D / time" in md and "N²·D" not in md
    assert "Test GPU 80GB, driver 580.1" in md

    data = json.loads((tmp_path / "features.json").read_text())
    assert data["metadata"] == META and data["targets"] == features.TARGETS
    assert [c["name"] for c in data["cases"]] == ["full", "window", "gqa", "document"]
    assert data["cases"][3]["pairs"] == 8 * 2048**2 and data["cases"][2]["kv_heads"] == 2
    assert len(data["results"]) == 16 and data["results"][0]["ms"] == 10.0
    assert data["results"][0]["case"]["name"] == "full"
    assert {(s["case"], s["mode"]) for s in data["speedups"] if s["provider"] == "flashtile"} == {
        (c, m) for c in ("window", "gqa", "document") for m in ("fwd", "bwd")}


def test_run_features_walks_every_case_and_writes_reports(monkeypatch, tmp_path):
    """run_features's loop on the CPU, with attention_naive standing in for both providers."""
    from flashtile.bench.run import Preset

    def do_bench(fn, warmup, rep, grad_to_none, return_mode):
        fn()
        return 2.0

    make_inputs = features.case_inputs
    monkeypatch.setattr(measure, "do_bench", do_bench)
    monkeypatch.setattr(features, "case_inputs",
                        lambda case, dtype: make_inputs(case, dtype, "cpu"))
    monkeypatch.setattr(features, "FACTORIES", {"flashtile": _naive_features,
                                                "flex": _naive_features})
    monkeypatch.setattr(features, "CHECK_ROWS", 96)
    preset = Preset(dims=(16,), seqlens=(256,), modes=("fwd", "bwd"),
                    providers=("flashtile", "flex"), warmup_ms=1, rep_ms=1, batch=1, heads=4)
    lines = []
    status = features.run_features(parse_args(["--features", "--providers", "flex,flashtile"]),
                                   META, tmp_path, torch.float32, preset, lines.append)
    assert status == 0
    data = json.loads((tmp_path / "features.json").read_text())
    assert [(r["case"]["name"], r["provider"], r["mode"], r["status"])
            for r in data["results"]] == [
        (c, p, m, "ok") for c in ("full", "window", "gqa", "document")
        for p in ("flashtile", "flex") for m in ("fwd", "bwd")]
    assert {r["diff"] for r in data["results"] if r["provider"] == "flex"} == {0.0}
    assert all(s["speedup"] == 1.0 for s in data["speedups"])
    assert (tmp_path / "features.md").exists() and "wrote" in lines[-1]
    # A flashtile that fails its check: exit status 1, and flex is not compared with it.
    def wrong(case, q, k, v, doc_ids):
        return lambda: _naive_features(case, q, k, v, doc_ids)() + 1

    monkeypatch.setitem(features.FACTORIES, "flashtile", wrong)
    status = features.run_features(parse_args(["--features", "--modes", "fwd"]), META, tmp_path,
                                   torch.float32, preset, lines.append)
    assert status == 1
    data = json.loads((tmp_path / "features.json").read_text())
    assert {(r["provider"], r["status"], r["diff"]) for r in data["results"]} == {
        ("flashtile", "failed", None), ("flex", "ok", None)}
    bad = parse_args(["--features", "--providers", "sdpa-cudnn"])
    assert features.run_features(bad, META, tmp_path, torch.float32, preset, lines.append) == 2
