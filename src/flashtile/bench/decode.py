"""`flashtile bench --decode`: one query token against a KV cache (issue 5), flashtile beside SDPA.

Every case decodes seqlen_q = 1 token, bf16 (--dtype), D = 128 (--dims), GQA 8:1 (32 query heads
over 4 key/value heads), batch B in {1, 8, 64} (--batches) and cache length L in {1k, 16k, 128k}
(--seqlens), every entry's cache full (cache_seqlens = L). Providers:

    sdpa             torch's scaled_dot_product_attention, default backend, over the cache as
                     (B, 4, L, D) views of the same memory with enable_gqa=True; where that
                     would pick the math backend (or enable_gqa is missing), k and v expanded to
                     32 heads by repeat_interleave once, outside the timing (if memory allows)
    flashtile        flashtile.flash_attn_with_kvcache on the contiguous cache (B, L, 4, D),
                     cache_seqlens an int32 tensor of L, num_splits=0 (automatic split-KV)
    flashtile-paged  the same cache copied into pages of PAGE = 256 tokens whose order is
                     shuffled (a seeded randperm as block_table), so consecutive pages of an entry
                     lie anywhere in the pool

Memory is computed before anything is allocated: a case is skipped whose K and V
(B · L · 4 · D · 2 bytes · 2) do not fit in MEMORY_BUDGET (60 GiB) or the free memory, and a
provider is skipped whose extra tensors (the paged copy: the same bytes again; SDPA's expanded
k/v: 8 times them) do not fit in what is left. The contiguous cache is shared by all three.

Each provider is checked before it is timed: its output against a float64 reference on batch
entries 0 and B - 1, query heads 0, 1 and 31 (two kv heads, two query heads of one), all L keys,
by flashtile.testing's FlashAttention rule; flashtile's whole output is also compared with
SDPA's (max |diff| / max(1, |SDPA's out|) at most MAX_DIFF = 2e-2). Time: the median of
triton.testing.do_bench over one replay of the call captured in a CUDA graph (L2 flushed before
each replay by do_bench), as a serving loop runs its decoding steps: the GPU's work without the
host's. Beside it, "eager": do_bench over the plain call, host work included (each launch's
Python, and flash_attn_with_kvcache's one synchronization to validate cache_seqlens); a small
case's eager time is the host's, not the kernel's.

Reported per case and provider: time (µs); achieved bandwidth = the bytes of K and V read,
B · L · H_kv · D · itemsize · 2, divided by the time (GB/s, 1e9 bytes); its fraction of the
device copy bandwidth measured at the start of the run (run.py's ceilings(): a 1 GiB
device-to-device copy, bytes read + bytes written); and flashtile's speed relative to SDPA's
(SDPA's time ÷ flashtile's: > 1 flashtile is faster). Issue 5's target: flashtile's fraction
of the copy bandwidth >= 0.70 at cache lengths >= 16k (both flashtile providers are judged).
Writes decode.md and decode.json to the output folder.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from triton.testing import do_bench

import flashtile
from flashtile.bench import tables
from flashtile.bench.features import check_heads, output_diff
from flashtile.bench.measure import _first_line, time_mode
from flashtile.bench.providers import Forward, Unavailable
from flashtile.bench.report import _markdown, header
from flashtile.testing import assert_close, reference_attention, tolerance

PROVIDERS = ("sdpa", "flashtile", "flashtile-paged")  # sdpa first: the others compare with it
FLASHTILE = ("flashtile", "flashtile-paged")
HEADS = 32
KV_HEADS = 4
HEAD_DIM = 128
BATCHES = (1, 8, 64)
CACHE_LENS = (1024, 16384, 131072)
PAGE = 256
MEMORY_BUDGET = 60 * 2**30  # bytes of GPU memory a case may use
SAFETY = 2**30  # free memory left alone (allocator slack, the reference's temporaries)
# Issue 5: flashtile's achieved bandwidth at least this fraction of the device copy bandwidth,
# at cache lengths of at least TARGET_MIN_CACHE.
TARGET_FRACTION = 0.70
TARGET_MIN_CACHE = 16384
MAX_DIFF = 2e-2  # max |out - SDPA's out| / max(1, |SDPA's out|)
CHECK_HEADS = (0, 1, -1)

SDPA_BACKENDS = {"MATH": "math", "FLASH_ATTENTION": "flash", "EFFICIENT_ATTENTION": "efficient",
                 "CUDNN_ATTENTION": "cudnn", "OVERRIDEABLE": "overrideable", "ERROR": "none"}


# ---------------------------------------------------------------------------------------------
# The cases


@dataclass(frozen=True)
class DecodeCase:
    """One decoding step: q (batch, 1, heads, head_dim) against a full cache of cache_len keys
    per entry, (batch, cache_len, kv_heads, head_dim) for K and for V; itemsize: bytes per
    element (2 for bf16)."""

    batch: int
    cache_len: int
    heads: int = HEADS
    kv_heads: int = KV_HEADS
    head_dim: int = HEAD_DIM
    page: int = PAGE
    itemsize: int = 2

    def label(self) -> str:
        return f"B={self.batch} cache={self.cache_len}"

    @property
    def group(self) -> int:
        return self.heads // self.kv_heads

    def kv_bytes(self) -> int:
        """Bytes of K and V read by one decoding step: B · L · H_kv · D · itemsize · 2."""
        return self.batch * self.cache_len * self.kv_heads * self.head_dim * self.itemsize * 2

    def pages_per_entry(self) -> int:
        return -(-self.cache_len // self.page)

    def paged_bytes(self) -> int:
        """The paged copy of K and V: whole pages, B · ceil(L / page) of them."""
        return (self.batch * self.pages_per_entry() * self.page * self.kv_heads * self.head_dim
                * self.itemsize * 2)

    def expanded_bytes(self) -> int:
        """K and V repeated to every query head (SDPA without enable_gqa)."""
        return self.kv_bytes() * self.group

    def gbps(self, ms: float) -> float:
        """Achieved bandwidth: kv_bytes() / time, in GB/s (1e9 bytes per second)."""
        return self.kv_bytes() / (ms * 1e-3) / 1e9


def decode_cases(batches=BATCHES, cache_lens=CACHE_LENS, heads: int = HEADS,
                 kv_heads: int = KV_HEADS, head_dim: int = HEAD_DIM, itemsize: int = 2,
                 page: int = PAGE) -> list[DecodeCase]:
    """Every (cache length, batch), cache length outer."""
    if heads % kv_heads:
        raise ValueError(f"{heads} query heads are not a multiple of {kv_heads} kv heads")
    return [DecodeCase(b, n, heads, kv_heads, head_dim, page, itemsize)
            for n in cache_lens for b in batches]


def case_memory(case: DecodeCase, provider: str, expand: bool = False) -> int:
    """Bytes one provider needs on the GPU for `case`: the shared contiguous cache, plus its own
    copy (paged) or expansion (SDPA without enable_gqa); q and out are negligible."""
    extra = {"flashtile-paged": case.paged_bytes(),
             "sdpa": case.expanded_bytes() if expand else 0}.get(provider, 0)
    return case.kv_bytes() + extra


def fits(case: DecodeCase, budget: int = MEMORY_BUDGET) -> bool:
    """Whether the shared cache fits in `budget` bytes (with SAFETY left over)."""
    return case.kv_bytes() + SAFETY <= budget


# ---------------------------------------------------------------------------------------------
# Providers: factory(case, q, k_cache, v_cache, spare) -> (forward, detail); forward returns out
# (B, 1, H, D); spare: bytes the provider may allocate beyond the shared cache.

DecodeFactory = Callable[[DecodeCase, torch.Tensor, torch.Tensor, torch.Tensor, int],
                         tuple[Forward, str]]


def sdpa_backend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 attn_mask: torch.Tensor | None = None, enable_gqa: bool = False) -> str:
    """The backend torch's SDPA picks for these inputs (torch._fused_sdp_choice, which launches
    nothing): flash, efficient, cudnn or math; "unknown" where torch cannot say."""
    try:
        from torch.nn.attention import SDPBackend

        kwargs = {"enable_gqa": True} if enable_gqa else {}
        choice = torch._fused_sdp_choice(q, k, v, attn_mask=attn_mask, dropout_p=0.0,
                                         is_causal=False, **kwargs)
        return SDPA_BACKENDS.get(SDPBackend(choice).name, "unknown")
    except Exception:
        return "unknown"


def sdpa_decode(case: DecodeCase, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                spare: int) -> tuple[Forward, str]:
    """SDPA's default backend over (B, H, 1, D) and (B, H_kv, L, D) views of the same memory,
    with enable_gqa=True; k and v expanded to H heads (once, here) where that would be math."""
    qs, ks, vs = (t.transpose(1, 2) for t in (q, k_cache, v_cache))
    if case.group == 1:
        backend = sdpa_backend(qs, ks, vs)
        return (lambda: F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2),
                f"{backend} backend")
    backend = sdpa_backend(qs, ks, vs, enable_gqa=True)
    if backend not in ("math", "unknown", "none"):
        def forward() -> torch.Tensor:
            return F.scaled_dot_product_attention(qs, ks, vs, enable_gqa=True).transpose(1, 2)

        return forward, f"{backend} backend, enable_gqa=True"
    need = case.expanded_bytes()
    if need > spare:
        raise Unavailable(f"with enable_gqa SDPA would run its {backend} backend, and k/v "
                          f"expanded to {case.heads} heads need {need / 2**30:.1f} GiB, over the "
                          f"{spare / 2**30:.1f} GiB left")
    ke, ve = (t.repeat_interleave(case.group, dim=1) for t in (ks, vs))
    backend = sdpa_backend(qs, ke, ve)

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(qs, ke, ve).transpose(1, 2)

    return forward, f"{backend} backend, k/v expanded to {case.heads} heads (untimed)"


def _auto_splits(case: DecodeCase, device: torch.device) -> int | None:
    """The split count flash_attn_with_kvcache's num_splits=0 chooses here, for the report."""
    try:
        from flashtile.interface import _auto_splits, _decode_programs

        programs = _decode_programs(case.batch, case.heads, case.kv_heads, 1)
        return _auto_splits(programs, case.cache_len, device)
    except Exception:
        return None


