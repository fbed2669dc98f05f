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


def test_reports_name_the_commit(monkeypatch):
    """FLASHTILE_COMMIT names the commit a copied tree holds, over its lagging .git; without it,
    the checkout's own short hash (this test runs inside the git clone)."""
    from flashtile.bench.run import _git_commit

    monkeypatch.setenv("FLASHTILE_COMMIT", "89bf9f0")
    assert _git_commit() == "89bf9f0"
    monkeypatch.delenv("FLASHTILE_COMMIT")
    commit = _git_commit()
    if commit is not None:  # None only outside a git checkout
        assert all(c in "0123456789abcdef" for c in commit.removesuffix("-dirty"))
        assert len(commit.removesuffix("-dirty")) >= 7


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


# --------------------------------------------------------------------------------------------
# --decode (bench/decode.py) and --varlen (bench/varlen.py): issue 5. The presets, the cases and
# their byte / pair counts, the harnesses with torch's own CPU attention standing in for the
# kernels and a stand-in timer, and the reports from made-up times. No Triton kernel runs here.

import torch.nn.functional as F  # noqa: E402

from flashtile.bench import decode, varlen  # noqa: E402
from flashtile.bench import run as bench_run  # noqa: E402
from flashtile.bench.decode import DecodeCase, DecodeResult  # noqa: E402
from flashtile.bench.varlen import Packing, VarlenCase, VarlenResult  # noqa: E402


def _fake_do_bench(monkeypatch, ms=2.0):
    def do_bench(fn, warmup, rep, grad_to_none, return_mode):
        fn()
        return ms

    def time_graph(fn, warmup, rep):  # the CUDA graph replay: the same call, timed alike
        fn()
        return ms

    monkeypatch.setattr(measure, "do_bench", do_bench)
    monkeypatch.setattr(decode, "time_graph", time_graph)


def test_decode_and_varlen_are_presets_beside_features(capsys):
    args = parse_args(["--decode"])
    assert args.decode and not (args.varlen or args.features or args.quick or args.long)
    args = parse_args(["--decode", "--batches", "1,64", "--seqlens", "1k,128k", "--providers",
                       "flashtile-paged,sdpa"])
    assert (args.batches, args.seqlens, args.providers) == (
        [1, 64], [1024, 131072], ["flashtile-paged", "sdpa"])
    args = parse_args(["--varlen", "--modes", "fwd", "--providers", "flashtile-varlen"])
    assert args.varlen and args.modes == ["fwd"] and args.providers == ["flashtile-varlen"]
    for pair in (["--decode", "--varlen"], ["--varlen", "--features"], ["--decode", "--quick"]):
        with pytest.raises(SystemExit):
            parse_args(pair)
        assert "not allowed with argument" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--decode", "--providers", "flashtile-pagd"])
    assert "unknown flashtile-pagd" in capsys.readouterr().err
    dec, var = PRESETS["decode"], PRESETS["varlen"]
    assert (dec.dims, dec.seqlens, dec.modes, dec.heads) == ((128,), (1024, 16384, 131072),
                                                             ("fwd",), 32)
    assert dec.providers == ("sdpa", "flashtile", "flashtile-paged")
    assert (var.dims, var.seqlens, var.modes, var.heads) == ((128,), (32768,),
                                                             ("fwd", "bwd", "fwdbwd"), 16)
    assert var.providers == ("flashtile-varlen", "flashtile-padded", "sdpa-padded")


@pytest.mark.parametrize("flag", ["--decode", "--varlen"])
def test_decode_and_varlen_without_gpu_exit_2(monkeypatch, capsys, flag):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main([flag]) == 2
    assert "no CUDA GPU" in capsys.readouterr().err
    assert cli_main(["bench", flag]) == 2


