"""`flashtile bench --features`: the feature cases of issue 4, flashtile beside FlexAttention.

One sequence (batch 1) of 16 query heads, D = 128, N = 16384 unless --seqlens / --dims say
otherwise, in four cases, none causal:

    full      full attention, the baseline (multi-head: as many key/value heads as query heads)
    window    causal sliding window of 1024 keys including the diagonal: flashtile's
              window_size=(1023, 0), FlashAttention's semantics; Flex's mask
              q_idx - kv_idx < 1024 and kv_idx <= q_idx
    gqa       grouped-query attention 8:1, 16 query heads over 2 key/value heads: flashtile takes
              k and v of 2 heads; Flex gets enable_gqa=True
    document  8 documents of N / 8 tokens (doc ids 0,0,...,1,1,...): flashtile's
              mask_mod=flashtile.masks.document(doc_ids), Flex's doc_ids[q] == doc_ids[kv]

Each (case, provider) is checked before it is timed: its output against a float64 reference on
two slices of query rows (the first and the last CHECK_ROWS, which cross the window's start,
document boundaries and the full windows), query heads 0, 1 and the last (two GQA groups, two
heads of one) and every key, by flashtile.testing's FlashAttention rule; Flex's whole output is
also compared with flashtile's (max |diff| / max(1, |flashtile's out|) at most MAX_DIFF). Then
fwd, bwd and fwdbwd are timed as in the grid (bench/measure.py's time_mode: median of do_bench,
gradients reset before every call).

Reported: times, the speedup of each case over full attention of the same provider (issue 4's
targets: window >= 5x, document >= 4x, GQA's time per query head at most MHA's) and flashtile's
speed relative to Flex. TFLOP/s count only the unmasked (query, key) pairs. Writes features.md
and features.json to the output folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

import flashtile
from flashtile.bench import tables
from flashtile.bench.measure import FLOP_FACTOR, _first_line, time_mode
from flashtile.bench.providers import EAGER_BLOCK_MASK_LIMIT, Forward, Unavailable, _compiled_flex
from flashtile.bench.report import _markdown, _number, header
from flashtile.testing import assert_close, reference_attention, tolerance

PROVIDERS = ("flashtile", "flex")
BASELINE = "full"
WINDOW = 1024  # keys each query sees, its own included
GQA_KV_HEADS = 2
DOCUMENTS = 8
HEADS = 16
BATCH = 1
# Issue 4's targets for flashtile: the speedup of each case over full attention of the same
# provider, in every mode (for gqa: MHA's time per query head over GQA's, so at least 1).
TARGETS = {"window": 5.0, "document": 4.0, "gqa": 1.0}
CHECK_HEADS = (0, 1, -1)  # query heads checked: the first two and the last
CHECK_ROWS = 2560
# Flex's whole output against flashtile's: max |flex - flashtile| / max(1, |flashtile|) (bf16
# rows that see few keys, as the window's first, have |out| up to ~4, where an ulp is 2^-5).
MAX_DIFF = 2e-2


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class Case:
    """One problem: q (batch, heads, seqlen, head_dim), k and v with kv_heads heads; window:
    keys each query sees (causal, its own included), or None; documents: equal documents the
    sequence is cut into, each attending only to itself, or None."""

    name: str
    seqlen: int
    head_dim: int
    heads: int = HEADS
    kv_heads: int = HEADS
    batch: int = BATCH
    window: int | None = None
    documents: int | None = None

    def describe(self) -> str:
        if self.window is not None:
            return (f"causal sliding window of {self.window} keys (flashtile window_size="
                    f"({self.window - 1}, 0))")
        if self.documents is not None:
            return (f"{self.documents} documents of {self.seqlen // self.documents} tokens "
                    "(masks.document)")
        if self.kv_heads != self.heads:
            return f"GQA {self.heads // self.kv_heads}:1 ({self.heads} q heads, {self.kv_heads} kv)"
        return "full attention, non-causal (MHA)"

    def label(self) -> str:
        return f"{self.name} N={self.seqlen} D={self.head_dim}"

    def pairs(self) -> int:
        """Unmasked (query, key) pairs per (batch, head)."""
        n = self.seqlen
        if self.window is not None:
            w = min(self.window, n)  # query i sees min(i + 1, w) keys
            return w * n - w * (w - 1) // 2
        if self.documents is not None:
            return self.documents * (n // self.documents) ** 2
        return n * n

    def flops(self, mode: str) -> float:
        """4 · B · H · pairs · D for the forward (Q Kᵀ and P V over the unmasked pairs), times
        measure.FLOP_FACTOR[mode] (bwd 2.5, fwdbwd 3.5)."""
        return FLOP_FACTOR[mode] * 4 * self.batch * self.heads * self.pairs() * self.head_dim


def feature_cases(seqlen: int = 16384, head_dim: int = 128, heads: int = HEADS,
                  batch: int = BATCH, window: int = WINDOW, kv_heads: int = GQA_KV_HEADS,
                  documents: int = DOCUMENTS) -> list[Case]:
    """full (the baseline, first), window, gqa and document at one seqlen and head dim."""
    if seqlen % documents:
        raise ValueError(f"seqlen {seqlen} is not a multiple of {documents} documents")
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    common = dict(seqlen=seqlen, head_dim=head_dim, heads=heads, kv_heads=heads, batch=batch)
    return [Case(BASELINE, **common), Case("window", **common, window=window),
            Case("gqa", **{**common, "kv_heads": kv_heads}),
            Case("document", **common, documents=documents)]


def document_ids(seqlen: int, documents: int, device=None) -> torch.Tensor:
    """(seqlen,) int32: token t is in document t // (seqlen // documents)."""
    if documents < 1 or seqlen % documents:
        raise ValueError(f"seqlen {seqlen} is not a multiple of {documents} documents")
    return (torch.arange(seqlen, device=device) // (seqlen // documents)).to(torch.int32)


def window_mask_mod(window: int) -> Callable:
    """FlexAttention's mask for the window: keys q - window < kv <= q."""

    def mask_mod(b, h, q_idx, kv_idx):
        return (q_idx - kv_idx < window) & (kv_idx <= q_idx)

    return mask_mod


def document_mask_mod(doc_ids: torch.Tensor) -> Callable:
    """FlexAttention's mask for documents: query and key in the same document."""

    def mask_mod(b, h, q_idx, kv_idx):
        return doc_ids[q_idx] == doc_ids[kv_idx]

    return mask_mod


def flex_mask_mod(case: Case, doc_ids: torch.Tensor | None) -> Callable | None:
    if case.window is not None:
        return window_mask_mod(case.window)
    if case.documents is not None:
        return document_mask_mod(doc_ids)
    return None


# ---------------------------------------------------------------------------------------------
# Providers: factory(case, q, k, v, doc_ids) -> forward, q (B, H, N, D), k and v (B, H_kv, N, D)

FeatureFactory = Callable[[Case, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None],
                          Forward]


def flashtile_features(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                       doc_ids: torch.Tensor | None) -> Forward:
    """flash_attn_func on (B, N, H, D) views; the document mask is made once, here, so its
    block map is built on the first call (the check) and cached on it, never timed."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    kwargs: dict = {}
    if case.window is not None:
        kwargs["window_size"] = (case.window - 1, 0)
    if case.documents is not None:
        kwargs["mask_mod"] = flashtile.masks.document(doc_ids)

    def forward() -> torch.Tensor:
        return flashtile.flash_attn_func(qt, kt, vt, causal=False, **kwargs).transpose(1, 2)

    return forward


def flex_features(case: Case, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  doc_ids: torch.Tensor | None) -> Forward:
    """FlexAttention compiled as in the grid (providers._compiled_flex); masks through a block
    mask built here, once; GQA through enable_gqa=True."""
    from torch.nn.attention.flex_attention import create_block_mask

    attention = _compiled_flex()
    mask_mod = flex_mask_mod(case, doc_ids)
    block_mask = None
    if mask_mod is not None:
        n = case.seqlen
        build = (create_block_mask if n * n <= EAGER_BLOCK_MASK_LIMIT
                 else torch.compile(create_block_mask))
        block_mask = build(mask_mod, None, None, n, n, device=q.device)
    kwargs = {"enable_gqa": True} if case.kv_heads != case.heads else {}

    def forward() -> torch.Tensor:
        return attention(q, k, v, block_mask=block_mask, **kwargs)

    return forward


FACTORIES: dict[str, FeatureFactory] = {"flashtile": flashtile_features, "flex": flex_features}


# ---------------------------------------------------------------------------------------------
# Checking and timing


def check_slices(seqlen: int) -> list[tuple[int, int]]:
    """Query rows checked: the first and the last CHECK_ROWS (one slice if they overlap)."""
    rows = min(seqlen, CHECK_ROWS)
    slices = [(0, rows), (seqlen - rows, seqlen)]
    return slices[:1] if slices[0] == slices[1] else slices


def check_heads(heads: int) -> list[int]:
    """The query heads checked, CHECK_HEADS of those there are."""
    return sorted({h % heads for h in CHECK_HEADS if -heads <= h < heads})


def check_case(case: Case, out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
               v: torch.Tensor, doc_ids: torch.Tensor | None) -> tuple[float, float, str]:
    """(max error, tolerance, message) of out (B, H, N, D) against the float64 reference on
    check_slices, batch 0, the query heads check_heads() (and their kv heads), all keys;
    message is empty when every slice passed. Tolerance: the largest of the slices'."""
    heads = check_heads(case.heads)
    group = case.heads // case.kv_heads
    q_index = torch.tensor(heads, device=q.device)
    kv_index = torch.tensor([h // group for h in heads], device=k.device)
    k_s, v_s = (t[:1].detach().index_select(1, kv_index).transpose(1, 2) for t in (k, v))
    features: dict = {}
    if case.window is not None:
        features["window_size"] = (case.window - 1, 0)
    worst, worst_tol, message = 0.0, 0.0, ""
    for start, stop in check_slices(case.seqlen):
        q_s = q[:1, :, start:stop].detach().index_select(1, q_index).transpose(1, 2)
        if case.documents is not None:
            features["mask"] = doc_ids[start:stop, None] == doc_ids[None, :]
        ref = reference_attention(q_s, k_s, v_s, diag_offset=start, dtype=torch.float64,
                                  **features).out
        base = reference_attention(q_s, k_s, v_s, diag_offset=start, **features).out
        tol = tolerance(ref, base, q.dtype)
        got = out.detach()[:1, :, start:stop].index_select(1, q_index).transpose(1, 2)
        err = (got.double() - ref).abs().max().item()
        worst, worst_tol = max(worst, err), max(worst_tol, tol)
        try:
            assert_close(f"out rows {start}:{stop}", got, ref, tol)
        except AssertionError as e:
            message = message or str(e).splitlines()[0]
    return worst, worst_tol, message


def output_diff(out: torch.Tensor, other: torch.Tensor) -> float:
    """max |out - other| / max(1, |other|): absolute where |other| <= 1, relative above."""
    other = other.float()
    return ((out.float() - other).abs() / other.abs().clamp(min=1.0)).max().item()


@dataclass
class FeatureResult:
    """One provider on one case in one mode; status as measure.Result's ("ok", "skipped",
    "failed", "error"). check_err / check_tol: against the float64 reference; diff:
    output_diff to flashtile's out over the whole output (None for flashtile itself)."""

    case: Case
    provider: str
    mode: str
    status: str
    ms: float | None = None
    tflops: float | None = None
    check_err: float | None = None
    check_tol: float | None = None
    diff: float | None = None
    note: str = ""


def measure_feature(case: Case, name: str, factory: FeatureFactory, q: torch.Tensor,
                    k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
                    doc_ids: torch.Tensor | None, modes: list[str], warmup_ms: int, rep_ms: int,
                    compare_to: torch.Tensor | None = None,
                    log: Callable[[str], object] = print
                    ) -> tuple[list[FeatureResult], torch.Tensor | None]:
    """Check, then time every mode of, one provider on one case: its Results, and its forward
    output (detached; None if it did not run) for the next provider's comparison. Nothing a
    provider raises escapes: it becomes a "skipped" or "error" Result."""
    leaves = [q, k, v]

    def every_mode(status: str, note: str, **fields) -> list[FeatureResult]:
        log(f"{case.label()} {name}: {status} ({note})")
        return [FeatureResult(case, name, m, status, note=note, **fields) for m in modes]

    start = time.perf_counter()
    try:
        forward = factory(case, q, k, v, doc_ids)
        out = forward().detach()
    except Unavailable as e:
        return every_mode("skipped", str(e)), None
    except Exception as e:
        return every_mode("skipped", f"does not run: {_first_line(e)}"), None
    first_s = time.perf_counter() - start
    try:
        err, tol, message = check_case(case, out, q, k, v, doc_ids)
    except Exception as e:  # the reference itself, e.g. out of memory
        return every_mode("skipped", f"could not be checked: {_first_line(e)}"), out
    diff = None
    if compare_to is not None:
        diff = output_diff(out, compare_to)
        if not message and not diff <= MAX_DIFF:
            message = (f"max |out - flashtile's out| / max(1, |flashtile's|) {diff:.3e} > "
                       f"{MAX_DIFF:.0e} (outside the checked rows one of the two is wrong)")
    checked = dict(check_err=err, check_tol=tol, diff=diff)
    if message:
        return every_mode("failed", message, **checked), out
    vs = f", max |diff| to flashtile {diff:.2e}" if diff is not None else ""
    log(f"{case.label()} {name}: first call {first_s:.1f} s; check ok (max err {err:.2e} <= "
        f"tol {tol:.2e}{vs})")
    if any(m != "fwd" for m in modes):  # the backward's first call compiles or autotunes
        start = time.perf_counter()
        try:
            forward().backward(dout)
        except Exception as e:
            log(f"{case.label()} {name}: backward fails ({_first_line(e)})")
        else:
            log(f"{case.label()} {name}: first backward {time.perf_counter() - start:.1f} s")
        for t in leaves:
            t.grad = None

    results = []
    for mode in modes:
        try:
            ms = time_mode(forward, mode, dout, leaves, warmup_ms, rep_ms)
        except Exception as e:
            results.append(FeatureResult(case, name, mode, "error", note=_first_line(e),
                                         **checked))
            log(f"{case.label()} {name} {mode}: error ({_first_line(e)})")
            continue
        tflops = case.flops(mode) / (ms * 1e-3) / 1e12
        results.append(FeatureResult(case, name, mode, "ok", ms=ms, tflops=tflops, **checked))
        log(f"{case.label()} {name} {mode}: {ms:8.3f} ms {tflops:7.1f} TFLOP/s")
    for t in leaves:
        t.grad = None
    return results, out


def case_inputs(case: Case, dtype: torch.dtype, device="cuda") -> tuple[torch.Tensor, ...]:
    """q (B, H, N, D), k and v (B, H_kv, N, D) with requires_grad, dout like q; seeded."""
    torch.manual_seed(0)
    size = (case.batch, case.heads, case.seqlen, case.head_dim)
    kv_size = (case.batch, case.kv_heads, case.seqlen, case.head_dim)
    q = torch.randn(size, device=device, dtype=dtype, requires_grad=True)
    k, v = (torch.randn(kv_size, device=device, dtype=dtype, requires_grad=True)
            for _ in range(2))
    return q, k, v, torch.randn(size, device=device, dtype=dtype)


# ---------------------------------------------------------------------------------------------
# Reports: pure Python over FeatureResults, tested on the CPU


def _key(case: Case) -> tuple:
    return (case.seqlen, case.head_dim, case.batch, case.heads)


def speedups(results: list[FeatureResult]) -> list[dict]:
    """For every case but the baseline, provider and mode: full attention's time (same
    provider, seqlen, head dim) ÷ the case's time, per query head (the same query heads, so
    the ratio of times). `met` (flashtile only): whether issue 4's target holds."""
    by = tables.index(results)
    full = {(_key(r.case), r.provider, r.mode): r for r in results if r.case.name == BASELINE}
    out = []
    for case, mode in tables.rows(results):
        if case.name == BASELINE:
            continue
        for p in tables.providers(results):
            base = tables.ms(full.get((_key(case), p, mode)))
            this = tables.ms(by.get((case, p, mode)))
            if base is None or this is None:
                continue
            value = base / this
            target = TARGETS.get(case.name)
            met = value >= target if target is not None and p == "flashtile" else None
            out.append(dict(case=case.name, seqlen=case.seqlen, head_dim=case.head_dim,
                            provider=p, mode=mode, speedup=value, target=target, met=met))
    return out


def times_table(results: list[FeatureResult]) -> str:
    """One row per case × mode: each provider's ms and µs per query head, flashtile's speed
    relative to Flex (Flex's ms ÷ flashtile's: > 1 flashtile is faster), and TFLOP/s."""
    providers = tables.providers(results)
    by = tables.index(results)
    ratio = "flashtile" in providers and "flex" in providers
    head = (["case", "N", "D", "mode"] + [f"{p} ms" for p in providers]
            + [f"{p} µs/q-head" for p in providers] + (["flashtile ÷ flex"] if ratio else [])
            + [f"{p} TFLOP/s" for p in providers])
    rows = []
    for case, mode in tables.rows(results):
        cells = [by.get((case, p, mode)) for p in providers]
        row = [case.name, str(case.seqlen), str(case.head_dim), mode]
        row += [tables.cell(r, tables.ms(r)) for r in cells]
        row += [tables.cell(r, r.ms * 1e3 / case.heads if tables.ms(r) else None, "{:.1f}")
                for r in cells]
        if ratio:
            ft = tables.ms(by.get((case, "flashtile", mode)))
            fx = tables.ms(by.get((case, "flex", mode)))
            row.append(f"{fx / ft:.2f}" if ft and fx else "-")
        row += [_number(r.tflops) if tables.ms(r) else tables.cell(r, None) for r in cells]
        rows.append(row)
    return _markdown(head, rows)


def speedup_table(results: list[FeatureResult]) -> str:
    """One row per case × mode: each provider's speedup over its own full attention, the
    target and whether flashtile meets it."""
    providers = tables.providers(results)
    found = {(s["case"], s["seqlen"], s["head_dim"], s["provider"], s["mode"]): s
             for s in speedups(results)}
    rows = []
    for case, mode in tables.rows(results):
        if case.name == BASELINE:
            continue
        cells = [found.get((case.name, case.seqlen, case.head_dim, p, mode)) for p in providers]
        target = TARGETS.get(case.name)
        ours = found.get((case.name, case.seqlen, case.head_dim, "flashtile", mode))
        met = "-" if ours is None or ours["met"] is None else ("yes" if ours["met"] else "NO")
        rows.append([case.name, str(case.seqlen), str(case.head_dim), mode]
                    + [f"{s['speedup']:.2f}" if s else "-" for s in cells]
                    + [f">= {target:g}" if target is not None else "-", met])
    return _markdown(["case", "N", "D", "mode", *providers, "target", "flashtile meets"], rows)


def check_table(results: list[FeatureResult]) -> str:
    """One row per case × provider that was checked."""
    seen: dict[tuple[Case, str], FeatureResult] = {}
    for r in results:
        if r.check_err is not None:
            seen.setdefault((r.case, r.provider), r)
    rows = [[case.name, str(case.seqlen), str(case.head_dim), p, f"{r.check_err:.2e}",
             f"{r.check_tol:.2e}", f"{r.diff:.2e}" if r.diff is not None else "-",
             "ok" if r.status != "failed" else "FAIL"]
            for (case, p), r in seen.items()]
    return _markdown(["case", "N", "D", "provider", "max err vs float64", "tolerance",
                      "max diff to flashtile", "check"], rows)


def case_table(results: list[FeatureResult]) -> str:
    rows = [[c.name, c.describe(), str(c.batch), str(c.heads), str(c.kv_heads), str(c.seqlen),
             str(c.head_dim), f"{c.pairs() / c.seqlen**2:.4f}"] for c in tables.cases(results)]
    return _markdown(["case", "what", "B", "H q", "H kv", "N", "D", "pairs / N²"], rows)


def features_markdown(results: list[FeatureResult], meta: dict) -> str:
    facts = [line for line in header(meta).splitlines() if not line.startswith("- TFLOP/s")]
    facts.append("- TFLOP/s = 4·B·H·pairs·D / time, pairs the unmasked (query, key) pairs (the "
                 "cases table); bwd counts 2.5× that, fwdbwd 3.5×; fwd runs with the inputs "
                 "requiring grad, bwd times `out.backward(dout)` alone")
    parts = ["# flashtile feature benchmark (issue 4)", "\n".join(facts),
             "## Cases", case_table(results),
             "## Times (median ms)",
             "flashtile ÷ flex: Flex's time divided by flashtile's (> 1: flashtile is faster). "
             "µs/q-head: time per query head.",
             times_table(results),
             "## Speedup over full attention of the same provider",
             "Full attention's time ÷ the case's (the same 16 query heads, so for gqa this is "
             "MHA's time per query head ÷ GQA's). Targets are issue 4's, for flashtile.",
             speedup_table(results),
             "## Checks before timing",
             f"Against the float64 reference on query rows {CHECK_ROWS} at each end, "
             "query heads 0, 1 and the last, all keys (FlashAttention's tolerance rule). Diff "
             "to flashtile, over the whole output: max |out - flashtile's| / max(1, "
             f"|flashtile's|), at most {MAX_DIFF:g}.",
             check_table(results)]
    lines = tables.not_measured(results)
    if lines:
        parts += ["## Not measured", "\n".join(lines)]
    return "\n\n".join(parts) + "\n"


def write_feature_reports(out_dir: Path, results: list[FeatureResult], meta: dict) -> None:
    """features.md and features.json (metadata, cases, results, speedups, targets)."""
    data = {"metadata": meta,
            "cases": [{**asdict(c), "pairs": c.pairs()} for c in tables.cases(results)],
            "results": [asdict(r) for r in results],
            "speedups": speedups(results),
            "targets": TARGETS}
    tables.write_report(out_dir, "features", features_markdown(results, meta), data)


# ---------------------------------------------------------------------------------------------
# The run (called by bench/run.py's main with --features, on a GPU)


def run_features(args, meta: dict, out_dir: Path, dtype: torch.dtype, preset,
                 log: Callable[[str], object] = print) -> int:
    """Every case at every --seqlens × --dims, on the providers and modes of --providers and
    --modes (flashtile and flex only), else of `preset` (run.PRESETS["features"]: 16k, 128,
    fwd/bwd/fwdbwd). Exit status: 1 when flashtile failed a check, 2 for a provider outside
    the features set, else 0."""
    providers = args.providers or list(preset.providers)
    unknown = [p for p in providers if p not in FACTORIES]
    if unknown:
        log(f"flashtile bench --features: {', '.join(unknown)} not in the features set; "
            f"choose from {', '.join(PROVIDERS)}")
        return 2
    providers = sorted(providers, key=lambda p: p != "flashtile")  # flashtile first: compared to
    modes = args.modes or list(preset.modes)
    warmup_ms, rep_ms = preset.warmup_ms, preset.rep_ms
    try:
        cases = [c for n in (args.seqlens or preset.seqlens) for d in (args.dims or preset.dims)
                 for c in feature_cases(n, d, heads=preset.heads, batch=preset.batch)]
    except ValueError as e:
        log(f"flashtile bench --features: {e}")
        return 2
    log(f"features: {len(cases)} cases × {len(providers)} providers ({', '.join(providers)}), "
        f"modes {', '.join(modes)}; writing to {out_dir}/")
    start = time.perf_counter()
    results: list[FeatureResult] = []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}, {time.perf_counter() - start:.0f} s] {case.label()}: "
            f"{case.describe()}")
        q, k, v, dout = case_inputs(case, dtype)
        doc_ids = (document_ids(case.seqlen, case.documents, q.device)
                   if case.documents is not None else None)
        reference = None
        for name in providers:
            found, out = measure_feature(case, name, FACTORIES[name], q, k, v, dout, doc_ids,
                                         modes, warmup_ms, rep_ms,
                                         compare_to=reference, log=log)
            results += found
            if name == "flashtile" and found and found[0].status != "failed":
                reference = out  # what the others are compared with, if it passed its check
            del out
            torch.cuda.empty_cache()
        del q, k, v, dout, reference
        torch.cuda.empty_cache()
        write_feature_reports(out_dir, results, meta)  # a cut-short run keeps its rows

    log(f"\ndone in {time.perf_counter() - start:.0f} s\n")
    log(times_table(results))
    log("\nspeedup over full attention of the same provider:\n")
    log(speedup_table(results))
    for line in tables.not_measured(results):
        log(line)
    write_feature_reports(out_dir, results, meta)
    log(f"\nwrote {out_dir}/features.md and features.json")
    failed = any(r.provider == "flashtile" and r.status == "failed" for r in results)
    return 1 if failed else 0