def flashtile_decode(case: DecodeCase, q: torch.Tensor, k_cache: torch.Tensor,
                     v_cache: torch.Tensor, spare: int) -> tuple[Forward, str]:
    """flash_attn_with_kvcache on the contiguous cache, cache_seqlens = L (made once, here)."""
    seqlens = torch.full((case.batch,), case.cache_len, dtype=torch.int32, device=q.device)

    def forward() -> torch.Tensor:
        return flashtile.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens,
                                                 num_splits=0)

    return forward, f"contiguous cache, num_splits=0 (auto: {_auto_splits(case, q.device)})"


def shuffled_block_table(batch: int, pages: int, device=None, seed: int = 0) -> torch.Tensor:
    """(batch, pages) int32: a seeded permutation of the batch · pages pool pages."""
    generator = torch.Generator().manual_seed(seed)
    return torch.randperm(batch * pages, generator=generator).view(batch, pages).to(
        device=device, dtype=torch.int32)


def paged_copy(case: DecodeCase, cache: torch.Tensor, block_table: torch.Tensor) -> torch.Tensor:
    """The contiguous cache (B, L, H_kv, D) copied into a pool of pages (B · P, page, H_kv, D):
    token t of entry b at page block_table[b, t // page], row t % page. Rows past L are zero."""
    b, n, hk, d = cache.shape
    page, pages = case.page, case.pages_per_entry()
    pool = (cache.new_zeros if n % page else cache.new_empty)(b * pages, page, hk, d)
    index = block_table.long()
    full = n // page
    if full:
        pool[index[:, :full].flatten()] = cache[:, :full * page].reshape(b * full, page, hk, d)
    if n % page:
        pool[index[:, full], :n % page] = cache[:, full * page:]
    return pool