def test_providers_outside_a_presets_set_exit_2(monkeypatch, capsys):
    """The dispatch, with the GPU's part stubbed: each preset refuses another's providers
    before it allocates anything."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(bench_run, "metadata", lambda argv, dtype, preset: dict(META))
    monkeypatch.setattr(bench_run, "ceilings", lambda warmup, rep: META["ceilings"])
    assert main(["--providers", "flashtile-paged"]) == 2
    assert "not in the grid's providers" in capsys.readouterr().out
    assert main(["--decode", "--providers", "sdpa-padded"]) == 2
    assert "not in the decode set" in capsys.readouterr().out
    assert main(["--varlen", "--providers", "flashtile-paged"]) == 2
    assert "not in the varlen set" in capsys.readouterr().out


# -- decode: cases and bytes


def test_decode_cases_and_their_bytes():
    cases = decode.decode_cases()
    assert [(c.cache_len, c.batch) for c in cases] == [
        (n, b) for n in (1024, 16384, 131072) for b in (1, 8, 64)]
    assert {(c.heads, c.kv_heads, c.head_dim, c.page, c.itemsize, c.group) for c in cases} == {
        (32, 4, 128, 256, 2, 8)}
    small, big = cases[0], cases[-1]
    assert small.kv_bytes() == 1024 * 4 * 128 * 2 * 2 == 2 * 2**20
    assert big.kv_bytes() == 64 * 131072 * 4 * 128 * 2 * 2 == 16 * 2**30
    assert big.paged_bytes() == big.kv_bytes() and big.pages_per_entry() == 512
    assert big.expanded_bytes() == 8 * big.kv_bytes()
    odd = DecodeCase(3, 1000, page=256)  # 4 pages, the last one 232 tokens full
    assert odd.pages_per_entry() == 4 and odd.paged_bytes() == 3 * 1024 * 4 * 128 * 2 * 2
    # Every default case fits in 60 GiB with its paged copy; SDPA's expansion would not at
    # the largest, so there SDPA must use enable_gqa (or be skipped).
    assert all(decode.fits(c) for c in cases)
    assert all(decode.case_memory(c, "flashtile-paged") <= decode.MEMORY_BUDGET for c in cases)
    assert decode.case_memory(big, "sdpa", expand=True) == 9 * 16 * 2**30
    assert decode.case_memory(big, "sdpa") == decode.case_memory(big, "flashtile") == 16 * 2**30
    assert not decode.fits(big, budget=16 * 2**30)
    # 16 GiB in 10 ms: 1.718e12 B/s
    assert big.gbps(10.0) == pytest.approx(16 * 2**30 / 1e-2 / 1e9)
    assert DecodeCase(1, 1024, itemsize=4).kv_bytes() == 2 * small.kv_bytes()
    with pytest.raises(ValueError, match="not a multiple"):
        decode.decode_cases(heads=30, kv_heads=4)


@pytest.mark.parametrize("cache_len", [48, 40])
def test_paged_copy_puts_every_token_on_its_page(cache_len):
    case = DecodeCase(3, cache_len, heads=4, kv_heads=2, head_dim=8, page=16, itemsize=4)
    cache = torch.randn(3, cache_len, 2, 8)
    table = decode.shuffled_block_table(3, case.pages_per_entry())
    assert table.dtype == torch.int32 and table.shape == (3, 3)
    assert sorted(table.flatten().tolist()) == list(range(9))
    assert torch.equal(table, decode.shuffled_block_table(3, 3))  # seeded
    assert not torch.equal(table.flatten(), torch.arange(9, dtype=torch.int32))  # shuffled
    pool = decode.paged_copy(case, cache, table)
    assert pool.shape == (9, 16, 2, 8)
    for b in range(3):
        logical = pool[table[b].long()].reshape(-1, 2, 8)
        assert torch.equal(logical[:cache_len], cache[b])
        assert not bool(logical[cache_len:].any())  # rows past the cache are zero


# -- decode: the harness, with torch's CPU SDPA as the providers

SMALL_DECODE = DecodeCase(3, 80, heads=8, kv_heads=2, head_dim=16, page=16, itemsize=4)


def _decode_inputs(case=SMALL_DECODE):
    return decode.decode_inputs(case, torch.float32, "cpu")


def _wrong_gqa(case, q, k_cache, v_cache, spare):
    """Query head h on kv head h % H_kv instead of h // group: the check must see it."""
    qs = q.transpose(1, 2)
    ks, vs = (t.transpose(1, 2).repeat(1, case.group, 1, 1) for t in (k_cache, v_cache))
    return lambda: F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2), "wrong"


def test_decode_harness_checks_then_times(monkeypatch):
    _fake_do_bench(monkeypatch)
    q, k_cache, v_cache = _decode_inputs()
    lines = []
    result, out = decode.measure_decode(SMALL_DECODE, "sdpa", decode.sdpa_decode, q, k_cache,
                                        v_cache, 2**30, 1, 1, log=lines.append)
    assert (result.status, result.ms, result.us, result.diff) == ("ok", 2.0, 2000.0, None)
    assert result.gbps == pytest.approx(SMALL_DECODE.kv_bytes() / 2e-3 / 1e9)
    assert result.check_err <= result.check_tol and "enable_gqa=True" in result.detail
    assert out.shape == (3, 1, 8, 16) and "check ok" in lines[0]
    # compared with SDPA's output: a copy passes, an offset one fails and is not timed
    result, _ = decode.measure_decode(SMALL_DECODE, "flashtile", decode.sdpa_decode, q, k_cache,
                                      v_cache, 2**30, 1, 1, compare_to=out, log=lines.append)
    assert result.status == "ok" and result.diff == 0.0
    result, _ = decode.measure_decode(SMALL_DECODE, "flashtile", decode.sdpa_decode, q, k_cache,
                                      v_cache, 2**30, 1, 1, compare_to=out + 0.1,
                                      log=lines.append)
    assert result.status == "failed" and "SDPA's out" in result.note and result.ms is None
    result, _ = decode.measure_decode(SMALL_DECODE, "flashtile", _wrong_gqa, q, k_cache,
                                      v_cache, 2**30, 1, 1, log=lines.append)
    assert result.status == "failed" and "tolerance" in result.note


def test_decode_sdpa_expands_kv_only_where_it_fits(monkeypatch):
    """Where enable_gqa would run the math backend, k/v are expanded once, if memory allows."""
    _fake_do_bench(monkeypatch)
    monkeypatch.setattr(decode, "sdpa_backend",
                        lambda q, k, v, attn_mask=None, enable_gqa=False:
                        "math" if enable_gqa else "flash")
    q, k_cache, v_cache = _decode_inputs()
    need = SMALL_DECODE.expanded_bytes()
    result, _ = decode.measure_decode(SMALL_DECODE, "sdpa", decode.sdpa_decode, q, k_cache,
                                      v_cache, need, 1, 1, log=lambda line: None)
    assert result.status == "ok" and "expanded to 8 heads" in result.detail
    result, _ = decode.measure_decode(SMALL_DECODE, "sdpa", decode.sdpa_decode, q, k_cache,
                                      v_cache, need - 1, 1, 1, log=lambda line: None)
    assert result.status == "skipped" and "GiB left" in result.note
    result, _ = decode.measure_decode(SMALL_DECODE, "flashtile-paged",
                                      decode.flashtile_paged_decode, q, k_cache, v_cache, 0, 1,
                                      1, log=lambda line: None)
    assert result.status == "skipped" and "paged copy needs" in result.note


# -- decode: reports from made-up times

COPY = META["ceilings"]["copy_gbps"]


def _dr(batch, cache_len, provider, us, **fields):
    case = DecodeCase(batch, cache_len)
    ms = us * 1e-3
    return DecodeResult(case, provider, "ok", ms=ms, gbps=case.gbps(ms), eager_ms=2 * ms,
                        check_err=1e-3, check_tol=4e-3,
                        diff=None if provider == "sdpa" else 1e-3, **fields)


def _fake_decode_results():
    big = DecodeCase(64, 131072)
    # the 16 GiB case: fraction = 16 GiB / t / copy; at copy 2987.6 GB/s, 0.70 is 8.215 ms
    return [
        _dr(1, 1024, "sdpa", 20.0, detail="flash backend, enable_gqa=True"),
        _dr(1, 1024, "flashtile", 40.0), _dr(1, 1024, "flashtile-paged", 50.0),
        _dr(64, 131072, "sdpa", 9000.0),
        _dr(64, 131072, "flashtile", 8000.0),  # 71.9%: meets
        DecodeResult(big, "flashtile-paged", "failed", check_err=0.5, check_tol=4e-3, diff=0.5,
                     note="out entry 63: max |diff| too big"),
    ]