def flashtile_paged_decode(case: DecodeCase, q: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, spare: int) -> tuple[Forward, str]:
    """flash_attn_with_kvcache on a paged copy of the cache (pages of case.page tokens, the
    block_table a seeded shuffle), built here, untimed."""
    need = case.paged_bytes()
    if need > spare:
        raise Unavailable(f"the paged copy needs {need / 2**30:.1f} GiB, over the "
                          f"{spare / 2**30:.1f} GiB left")
    table = shuffled_block_table(case.batch, case.pages_per_entry(), q.device)
    k_pages, v_pages = (paged_copy(case, t, table) for t in (k_cache, v_cache))
    seqlens = torch.full((case.batch,), case.cache_len, dtype=torch.int32, device=q.device)

    def forward() -> torch.Tensor:
        return flashtile.flash_attn_with_kvcache(q, k_pages, v_pages, cache_seqlens=seqlens,
                                                 block_table=table, num_splits=0)

    return forward, (f"pages of {case.page} tokens, shuffled block_table, num_splits=0 "
                     f"(auto: {_auto_splits(case, q.device)})")


FACTORIES: dict[str, DecodeFactory] = {"sdpa": sdpa_decode, "flashtile": flashtile_decode,
                                       "flashtile-paged": flashtile_paged_decode}