def test_decode_summary_and_target():
    rows = decode.summary(_fake_decode_results(), COPY)
    assert [(r["batch"], r["cache_len"], r["target"]) for r in rows] == [
        (1, 1024, None), (64, 131072, 0.7)]
    small, big = rows[0]["providers"], rows[1]["providers"]
    assert small["flashtile"]["speed_vs_sdpa"] == pytest.approx(0.5)
    assert small["flashtile"]["met"] is None  # 1k: the target does not apply
    assert small["sdpa"]["us"] == pytest.approx(20.0) and "met" not in small["sdpa"]
    assert small["sdpa"]["eager_us"] == pytest.approx(40.0)
    fraction = 16 * 2**30 / 8e-3 / 1e9 / COPY
    assert big["flashtile"]["copy_fraction"] == pytest.approx(fraction) and fraction > 0.7
    assert big["flashtile"]["met"] is True and big["flashtile"]["speed_vs_sdpa"] == 1.125
    assert big["flashtile-paged"] == dict(status="failed", us=None, eager_us=None, gbps=None,
                                          copy_fraction=None, speed_vs_sdpa=None, met=None)
    assert decode.target_counts(_fake_decode_results(), COPY) == {"flashtile": [1, 1]}
    slower = [r if r.provider != "flashtile" or r.case.batch == 1
              else _dr(64, 131072, "flashtile", 8300.0) for r in _fake_decode_results()]
    assert decode.target_counts(slower, COPY) == {"flashtile": [0, 1]}
    assert decode.target_counts(_fake_decode_results(), None) == {}  # no ceiling: not judged


def test_decode_reports_are_written(tmp_path):
    results = _fake_decode_results()
    decode.write_decode_reports(tmp_path, results, META)
    md = (tmp_path / "decode.md").read_text()
    table = _cells(md.split("## Times and bandwidth (median)\n\n")[1].split("\n\n")[1])
    assert table[0] == ["cache", "B", "K+V MiB", "sdpa µs", "flashtile µs", "flashtile-paged µs",
                        "sdpa GB/s", "flashtile GB/s", "flashtile-paged GB/s", "sdpa % copy",
                        "flashtile % copy", "flashtile-paged % copy", "flashtile ÷ sdpa",
                        "flashtile-paged ÷ sdpa", "target", "flashtile meets",
                        "flashtile-paged meets", "sdpa eager µs", "flashtile eager µs",
                        "flashtile-paged eager µs"]
    assert table[2] == ["1024", "1", "2", "20.0", "40.0", "50.0", "105", "52", "42", "4%", "2%",
                        "1%", "0.50", "0.40", "-", "-", "-", "40.0", "80.0", "100.0"]
    assert table[3] == ["131072", "64", "16,384", "9000.0", "8000.0", "FAIL", "1909", "2147",
                        "FAIL", "64%", "72%", "FAIL", "1.12", "-", ">= 70%", "yes", "-",
                        "18000.0", "16000.0", "FAIL"]
    assert "flashtile: met at 1 of 1 cases" in md
    assert "- flashtile-paged failed at B=64 cache=131072: out entry 63" in md
    checks = _cells(md.split("## Checks before timing\n\n")[1].split("\n\n")[1])
    assert checks[2] == ["1024", "1", "sdpa", "1.00e-03", "4.00e-03", "-", "ok",
                         "flash backend, enable_gqa=True"]
    assert checks[-1][2:7] == ["flashtile-paged", "5.00e-01", "4.00e-03", "5.00e-01", "FAIL"]
    assert "device copy 2988 GB/s" in md and "GQA 8:1" in md and "TFLOP/s =" not in md
    data = json.loads((tmp_path / "decode.json").read_text())
    assert data["metadata"] == META and len(data["results"]) == 6
    first = data["results"][0]
    assert (first["case"]["batch"], first["provider"], first["kv_bytes"]) == (1, "sdpa", 2**21)
    assert first["us"] == pytest.approx(20.0)
    assert first["copy_fraction"] == pytest.approx(2**21 / 20e-6 / 1e9 / COPY)
    assert data["target"] == {"copy_fraction": 0.7, "min_cache_len": 16384,
                              "met": {"flashtile": {"met": 1, "judged": 1}}}
    assert data["summary"][1]["providers"]["flashtile"]["met"] is True


def test_run_decode_walks_every_case_on_the_cpu(monkeypatch, tmp_path):
    """run_decode's loop with the GPU's calls stubbed and CPU SDPA as every provider: a case
    over the memory budget is skipped, the others are checked and timed."""
    _fake_do_bench(monkeypatch)
    for name, value in (("empty_cache", lambda: None), ("memory_allocated", lambda: 0),
                        ("mem_get_info", lambda: (40 * 2**20, 80 * 2**30))):
        monkeypatch.setattr(torch.cuda, name, value)
    make_inputs = decode.decode_inputs
    monkeypatch.setattr(decode, "decode_inputs",
                        lambda case, dtype: make_inputs(case, dtype, "cpu"))
    monkeypatch.setattr(decode, "FACTORIES", {p: decode.sdpa_decode for p in decode.PROVIDERS})
    from flashtile.bench.run import Preset

    preset = Preset(dims=(16,), seqlens=(64,), modes=("fwd",), providers=decode.PROVIDERS,
                    warmup_ms=1, rep_ms=1, heads=8)
    args = parse_args(["--decode", "--batches", "1,3", "--seqlens", "64,4k", "--providers",
                       "flashtile,sdpa"])
    # 40 MiB free, 1 MiB kept aside; the largest cache, float32: 3 · 4096 · 4 · 16 · 4 · 2 = 6 MiB
    monkeypatch.setattr(decode, "SAFETY", 2**20)
    lines = []
    assert decode.run_decode(args, META, tmp_path, torch.float32, preset, lines.append) == 0
    data = json.loads((tmp_path / "decode.json").read_text())
    got = [(r["case"]["cache_len"], r["case"]["batch"], r["provider"], r["status"])
           for r in data["results"]]
    assert got == [(n, b, p, "ok") for n in (64, 4096) for b in (1, 3)
                   for p in ("sdpa", "flashtile")]
    assert {r["diff"] for r in data["results"] if r["provider"] == "flashtile"} == {0.0}
    assert "wrote" in lines[-1]
    # A budget under the largest cache skips it; a flashtile that fails gives exit status 1.
    monkeypatch.setattr(decode, "MEMORY_BUDGET", 5 * 2**20)
    monkeypatch.setitem(decode.FACTORIES, "flashtile", _wrong_gqa)
    assert decode.run_decode(args, META, tmp_path, torch.float32, preset, lines.append) == 1
    data = json.loads((tmp_path / "decode.json").read_text())
    statuses = {(r["case"]["cache_len"], r["case"]["batch"], r["provider"]): r["status"]
                for r in data["results"]}
    assert statuses[4096, 3, "sdpa"] == statuses[4096, 3, "flashtile"] == "skipped"
    assert statuses[64, 1, "flashtile"] == "failed" and statuses[64, 1, "sdpa"] == "ok"


# -- varlen: the batch and its counts


def test_draw_lengths_is_seeded_log_uniform_and_totals_32k():
    lengths = varlen.draw_lengths()
    assert lengths == [3851, 2531, 493, 225, 765, 457, 2870, 279, 646, 1085, 5245, 741, 251,
                       2505, 1286, 216, 5287, 4035]
    assert sum(lengths) == 32768 and varlen.draw_lengths() == lengths
    assert varlen.draw_lengths(seed=1) != lengths
    for total in (64, 100, 5000, 70000):
        drawn = varlen.draw_lengths(total)
        assert all(64 <= n <= 8192 for n in drawn)
        assert total - 64 < sum(drawn) <= total
    with pytest.raises(ValueError):
        varlen.draw_lengths(63)
    p = varlen.packing()
    assert (p.batch, p.total, p.max_len, p.heads, p.head_dim) == (18, 32768, 5287, 16, 128)
    assert p.padded_tokens == 18 * 5287
    assert p.target_speedup(False) == pytest.approx(0.9 * 18 * 5287**2 / sum(
        n * n for n in lengths))


def test_packing_counts_pairs_and_padding():
    p = Packing((2, 4), heads=3, head_dim=8)
    assert (p.batch, p.total, p.max_len, p.padded_tokens, p.cu_seqlens()) == (
        2, 6, 4, 8, [0, 2, 6])
    assert p.token_padding() == 0.25
    assert (p.pairs(False), p.padded_pairs(False)) == (4 + 16, 2 * 16)
    assert (p.pairs(True), p.padded_pairs(True)) == (3 + 10, 2 * 10)
    assert p.pair_padding(False) == pytest.approx(1 - 20 / 32)
    assert p.target_speedup(False) == pytest.approx(0.9 / (1 - p.pair_padding(False)))
    assert p.target_speedup(False) == pytest.approx(0.9 * 32 / 20)
    assert p.target_speedup(True) == pytest.approx(0.9 * 20 / 13)
    assert p.flops(False, "fwd") == 4 * 3 * 20 * 8
    assert p.flops(True, "bwd") == 2.5 * 4 * 3 * 13 * 8
    equal = Packing((5, 5, 5))
    assert equal.token_padding() == 0 and equal.pair_padding(True) == 0
    assert equal.target_speedup(False) == pytest.approx(0.9)
    case = VarlenCase(p, True)
    assert case.name == "causal" and case.label() == "causal total=6 B=2 max=4 D=8"