# ---------------------------------------------------------------------------------------------
# Checking and timing


def check_entries(batch: int) -> list[int]:
    """The batch entries checked: the first and the last."""
    return sorted({0, batch - 1})


def check_decode(case: DecodeCase, out: torch.Tensor, q: torch.Tensor, k_cache: torch.Tensor,
                 v_cache: torch.Tensor) -> tuple[float, float, str]:
    """(max error, tolerance, message) of out (B, 1, H, D) against the float64 reference on
    check_entries, the query heads check_heads (with their kv heads) and all keys; message is
    empty when every entry passed. Tolerance: the largest of the entries'."""
    heads = check_heads(case.heads)
    q_index = torch.tensor(heads, device=q.device)
    kv_index = torch.tensor([h // case.group for h in heads], device=q.device)
    worst, worst_tol, message = 0.0, 0.0, ""
    for b in check_entries(case.batch):
        q_s = q[b:b + 1].index_select(2, q_index)
        k_s, v_s = (t[b:b + 1, :case.cache_len].index_select(2, kv_index)
                    for t in (k_cache, v_cache))
        ref = reference_attention(q_s, k_s, v_s, dtype=torch.float64).out
        base = reference_attention(q_s, k_s, v_s).out
        tol = tolerance(ref, base, q.dtype)
        got = out[b:b + 1].index_select(2, q_index)
        err = (got.double() - ref).abs().max().item()
        worst, worst_tol = max(worst, err), max(worst_tol, tol)
        try:
            assert_close(f"out entry {b}", got, ref, tol)
        except AssertionError as e:
            message = message or str(e).splitlines()[0]
        del ref, base
    return worst, worst_tol, message


@dataclass
class DecodeResult:
    """One provider on one case; status as measure.Result's ("ok", "skipped", "failed",
    "error"). ms: median time of one call; gbps: kv_bytes / time; check_err / check_tol:
    against the float64 reference; diff: output_diff to SDPA's out (None for SDPA itself, or
    when SDPA did not pass); detail: how the provider ran (backend, splits)."""

    case: DecodeCase
    provider: str
    status: str
    ms: float | None = None
    gbps: float | None = None
    eager_ms: float | None = None
    check_err: float | None = None
    check_tol: float | None = None
    diff: float | None = None
    detail: str = ""
    note: str = ""

    @property
    def us(self) -> float | None:
        return self.ms * 1e3 if self.ms is not None else None


def measure_decode(case: DecodeCase, name: str, factory: DecodeFactory, q: torch.Tensor,
                   k_cache: torch.Tensor, v_cache: torch.Tensor, spare: int, warmup_ms: int,
                   rep_ms: int, compare_to: torch.Tensor | None = None,
                   log: Callable[[str], object] = print
                   ) -> tuple[DecodeResult, torch.Tensor | None]:
    """Check, then time, one provider on one case: its result and its output (None if it did
    not run). Nothing a provider raises escapes: it becomes a "skipped" or "error" result."""

    def done(status: str, note: str, **fields) -> DecodeResult:
        log(f"{case.label()} {name}: {status} ({note})")
        return DecodeResult(case, name, status, note=note, **fields)

    start = time.perf_counter()
    try:
        forward, detail = factory(case, q, k_cache, v_cache, spare)
        out = forward().detach()
    except Unavailable as e:
        return done("skipped", str(e)), None
    except Exception as e:
        return done("skipped", f"does not run: {_first_line(e)}"), None
    first_s = time.perf_counter() - start
    try:
        err, tol, message = check_decode(case, out, q, k_cache, v_cache)
    except Exception as e:  # the reference itself, e.g. out of memory
        return done("skipped", f"could not be checked: {_first_line(e)}", detail=detail), out
    diff = None
    if compare_to is not None:
        diff = output_diff(out, compare_to)
        if not message and not diff <= MAX_DIFF:
            message = (f"max |out - SDPA's out| / max(1, |SDPA's|) {diff:.3e} > {MAX_DIFF:.0e} "
                       "(outside the checked entries one of the two is wrong)")
    checked = dict(check_err=err, check_tol=tol, diff=diff, detail=detail)
    if message:
        return done("failed", message, **checked), out
    vs = f", max |diff| to SDPA {diff:.2e}" if diff is not None else ""
    log(f"{case.label()} {name}: {detail}; first call {first_s:.1f} s; check ok (max err "
        f"{err:.2e} <= tol {tol:.2e}{vs})")
    try:
        eager_ms = time_mode(forward, "fwd", None, [], warmup_ms, rep_ms)
        ms = time_graph(forward, warmup_ms, rep_ms)
    except Exception as e:
        return done("error", _first_line(e), **checked), out
    result = DecodeResult(case, name, "ok", ms=ms, gbps=case.gbps(ms), eager_ms=eager_ms,
                          **checked)
    log(f"{case.label()} {name}: {result.us:10.1f} µs {result.gbps:7.0f} GB/s (CUDA graph); "
        f"eager {eager_ms * 1e3:.1f} µs")
    return result, out


def time_graph(forward: Forward, warmup_ms: int, rep_ms: int) -> float:
    """Median milliseconds of one replay of `forward` captured in a CUDA graph, L2 flushed
    before each replay (do_bench). The call runs a few times on a side stream first, as capture
    requires (and so that no autotuning happens inside it)."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        forward()
    return do_bench(graph.replay, warmup=warmup_ms, rep=rep_ms, return_mode="median")


def decode_inputs(case: DecodeCase, dtype: torch.dtype, device="cuda"
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """q (B, 1, H, D), k_cache and v_cache (B, L, H_kv, D): standard normal, seeded."""
    torch.manual_seed(0)
    q = torch.randn(case.batch, 1, case.heads, case.head_dim, device=device, dtype=dtype)
    size = (case.batch, case.cache_len, case.kv_heads, case.head_dim)
    k_cache, v_cache = (torch.randn(size, device=device, dtype=dtype) for _ in range(2))
    return q, k_cache, v_cache


# ---------------------------------------------------------------------------------------------
# Reports: pure Python over DecodeResults, tested on the CPU


def _index(results: list[DecodeResult]) -> dict[tuple[DecodeCase, str], DecodeResult]:
    """tables.index's, without a mode: a decoding step has only its forward."""
    return {(r.case, r.provider): r for r in results}


def copy_fraction(gbps: float | None, copy_gbps: float | None) -> float | None:
    """Achieved bandwidth as a fraction of the device copy bandwidth (None if either is)."""
    if gbps is None or not copy_gbps:
        return None
    return gbps / copy_gbps


def targeted(case: DecodeCase) -> bool:
    """Whether issue 5's bandwidth target applies: cache length >= TARGET_MIN_CACHE."""
    return case.cache_len >= TARGET_MIN_CACHE


def summary(results: list[DecodeResult], copy_gbps: float | None) -> list[dict]:
    """One dict per case: per provider µs, GB/s and fraction of the copy bandwidth, each
    flashtile provider's speed relative to SDPA (SDPA's time ÷ its), and, where the target
    applies, whether each flashtile provider meets it (None where not measured)."""
    by = _index(results)
    rows = []
    for case in tables.cases(results):
        row = dict(batch=case.batch, cache_len=case.cache_len, kv_bytes=case.kv_bytes(),
                   providers={}, target=TARGET_FRACTION if targeted(case) else None)
        sdpa = by.get((case, "sdpa"))
        for p in dict.fromkeys(r.provider for r in results):
            r = by.get((case, p))
            if r is None:
                continue
            ok = tables.ms(r) is not None
            fraction = copy_fraction(r.gbps, copy_gbps) if ok else None
            entry = dict(status=r.status, us=r.us if ok else None,
                         eager_us=r.eager_ms * 1e3 if ok and r.eager_ms else None,
                         gbps=r.gbps if ok else None, copy_fraction=fraction)
            if p in FLASHTILE:
                sdpa_ms = tables.ms(sdpa)
                entry["speed_vs_sdpa"] = sdpa_ms / r.ms if sdpa_ms is not None and ok else None
                entry["met"] = (fraction >= TARGET_FRACTION
                                if targeted(case) and fraction is not None else None)
            row["providers"][p] = entry
        rows.append(row)
    return rows


def target_counts(results: list[DecodeResult], copy_gbps: float | None) -> dict[str, list[int]]:
    """Per flashtile provider: [cases meeting the target, cases judged]."""
    counts: dict[str, list[int]] = {}
    for row in summary(results, copy_gbps):
        for p, entry in row["providers"].items():
            if p in FLASHTILE and entry.get("met") is not None:
                tally = counts.setdefault(p, [0, 0])
                tally[0] += bool(entry["met"])
                tally[1] += 1
    return counts


def times_table(results: list[DecodeResult], copy_gbps: float | None) -> str:
    """One row per case: K+V MiB read; each provider's µs (CUDA graph replay), GB/s and % of
    the copy bandwidth; each flashtile provider's speed ÷ SDPA's; the target and whether it is
    met; each provider's eager µs (host work included)."""
    providers = tables.providers(results)
    by = _index(results)
    ours = [p for p in providers if p in FLASHTILE]
    ratio = [p for p in ours if "sdpa" in providers]
    head = (["cache", "B", "K+V MiB"] + [f"{p} µs" for p in providers]
            + [f"{p} GB/s" for p in providers] + [f"{p} % copy" for p in providers]
            + [f"{p} ÷ sdpa" for p in ratio] + ["target"] + [f"{p} meets" for p in ours]
            + [f"{p} eager µs" for p in providers])
    rows = []
    for case, row in zip(tables.cases(results), summary(results, copy_gbps)):
        cells = [by.get((case, p)) for p in providers]
        entries = [row["providers"].get(p, {}) for p in providers]
        line = [str(case.cache_len), str(case.batch), f"{case.kv_bytes() / 2**20:,.0f}"]
        line += [tables.cell(r, e.get("us"), "{:.1f}") for r, e in zip(cells, entries)]
        line += [tables.cell(r, e.get("gbps"), "{:.0f}") for r, e in zip(cells, entries)]
        line += [tables.cell(r, None if e.get("copy_fraction") is None
                             else 100 * e["copy_fraction"], "{:.0f}%")
                 for r, e in zip(cells, entries)]
        line += [f"{row['providers'][p]['speed_vs_sdpa']:.2f}"
                 if row["providers"].get(p, {}).get("speed_vs_sdpa") else "-" for p in ratio]
        line.append(f">= {100 * TARGET_FRACTION:.0f}%" if row["target"] else "-")
        for p in ours:
            met = row["providers"].get(p, {}).get("met")
            line.append("-" if met is None else ("yes" if met else "NO"))
        line += [tables.cell(r, e.get("eager_us"), "{:.1f}") for r, e in zip(cells, entries)]
        rows.append(line)
    return _markdown(head, rows)


def check_table(results: list[DecodeResult]) -> str:
    """One row per case × provider that was checked, with how it ran."""
    rows = [[str(r.case.cache_len), str(r.case.batch), r.provider, f"{r.check_err:.2e}",
             f"{r.check_tol:.2e}", f"{r.diff:.2e}" if r.diff is not None else "-",
             "ok" if r.status != "failed" else "FAIL", r.detail]
            for r in results if r.check_err is not None]
    return _markdown(["cache", "B", "provider", "max err vs float64", "tolerance",
                      "max diff to sdpa", "check", "how it ran"], rows)


def decode_markdown(results: list[DecodeResult], meta: dict) -> str:
    copy_gbps = (meta.get("ceilings") or {}).get("copy_gbps")
    facts = [line for line in header(meta).splitlines() if not line.startswith("- TFLOP/s")]
    case = results[0].case if results else DecodeCase(1, 1)
    facts.append(f"- one query token (seqlen_q = 1) against a full KV cache: {case.heads} query "
                 f"heads, {case.kv_heads} kv heads (GQA {case.group}:1), D = {case.head_dim}; "
                 f"paged cache: pages of {case.page} tokens, shuffled block_table")
    facts.append("- bandwidth = bytes of K and V read (B · L · H_kv · D · itemsize · 2) / time; "
                 "% copy = that ÷ the device copy bandwidth above; ÷ sdpa = SDPA's time ÷ "
                 "flashtile's (> 1: flashtile is faster)")
    facts.append("- a time is one call's, host work included (flash_attn_with_kvcache checks "
                 "cache_seqlens on the host: a device synchronization per call); do_bench "
                 "flushes the L2 cache before each call")
    counts = target_counts(results, copy_gbps)
    met = "; ".join(f"{p}: met at {n} of {m} cases" for p, (n, m) in counts.items())
    parts = ["# flashtile decode benchmark (issue 5)", "\n".join(facts),
             "## Times and bandwidth (median)",
             f"Issue 5's target: flashtile's bandwidth >= {100 * TARGET_FRACTION:.0f}% of the "
             f"device copy bandwidth at cache >= {TARGET_MIN_CACHE // 1024}k. "
             + (met + "." if met else "Not judged (nothing measured or no copy ceiling)."),
             times_table(results, copy_gbps),
             "## Checks before timing",
             "Against the float64 reference on batch entries 0 and B - 1, query heads 0, 1 and "
             "the last, all keys (FlashAttention's tolerance rule); diff to SDPA over the whole "
             f"output: max |out - SDPA's| / max(1, |SDPA's|), at most {MAX_DIFF:g}.",
             check_table(results)]
    lines = tables.not_measured(results, modes=False)
    if lines:
        parts += ["## Not measured", "\n".join(lines)]
    return "\n\n".join(parts) + "\n"


def write_decode_reports(out_dir: Path, results: list[DecodeResult], meta: dict) -> None:
    """decode.md and decode.json (metadata, results, per-case summary, target)."""
    copy_gbps = (meta.get("ceilings") or {}).get("copy_gbps")
    data = {"metadata": meta,
            "results": [{**asdict(r), "us": r.us, "kv_bytes": r.case.kv_bytes(),
                         "copy_fraction": copy_fraction(r.gbps, copy_gbps)} for r in results],
            "summary": summary(results, copy_gbps),
            "target": {"copy_fraction": TARGET_FRACTION, "min_cache_len": TARGET_MIN_CACHE,
                       "met": {p: {"met": n, "judged": m}
                               for p, (n, m) in target_counts(results, copy_gbps).items()}}}
    tables.write_report(out_dir, "decode", decode_markdown(results, meta), data)


# ---------------------------------------------------------------------------------------------
# The run (called by bench/run.py's main with --decode, on a GPU)


def run_decode(args, meta: dict, out_dir: Path, dtype: torch.dtype, preset,
               log: Callable[[str], object] = print) -> int:
    """Every case at --batches × --seqlens (cache lengths) × --dims, on the providers of
    --providers (from PROVIDERS), else of `preset` (run.PRESETS["decode"]). Exit status: 1 when
    a flashtile provider failed a check, 2 for a provider outside PROVIDERS or bad sizes,
    else 0."""
    providers = args.providers or list(preset.providers)
    unknown = [p for p in providers if p not in FACTORIES]
    if unknown:
        log(f"flashtile bench --decode: {', '.join(unknown)} not in the decode set; choose from "
            f"{', '.join(PROVIDERS)}")
        return 2
    providers = sorted(dict.fromkeys(providers), key=PROVIDERS.index)  # sdpa first
    if args.modes and list(args.modes) != ["fwd"]:
        log("flashtile bench --decode: decoding is inference, only its forward is timed")
    itemsize = torch.empty((), dtype=dtype).element_size()
    try:
        cases = [c for d in (args.dims or preset.dims)
                 for c in decode_cases(getattr(args, "batches", None) or BATCHES,
                                       args.seqlens or preset.seqlens,
                                       heads=preset.heads or HEADS, head_dim=d,
                                       itemsize=itemsize)]
    except ValueError as e:
        log(f"flashtile bench --decode: {e}")
        return 2
    copy_gbps = (meta.get("ceilings") or {}).get("copy_gbps")
    log(f"decode: {len(cases)} cases × {len(providers)} providers ({', '.join(providers)}); "
        f"writing to {out_dir}/")
    start = time.perf_counter()
    results: list[DecodeResult] = []
    for i, case in enumerate(cases, 1):
        torch.cuda.empty_cache()
        free, _ = torch.cuda.mem_get_info()
        budget = min(MEMORY_BUDGET, free)
        log(f"[{i}/{len(cases)}, {time.perf_counter() - start:.0f} s] {case.label()}: K+V "
            f"{case.kv_bytes() / 2**30:.2f} GiB")
        if not fits(case, budget):
            note = (f"K and V need {case.kv_bytes() / 2**30:.1f} GiB, over the "
                    f"{budget / 2**30:.1f} GiB budget")
            log(f"{case.label()}: skipped ({note})")
            results += [DecodeResult(case, p, "skipped", note=note) for p in providers]
            continue
        q, k_cache, v_cache = decode_inputs(case, dtype)
        reference = None
        for name in providers:
            used = torch.cuda.memory_allocated()
            free, _ = torch.cuda.mem_get_info()
            spare = max(0, min(MEMORY_BUDGET - used, free - SAFETY))
            result, out = measure_decode(case, name, FACTORIES[name], q, k_cache, v_cache, spare,
                                         preset.warmup_ms, preset.rep_ms, compare_to=reference,
                                         log=log)
            results.append(result)
            if name == "sdpa" and result.status in ("ok", "error"):  # passed its check
                reference = out
            del out
            torch.cuda.empty_cache()
        del q, k_cache, v_cache, reference
        write_decode_reports(out_dir, results, meta)  # a cut-short run keeps its rows

    log(f"\ndone in {time.perf_counter() - start:.0f} s\n")
    log(times_table(results, copy_gbps))
    for p, (n, m) in target_counts(results, copy_gbps).items():
        log(f"issue 5 target (>= {100 * TARGET_FRACTION:.0f}% of copy bandwidth at cache >= "
            f"{TARGET_MIN_CACHE // 1024}k): {p} met at {n} of {m}")
    for line in tables.not_measured(results, modes=False):
        log(line)
    write_decode_reports(out_dir, results, meta)
    log(f"\nwrote {out_dir}/decode.md and decode.json")
    failed = any(r.provider in FLASHTILE and r.status == "failed" for r in results)
    return 1 if failed else 0