def test_padding_helpers():
    lengths = (2, 4, 1)
    assert varlen.padding_index(lengths, 4).tolist() == [0, 1, 4, 5, 6, 7, 8]
    keep = varlen.key_keep(lengths, 4)
    assert keep.tolist() == [[True, True, False, False], [True] * 4,
                             [True, False, False, False]]
    packed = torch.arange(7 * 2, dtype=torch.float32).view(7, 2) + 1
    padded = varlen.pad(packed, lengths, 4)
    assert padded.shape == (3, 4, 2) and torch.equal(padded[0, :2], packed[:2])
    assert torch.equal(padded[2, 0], packed[6]) and not bool(padded[0, 2:].any())
    assert torch.equal(varlen.unpad(padded, lengths), packed)
    mask = varlen.sdpa_mask(lengths, 4, causal=False)
    assert mask.shape == (3, 1, 1, 4) and torch.equal(mask[:, 0, 0], keep)
    mask = varlen.sdpa_mask(lengths, 4, causal=True)
    assert mask.shape == (3, 1, 4, 4)
    assert mask[1, 0].tolist() == torch.ones(4, 4, dtype=torch.bool).tril().tolist()
    assert mask[0, 0, 3].tolist() == [True, True, False, False]
    assert bool(mask.any(-1).all())  # no empty row
    assert varlen.check_sequences([5, 2, 9, 2, 9]) == [1, 2]


# -- varlen: the harness, with torch's CPU attention standing in for the kernels

SMALL_PACKING = Packing((5, 17, 40, 9), heads=4, head_dim=16)


def _varlen_by_sequence(case, inp):
    """Attention on each real sequence alone, concatenated: varlen's function."""
    cu = case.packing.cu_seqlens()

    def forward():
        outs = [F.scaled_dot_product_attention(
            *(t[cu[s]:cu[s + 1]].transpose(0, 1) for t in (inp.q, inp.k, inp.v)),
            is_causal=case.causal).transpose(0, 1) for s in range(case.packing.batch)]
        return torch.cat(outs)

    return varlen.Setup(forward, [inp.q, inp.k, inp.v], inp.dout, lambda out: out, "per sequence")


def _padded_unmasked(case, inp, sees_padding=None):
    def forward():
        return F.scaled_dot_product_attention(inp.qp, inp.kp, inp.vp, is_causal=case.causal)

    return varlen.Setup(forward, [inp.qp, inp.kp, inp.vp], inp.doutp,
                        lambda out: inp.real(out, case.packing.lengths), "padded",
                        sees_padding=not case.causal if sees_padding is None else sees_padding)


def _cpu_inputs(p=SMALL_PACKING):
    return varlen.varlen_inputs(p, torch.float32, "cpu")


@pytest.mark.parametrize("causal", [False, True], ids=["non-causal", "causal"])
def test_varlen_harness_checks_then_times(monkeypatch, causal):
    _fake_do_bench(monkeypatch)
    monkeypatch.setattr(varlen, "CHECK_ROWS", 8)  # the last 8 rows of sequences 0 and 2
    case = VarlenCase(SMALL_PACKING, causal)
    inp = _cpu_inputs()
    assert inp.qp.shape == (4, 4, 40, 16) and inp.q.shape == (71, 4, 16)
    assert torch.equal(inp.real(inp.qp, SMALL_PACKING.lengths), inp.q)
    dense = _varlen_by_sequence(case, inp).forward().detach()
    lines = []
    for name, factory in (("flashtile-varlen", _varlen_by_sequence),
                          ("flashtile-padded", _padded_unmasked),
                          ("sdpa-padded", varlen.sdpa_padded)):
        results = varlen.measure_varlen(case, name, factory, inp, ["fwd", "bwd"], 1, 1,
                                        compare_to=dense, log=lines.append)
        assert [(r.mode, r.status, r.ms) for r in results] == [("fwd", "ok", 2.0),
                                                               ("bwd", "ok", 2.0)], name
        assert results[0].tflops == pytest.approx(case.flops("fwd") / 2e-3 / 1e12)
        assert results[0].check_err <= results[0].check_tol
        sees_padding = name == "flashtile-padded" and not causal
        assert (results[0].diff is None) == sees_padding
    assert "mask (4, 1, " in results[0].detail and "backend" in results[0].detail
    assert all(t.grad is None for t in (inp.q, inp.qp))
    # An output that differs from the dense run fails and is not timed.
    results = varlen.measure_varlen(case, "flashtile-varlen", _varlen_by_sequence, inp, ["fwd"],
                                    1, 1, compare_to=dense + 0.1, log=lines.append)
    assert results[0].status == "failed" and "dense's" in results[0].note
    if not causal:  # the unmasked padded run is not varlen's function: the reference sees it
        results = varlen.measure_varlen(
            case, "flashtile-padded", lambda c, i: _padded_unmasked(c, i, sees_padding=False),
            inp, ["fwd"], 1, 1, log=lines.append)
        assert results[0].status == "failed" and "tolerance" in results[0].note


# -- varlen: reports from made-up times

PACKED = varlen.packing()
NONCAUSAL, CAUSAL = VarlenCase(PACKED, False), VarlenCase(PACKED, True)


def _vr(case, provider, mode, ms):
    return VarlenResult(case, provider, mode, "ok", ms=ms,
                        tflops=case.flops(mode) / (ms * 1e-3) / 1e12, check_err=1e-3,
                        check_tol=4e-3, diff=None if provider == "flashtile-padded" else 1e-3,
                        detail="efficient backend" if provider == "sdpa-padded" else "")


def _fake_varlen_results():
    return [
        _vr(NONCAUSAL, "flashtile-varlen", "fwd", 5.0),
        _vr(NONCAUSAL, "flashtile-padded", "fwd", 25.0),  # 5.0x, target 4.02: met
        _vr(NONCAUSAL, "sdpa-padded", "fwd", 40.0),
        _vr(NONCAUSAL, "flashtile-varlen", "bwd", 15.0),
        _vr(NONCAUSAL, "flashtile-padded", "bwd", 45.0),  # 3.0x: not met
        VarlenResult(NONCAUSAL, "sdpa-padded", "bwd", "error", note="OutOfMemoryError: CUDA"),
        _vr(CAUSAL, "flashtile-varlen", "fwd", 3.0),
        _vr(CAUSAL, "flashtile-padded", "fwd", 13.0),
        _vr(CAUSAL, "sdpa-padded", "fwd", 30.0),
    ]


def test_varlen_speedups_and_target():
    found = {(s["case"], s["mode"]): s for s in varlen.speedups(_fake_varlen_results())}
    assert set(found) == {("non-causal", "fwd"), ("non-causal", "bwd"), ("causal", "fwd")}
    s = found["non-causal", "fwd"]
    assert s["speedup"] == 5.0 and s["met"] is True and s["vs_sdpa"] == 8.0
    assert s["target"] == pytest.approx(PACKED.target_speedup(False))
    assert s["target"] == pytest.approx(0.9 / (1 - s["pair_padding"]))
    assert found["non-causal", "bwd"]["met"] is False
    assert found["non-causal", "bwd"]["vs_sdpa"] is None
    assert found["causal", "fwd"]["speedup"] == pytest.approx(13 / 3)
    assert found["causal", "fwd"]["met"] is True  # 4.33 >= 4.02


def test_varlen_reports_are_written(tmp_path):
    results = _fake_varlen_results()
    varlen.write_varlen_reports(tmp_path, results, META)
    md = (tmp_path / "varlen.md").read_text()
    batch = _cells(md.split("## Batch and padding\n\n")[1].split("\n\n")[0])
    assert batch[0] == ["case", "B", "tokens", "max len", "padded tokens", "token padding",
                        "pairs / head", "padded pairs / head", "pair padding", "target speedup"]
    assert batch[2][:6] == ["non-causal", "18", "32768", "5287", "95166", "0.656"]
    assert batch[2][6:] == [f"{PACKED.pairs(False):,}", f"{18 * 5287**2:,}", "0.776", "4.02"]
    times = _cells(md.split("## Times (median ms)\n\n")[1].split("\n\n")[1])
    assert times[0] == ["case", "D", "mode", "flashtile-varlen ms", "flashtile-padded ms",
                        "sdpa-padded ms", "flashtile-varlen TFLOP/s",
                        "flashtile-padded TFLOP/s", "sdpa-padded TFLOP/s", "varlen speedup",
                        "target", "meets", "varlen ÷ sdpa"]
    assert times[2][:6] == ["non-causal", "128", "fwd", "5.000", "25.000", "40.000"]
    assert times[2][9:] == ["5.00", ">= 4.02", "yes", "8.00"]
    assert times[3][5] == "err" and times[3][9:] == ["3.00", ">= 4.02", "NO", "-"]
    assert times[4][9:] == ["4.33", ">= 4.02", "yes", "10.00"]
    assert "0.9 · padded pairs / pairs" in md and "3851, 2531, 493" in md
    assert "- sdpa-padded error at non-causal total=32768 B=18 max=5287 D=128 bwd" in md
    checks = _cells(md.split("## Checks before timing\n\n")[1].split("\n\n")[1])
    assert checks[2] == ["non-causal", "128", "flashtile-varlen", "1.00e-03", "4.00e-03",
                         "1.00e-03", "ok", ""]
    data = json.loads((tmp_path / "varlen.json").read_text())
    assert data["metadata"] == META and data["target"]["efficiency"] == 0.9
    assert [c["name"] for c in data["cases"]] == ["non-causal", "causal"]
    assert data["cases"][0]["lengths"] == list(PACKED.lengths)
    assert data["cases"][0]["pair_padding"] == pytest.approx(PACKED.pair_padding(False))
    assert data["cases"][1]["target_speedup"] == pytest.approx(PACKED.target_speedup(True))
    assert data["results"][0]["case"] == dict(name="non-causal", causal=False, total=32768,
                                              batch=18, max_len=5287, heads=16, head_dim=128)
    assert len(data["results"]) == 9 and len(data["speedups"]) == 3


def test_run_varlen_walks_both_cases_on_the_cpu(monkeypatch, tmp_path):
    _fake_do_bench(monkeypatch)
    monkeypatch.setattr(varlen, "FACTORIES", {"flashtile-varlen": _varlen_by_sequence,
                                              "flashtile-padded": _padded_unmasked,
                                              "sdpa-padded": varlen.sdpa_padded})
    monkeypatch.setattr(varlen, "dense_check_run",
                        lambda case, inp: _varlen_by_sequence(case, inp).forward().detach())
    monkeypatch.setattr(varlen, "CHECK_ROWS", 16)
    from flashtile.bench.run import Preset

    preset = Preset(dims=(16,), seqlens=(300,), modes=("fwd", "bwd"),
                    providers=varlen.PROVIDERS, warmup_ms=1, rep_ms=1, heads=2)
    lines = []
    args = parse_args(["--varlen"])
    assert varlen.run_varlen(args, META, tmp_path, torch.float32, preset, lines.append,
                             device="cpu") == 0
    data = json.loads((tmp_path / "varlen.json").read_text())
    assert [(r["case"]["name"], r["provider"], r["mode"], r["status"])
            for r in data["results"]] == [
        (c, p, m, "ok") for c in ("non-causal", "causal") for p in varlen.PROVIDERS
        for m in ("fwd", "bwd")]
    assert data["cases"][0]["lengths"] == varlen.draw_lengths(300)
    assert len(data["speedups"]) == 4 and "wrote" in lines[-1]
    assert any("dense comparison run: check ok" in line for line in lines)
    # A varlen whose output is off: exit status 1.
    def wrong(case, inp):
        setup = _varlen_by_sequence(case, inp)
        forward = setup.forward
        setup.forward = lambda: forward() * 1.5
        return setup

    monkeypatch.setitem(varlen.FACTORIES, "flashtile-varlen", wrong)
    args = parse_args(["--varlen", "--modes", "fwd", "--providers", "flashtile-varlen"])
    assert varlen.run_varlen(args, META, tmp_path, torch.float32, preset, lines.append,
                             device="cpu") == 1
    args = parse_args(["--varlen", "--seqlens", "10"])
    assert varlen.run_varlen(args, META, tmp_path, torch.float32, preset, lines.append,
                             device="cpu") == 2
