"""`flashtile bench --varlen`: a packed training batch of unequal sequences (issue 5), varlen
beside the zero-padded dense batch.

The batch: sequence lengths drawn log-uniformly from [MIN_LEN, MAX_LEN] = [64, 8192] with a
fixed seed (random.Random(SEED), n = round(exp(uniform(ln 64, ln 8192)))) until they total
TOTAL_TOKENS = 32768 tokens (--seqlens sets other totals); a draw that would overshoot is cut
to what is left, and dropped if that is under 64. bf16 (--dtype), D = 128 (--dims), 16 heads,
non-causal and causal, modes fwd, bwd and fwdbwd (--modes). Providers:

    flashtile-varlen  flashtile.flash_attn_varlen_func on the packed (total, 16, D) tensors
    flashtile-padded  flashtile.flash_attn_func on the zero-padded dense batch: batch = the
                      number of sequences, seqlen = the longest, no mask, so it does all the
                      padded work (non-causal, real queries also attend to the zero padding
                      keys: the cost baseline the target is defined against, not the same
                      function; causal, right padding is invisible to real queries)
    sdpa-padded       torch SDPA, default backend, on the padded batch with a boolean attn_mask
                      keeping only real keys (and, causal, only keys j <= i): the same function
                      as varlen on the real tokens. The backend SDPA picks is reported.

Counts, for lengths n_1 .. n_B, M = max n_b:
    token padding   1 - Σ n_b / (B · M)
    pairs           non-causal Σ n_b², causal Σ n_b (n_b + 1) / 2 (the unmasked pairs)
    padded pairs    non-causal B · M², causal B · M (M + 1) / 2
    pair padding    1 - pairs / padded pairs
    speedup         flashtile-padded's time ÷ flashtile-varlen's, per mode
    target          speedup >= TARGET_EFFICIENCY / (1 - pair padding)
                             = 0.9 · padded pairs / pairs
i.e. varlen must turn at least 90% of the padded work it avoids into time saved. TFLOP/s count
only the real pairs for every provider (4 · H · pairs · D, bwd × 2.5, fwdbwd × 3.5).

Each provider is checked before it is timed: its output on the real tokens against a float64
reference on the shortest and the longest sequence (their last CHECK_ROWS query rows, query
heads 0, 1 and the last, all keys; flashtile-padded's non-causal reference includes the zero
padding keys it attends to) by flashtile.testing's rule; and, except flashtile-padded
non-causal, its whole real-token output against a dense flashtile run on the padded batch whose
padding is masked out (flash_attn_func with masks.document: 0 for real tokens, 1 for padding;
run once per case, untimed): max |diff| / max(1, |dense|) at most MAX_DIFF. Then each mode is
timed as in the grid (measure.time_mode). Writes varlen.md and varlen.json.
"""

from __future__ import annotations

import math
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

import flashtile
from flashtile.bench import tables
from flashtile.bench.decode import sdpa_backend
from flashtile.bench.features import check_heads, output_diff
from flashtile.bench.measure import FLOP_FACTOR, _first_line, time_mode
from flashtile.bench.providers import Forward, Unavailable
from flashtile.bench.report import _markdown, _number, header
from flashtile.testing import assert_close, reference_attention, tolerance

PROVIDERS = ("flashtile-varlen", "flashtile-padded", "sdpa-padded")
VARLEN, PADDED = "flashtile-varlen", "flashtile-padded"
HEADS = 16
HEAD_DIM = 128
TOTAL_TOKENS = 32768
MIN_LEN = 64
MAX_LEN = 8192
SEED = 0
TARGET_EFFICIENCY = 0.9
CHECK_ROWS = 1024  # query rows checked per sequence: its last ones
MAX_DIFF = 2e-2  # max |out - dense's| / max(1, |dense's|) over the real tokens


# ---------------------------------------------------------------------------------------------
# The batch and its counts


def draw_lengths(total: int = TOTAL_TOKENS, low: int = MIN_LEN, high: int = MAX_LEN,
                 seed: int = SEED) -> list[int]:
    """Sequence lengths log-uniform in [low, high] (rounded), seeded, summing to `total` unless
    the last remainder was under `low` (then dropped: the sum falls short by less than low)."""
    if not 1 <= low <= high or total < low:
        raise ValueError(f"cannot draw sequences of {low} to {high} tokens totalling {total}")
    rng = random.Random(seed)
    lengths: list[int] = []
    used = 0
    while used < total:
        n = min(round(math.exp(rng.uniform(math.log(low), math.log(high)))), total - used)
        if n < low:
            break
        lengths.append(n)
        used += n
    return lengths


@dataclass(frozen=True)
class Packing:
    """A packed batch: the lengths of its sequences, heads and head dim."""

    lengths: tuple[int, ...]
    heads: int = HEADS
    head_dim: int = HEAD_DIM

    @property
    def batch(self) -> int:
        return len(self.lengths)

    @property
    def total(self) -> int:
        return sum(self.lengths)

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    @property
    def padded_tokens(self) -> int:
        return self.batch * self.max_len

    def cu_seqlens(self) -> list[int]:
        out = [0]
        for n in self.lengths:
            out.append(out[-1] + n)
        return out

    def token_padding(self) -> float:
        """1 - real tokens / padded tokens."""
        return 1 - self.total / self.padded_tokens

    def pairs(self, causal: bool) -> int:
        """Unmasked (query, key) pairs per head over the real tokens."""
        return sum(n * (n + 1) // 2 if causal else n * n for n in self.lengths)

    def padded_pairs(self, causal: bool) -> int:
        """The pairs a dense kernel computes per head on the padded batch."""
        m = self.max_len
        return self.batch * (m * (m + 1) // 2 if causal else m * m)

    def pair_padding(self, causal: bool) -> float:
        """1 - pairs / padded pairs."""
        return 1 - self.pairs(causal) / self.padded_pairs(causal)

    def target_speedup(self, causal: bool) -> float:
        """TARGET_EFFICIENCY / (1 - pair padding) = 0.9 · padded pairs / pairs."""
        return TARGET_EFFICIENCY * self.padded_pairs(causal) / self.pairs(causal)

    def flops(self, causal: bool, mode: str) -> float:
        """4 · H · pairs · D (the real pairs only), times measure.FLOP_FACTOR[mode]."""
        return FLOP_FACTOR[mode] * 4 * self.heads * self.pairs(causal) * self.head_dim

    def describe(self) -> str:
        return (f"{self.batch} sequences of {min(self.lengths)} to {self.max_len} tokens, "
                f"{self.total} in all, {self.heads} heads, D = {self.head_dim}")


def packing(total: int = TOTAL_TOKENS, heads: int = HEADS, head_dim: int = HEAD_DIM,
            seed: int = SEED) -> Packing:
    return Packing(tuple(draw_lengths(total, seed=seed)), heads, head_dim)


@dataclass(frozen=True)
class VarlenCase:
    packing: Packing
    causal: bool

    @property
    def name(self) -> str:
        return "causal" if self.causal else "non-causal"

    def label(self) -> str:
        p = self.packing
        return f"{self.name} total={p.total} B={p.batch} max={p.max_len} D={p.head_dim}"

    def flops(self, mode: str) -> float:
        return self.packing.flops(self.causal, mode)

    def key(self) -> dict:
        """What identifies the case in the JSON (the lengths are written once, with the batch)."""
        p = self.packing
        return dict(name=self.name, causal=self.causal, total=p.total, batch=p.batch,
                    max_len=p.max_len, heads=p.heads, head_dim=p.head_dim)


def padding_index(lengths, max_len: int, device=None) -> torch.Tensor:
    """(total,) int64: packed token t of sequence b at position i sits at row b · max_len + i of
    the padded batch flattened to (B · max_len, ...)."""
    rows = [b * max_len + i for b, n in enumerate(lengths) for i in range(n)]
    return torch.tensor(rows, dtype=torch.int64, device=device)


def key_keep(lengths, max_len: int, device=None) -> torch.Tensor:
    """(B, max_len) bool: True at real tokens."""
    n = torch.tensor(list(lengths), device=device)
    return torch.arange(max_len, device=device)[None, :] < n[:, None]


def sdpa_mask(lengths, max_len: int, causal: bool, device=None) -> torch.Tensor:
    """SDPA's boolean attn_mask (True = attend): real keys, (B, 1, 1, max_len); causal also
    keys j <= i, (B, 1, max_len, max_len). No row is empty (every row sees key 0)."""
    keep = key_keep(lengths, max_len, device)[:, None, None, :]
    if causal:
        keep = keep & torch.ones(max_len, max_len, dtype=torch.bool, device=device).tril()
    return keep


def pad(packed: torch.Tensor, lengths, max_len: int, index: torch.Tensor | None = None
        ) -> torch.Tensor:
    """(total, ...) -> (B, max_len, ...) with zeros at the padding."""
    index = padding_index(lengths, max_len, packed.device) if index is None else index
    out = packed.new_zeros(len(lengths) * max_len, *packed.shape[1:])
    out[index] = packed
    return out.view(len(lengths), max_len, *packed.shape[1:])


def unpad(padded: torch.Tensor, lengths, index: torch.Tensor | None = None) -> torch.Tensor:
    """(B, max_len, ...) -> (total, ...), the real tokens."""
    max_len = padded.shape[1]
    index = padding_index(lengths, max_len, padded.device) if index is None else index
    return padded.reshape(-1, *padded.shape[2:])[index]


@dataclass
class VarlenInputs:
    """Packed q, k, v (total, H, D) with requires_grad, and dout; the same values zero-padded
    in SDPA's layout (B, H, max_len, D) as their own leaves, and dout (zero at the padding)."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    qp: torch.Tensor
    kp: torch.Tensor
    vp: torch.Tensor
    doutp: torch.Tensor
    cu_seqlens: torch.Tensor
    index: torch.Tensor

    def real(self, padded_bhnd: torch.Tensor, lengths) -> torch.Tensor:
        """(B, H, max_len, D) -> (total, H, D)."""
        return unpad(padded_bhnd.transpose(1, 2), lengths, self.index)


def varlen_inputs(p: Packing, dtype: torch.dtype, device="cuda") -> VarlenInputs:
    torch.manual_seed(0)
    size = (p.total, p.heads, p.head_dim)
    q, k, v, dout = (torch.randn(size, device=device, dtype=dtype) for _ in range(4))
    index = padding_index(p.lengths, p.max_len, device)

    def padded(t: torch.Tensor, grad: bool) -> torch.Tensor:
        out = pad(t, p.lengths, p.max_len, index).transpose(1, 2).contiguous()
        return out.requires_grad_(grad)

    qp, kp, vp = (padded(t, True) for t in (q, k, v))
    cu = torch.tensor(p.cu_seqlens(), dtype=torch.int32, device=device)
    return VarlenInputs(q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), dout,
                        qp, kp, vp, padded(dout, False), cu, index)


# ---------------------------------------------------------------------------------------------
# Providers: factory(case, inputs) -> Setup


@dataclass
class Setup:
    """forward() -> out in the provider's own layout; leaves and dout for the backward; real:
    out -> (total, H, D) at the real tokens; sees_padding: real queries attend to padding keys
    (so its output is not varlen's function); detail: how it runs."""

    forward: Forward
    leaves: list[torch.Tensor]
    dout: torch.Tensor
    real: Callable[[torch.Tensor], torch.Tensor]
    detail: str = ""
    sees_padding: bool = False


VarlenFactory = Callable[[VarlenCase, VarlenInputs], Setup]


def flashtile_varlen(case: VarlenCase, inp: VarlenInputs) -> Setup:
    p = case.packing

    def forward() -> torch.Tensor:
        return flashtile.flash_attn_varlen_func(inp.q, inp.k, inp.v, inp.cu_seqlens,
                                                inp.cu_seqlens, p.max_len, p.max_len,
                                                causal=case.causal)

    return Setup(forward, [inp.q, inp.k, inp.v], inp.dout, lambda out: out,
                 "flash_attn_varlen_func, packed")


def flashtile_padded(case: VarlenCase, inp: VarlenInputs) -> Setup:
    """flash_attn_func on (B, max_len, H, D) views of the padded leaves, no mask."""
    qt, kt, vt = (t.transpose(1, 2) for t in (inp.qp, inp.kp, inp.vp))

    def forward() -> torch.Tensor:
        return flashtile.flash_attn_func(qt, kt, vt, causal=case.causal).transpose(1, 2)

    detail = ("flash_attn_func, zero padding, no mask"
              + ("" if case.causal else " (real queries also see the padding keys)"))
    return Setup(forward, [inp.qp, inp.kp, inp.vp], inp.doutp,
                 lambda out: inp.real(out, case.packing.lengths), detail,
                 sees_padding=not case.causal)


def sdpa_padded(case: VarlenCase, inp: VarlenInputs) -> Setup:
    """SDPA's default backend with the key-padding (and causal) boolean mask, built once here."""
    p = case.packing
    mask = sdpa_mask(p.lengths, p.max_len, case.causal, inp.qp.device)
    backend = sdpa_backend(inp.qp, inp.kp, inp.vp, attn_mask=mask)

    def forward() -> torch.Tensor:
        return F.scaled_dot_product_attention(inp.qp, inp.kp, inp.vp, attn_mask=mask)

    return Setup(forward, [inp.qp, inp.kp, inp.vp], inp.doutp,
                 lambda out: inp.real(out, p.lengths),
                 f"{backend} backend, boolean attn_mask {tuple(mask.shape)}")


FACTORIES: dict[str, VarlenFactory] = {VARLEN: flashtile_varlen, PADDED: flashtile_padded,
                                       "sdpa-padded": sdpa_padded}


def dense_check_run(case: VarlenCase, inp: VarlenInputs) -> torch.Tensor:
    """The comparison run: flash_attn_func on the padded batch with the padding masked out
    (masks.document, 0 at real tokens, 1 at padding), forward only, untimed; (total, H, D)."""
    p = case.packing
    doc_ids = (~key_keep(p.lengths, p.max_len, inp.qp.device)).to(torch.int32)
    qt, kt, vt = (t.detach().transpose(1, 2) for t in (inp.qp, inp.kp, inp.vp))
    with torch.no_grad():
        out = flashtile.flash_attn_func(qt, kt, vt, causal=case.causal,
                                        mask_mod=flashtile.masks.document(doc_ids))
    return unpad(out, p.lengths, inp.index)


# ---------------------------------------------------------------------------------------------
# Checking and timing


def check_sequences(lengths) -> list[int]:
    """The sequences checked: the shortest and the longest (the first of each)."""
    lengths = list(lengths)
    return sorted({lengths.index(min(lengths)), lengths.index(max(lengths))})


def check_varlen(case: VarlenCase, real: torch.Tensor, inp: VarlenInputs,
                 sees_padding: bool = False) -> tuple[float, float, str]:
    """(max error, tolerance, message) of real (total, H, D) against the float64 reference on
    check_sequences: their last CHECK_ROWS query rows, query heads check_heads(), all keys (with
    sees_padding, also the zero padding keys up to max_len); message empty when all passed."""
    p = case.packing
    cu = p.cu_seqlens()
    heads = torch.tensor(check_heads(p.heads), device=real.device)
    worst, worst_tol, message = 0.0, 0.0, ""
    for s in check_sequences(p.lengths):
        n = p.lengths[s]
        rows = min(n, CHECK_ROWS)
        start = n - rows
        q_s = inp.q.detach()[cu[s] + start:cu[s] + n].index_select(1, heads)[None]
        k_s, v_s = (t.detach()[cu[s]:cu[s] + n].index_select(1, heads) for t in (inp.k, inp.v))
        if sees_padding and n < p.max_len:
            k_s, v_s = (torch.cat([t, t.new_zeros(p.max_len - n, *t.shape[1:])]) for t in (k_s,
                                                                                           v_s))
        k_s, v_s = k_s[None], v_s[None]
        ref = reference_attention(q_s, k_s, v_s, causal=case.causal, diag_offset=start,
                                  dtype=torch.float64).out
        base = reference_attention(q_s, k_s, v_s, causal=case.causal, diag_offset=start).out
        tol = tolerance(ref, base, q_s.dtype)
        got = real.detach()[cu[s] + start:cu[s] + n].index_select(1, heads)[None]
        err = (got.double() - ref).abs().max().item()
        worst, worst_tol = max(worst, err), max(worst_tol, tol)
        try:
            assert_close(f"out sequence {s} rows {start}:{n}", got, ref, tol)
        except AssertionError as e:
            message = message or str(e).splitlines()[0]
        del ref, base
    return worst, worst_tol, message


@dataclass
class VarlenResult:
    """One provider on one case in one mode; status as measure.Result's. tflops: on the real
    pairs; check_err / check_tol: against the float64 reference; diff: output_diff to the dense
    masked run over the real tokens (None where not compared)."""

    case: VarlenCase
    provider: str
    mode: str
    status: str
    ms: float | None = None
    tflops: float | None = None
    check_err: float | None = None
    check_tol: float | None = None
    diff: float | None = None
    detail: str = ""
    note: str = ""

    def to_json(self) -> dict:
        return dict(case=self.case.key(), provider=self.provider, mode=self.mode,
                    status=self.status, ms=self.ms, tflops=self.tflops,
                    check_err=self.check_err, check_tol=self.check_tol, diff=self.diff,
                    detail=self.detail, note=self.note)


def measure_varlen(case: VarlenCase, name: str, factory: VarlenFactory, inp: VarlenInputs,
                   modes: list[str], warmup_ms: int, rep_ms: int,
                   compare_to: torch.Tensor | None = None,
                   log: Callable[[str], object] = print) -> list[VarlenResult]:
    """Check, then time every mode of, one provider on one case. Nothing a provider raises
    escapes: it becomes a "skipped" or "error" result."""

    def every_mode(status: str, note: str, **fields) -> list[VarlenResult]:
        log(f"{case.label()} {name}: {status} ({note})")
        return [VarlenResult(case, name, m, status, note=note, **fields) for m in modes]

    start = time.perf_counter()
    try:
        setup = factory(case, inp)
        real = setup.real(setup.forward().detach())
    except Unavailable as e:
        return every_mode("skipped", str(e))
    except Exception as e:
        return every_mode("skipped", f"does not run: {_first_line(e)}")
    first_s = time.perf_counter() - start
    try:
        err, tol, message = check_varlen(case, real, inp, setup.sees_padding)
    except Exception as e:
        return every_mode("skipped", f"could not be checked: {_first_line(e)}",
                          detail=setup.detail)
    diff = None
    if compare_to is not None and not setup.sees_padding:
        diff = output_diff(real, compare_to)
        if not message and not diff <= MAX_DIFF:
            message = (f"max |out - dense's| / max(1, |dense's|) over the real tokens "
                       f"{diff:.3e} > {MAX_DIFF:.0e} (outside the checked rows one of the two "
                       "is wrong)")
    del real
    checked = dict(check_err=err, check_tol=tol, diff=diff, detail=setup.detail)
    if message:
        return every_mode("failed", message, **checked)
    vs = f", max |diff| to dense {diff:.2e}" if diff is not None else ""
    log(f"{case.label()} {name}: {setup.detail}; first call {first_s:.1f} s; check ok (max err "
        f"{err:.2e} <= tol {tol:.2e}{vs})")
    if any(m != "fwd" for m in modes):  # the backward's first call autotunes
        start = time.perf_counter()
        try:
            setup.forward().backward(setup.dout)
        except Exception as e:
            log(f"{case.label()} {name}: backward fails ({_first_line(e)})")
        else:
            log(f"{case.label()} {name}: first backward {time.perf_counter() - start:.1f} s")
        for t in setup.leaves:
            t.grad = None

    results = []
    for mode in modes:
        try:
            ms = time_mode(setup.forward, mode, setup.dout, setup.leaves, warmup_ms, rep_ms)
        except Exception as e:
            results.append(VarlenResult(case, name, mode, "error", note=_first_line(e),
                                        **checked))
            log(f"{case.label()} {name} {mode}: error ({_first_line(e)})")
            continue
        tflops = case.flops(mode) / (ms * 1e-3) / 1e12
        results.append(VarlenResult(case, name, mode, "ok", ms=ms, tflops=tflops, **checked))
        log(f"{case.label()} {name} {mode}: {ms:8.3f} ms {tflops:7.1f} TFLOP/s (real pairs)")
    for t in setup.leaves:
        t.grad = None
    return results


# ---------------------------------------------------------------------------------------------
# Reports: pure Python over VarlenResults, tested on the CPU


def speedups(results: list[VarlenResult]) -> list[dict]:
    """Per case and mode where both ran: flashtile-padded's time ÷ flashtile-varlen's, the
    target 0.9 · padded pairs / pairs, whether it is met, and SDPA's time ÷ varlen's."""
    by = tables.index(results)
    out = []
    for case, mode in tables.rows(results):
        varlen = tables.ms(by.get((case, VARLEN, mode)))
        padded = tables.ms(by.get((case, PADDED, mode)))
        if varlen is None or padded is None:
            continue
        sdpa = tables.ms(by.get((case, "sdpa-padded", mode)))
        target = case.packing.target_speedup(case.causal)
        out.append(dict(case=case.name, total=case.packing.total, head_dim=case.packing.head_dim,
                        mode=mode, speedup=padded / varlen, target=target,
                        met=padded / varlen >= target,
                        pair_padding=case.packing.pair_padding(case.causal),
                        vs_sdpa=sdpa / varlen if sdpa is not None else None))
    return out


def batch_table(results: list[VarlenResult]) -> str:
    """One row per packed batch × causal: sizes, padding fractions and the target."""
    rows = []
    for case in tables.cases(results):
        p = case.packing
        rows.append([case.name, str(p.batch), str(p.total), str(p.max_len),
                     str(p.padded_tokens), f"{p.token_padding():.3f}", f"{p.pairs(case.causal):,}",
                     f"{p.padded_pairs(case.causal):,}", f"{p.pair_padding(case.causal):.3f}",
                     f"{p.target_speedup(case.causal):.2f}"])
    return _markdown(["case", "B", "tokens", "max len", "padded tokens", "token padding",
                      "pairs / head", "padded pairs / head", "pair padding", "target speedup"],
                     rows)


def times_table(results: list[VarlenResult]) -> str:
    """One row per case × mode: each provider's ms and TFLOP/s (real pairs), varlen's speedup
    over padded dense, the target, whether it is met, and SDPA's time ÷ varlen's."""
    providers = tables.providers(results)
    by = tables.index(results)
    found = {(s["case"], s["total"], s["head_dim"], s["mode"]): s for s in speedups(results)}
    head = (["case", "D", "mode"] + [f"{p} ms" for p in providers]
            + [f"{p} TFLOP/s" for p in providers]
            + ["varlen speedup", "target", "meets", "varlen ÷ sdpa"])
    rows = []
    for case, mode in tables.rows(results):
        cells = [by.get((case, p, mode)) for p in providers]
        s = found.get((case.name, case.packing.total, case.packing.head_dim, mode))
        row = [case.name, str(case.packing.head_dim), mode]
        row += [tables.cell(r, tables.ms(r)) for r in cells]
        row += [_number(r.tflops) if tables.ms(r) else tables.cell(r, None) for r in cells]
        target = case.packing.target_speedup(case.causal)
        row += [f"{s['speedup']:.2f}" if s else "-", f">= {target:.2f}",
                ("yes" if s["met"] else "NO") if s else "-",
                f"{s['vs_sdpa']:.2f}" if s and s["vs_sdpa"] is not None else "-"]
        rows.append(row)
    return _markdown(head, rows)


def check_table(results: list[VarlenResult]) -> str:
    seen: dict[tuple[VarlenCase, str], VarlenResult] = {}
    for r in results:
        if r.check_err is not None:
            seen.setdefault((r.case, r.provider), r)
    rows = [[case.name, str(case.packing.head_dim), p, f"{r.check_err:.2e}",
             f"{r.check_tol:.2e}", f"{r.diff:.2e}" if r.diff is not None else "-",
             "ok" if r.status != "failed" else "FAIL", r.detail]
            for (case, p), r in seen.items()]
    return _markdown(["case", "D", "provider", "max err vs float64", "tolerance",
                      "max diff to dense", "check", "how it ran"], rows)


TARGET_TEXT = ("speedup = flashtile-padded's time ÷ flashtile-varlen's; target: speedup >= "
               f"{TARGET_EFFICIENCY:g} / (1 - pair padding) = {TARGET_EFFICIENCY:g} · padded "
               "pairs / pairs, pairs = Σ n² (causal Σ n(n+1)/2) and padded pairs = B · M² "
               "(causal B · M(M+1)/2) for lengths n and M the longest")


def varlen_markdown(results: list[VarlenResult], meta: dict) -> str:
    facts = [line for line in header(meta).splitlines() if not line.startswith("- TFLOP/s")]
    packings = list(dict.fromkeys(r.case.packing for r in results))
    for p in packings:
        facts.append(f"- batch: {p.describe()}; lengths drawn log-uniformly from {MIN_LEN} to "
                     f"{MAX_LEN} (seed {SEED}): {', '.join(map(str, p.lengths))}")
    facts.append("- TFLOP/s = 4·H·pairs·D / time over the real pairs only, for every provider; "
                 "bwd counts 2.5× that, fwdbwd 3.5×")
    facts.append("- flashtile-padded has no mask (the padded dense cost); sdpa-padded masks the "
                 "padding keys with a boolean attn_mask")
    facts.append("- a time is one call's, host work included (flash_attn_varlen_func checks "
                 "cu_seqlens on the host: a device synchronization per call)")
    parts = ["# flashtile varlen benchmark (issue 5)", "\n".join(facts),
             "## Batch and padding", batch_table(results),
             "## Times (median ms)", TARGET_TEXT + ". varlen ÷ sdpa: SDPA's time ÷ varlen's (> 1: "
             "varlen is faster).", times_table(results),
             "## Checks before timing",
             f"Against the float64 reference on the shortest and the longest sequence (last "
             f"{CHECK_ROWS} query rows, query heads 0, 1 and the last, all keys; flashtile-padded "
             "non-causal with its zero padding keys), FlashAttention's tolerance rule. Diff to "
             "dense: over every real token, max |out - dense's| / max(1, |dense's|) at most "
             f"{MAX_DIFF:g}, dense being flash_attn_func on the padded batch with the padding "
             "masked out (masks.document).",
             check_table(results)]
    lines = tables.not_measured(results)
    if lines:
        parts += ["## Not measured", "\n".join(lines)]
    return "\n\n".join(parts) + "\n"


def write_varlen_reports(out_dir: Path, results: list[VarlenResult], meta: dict) -> None:
    """varlen.md and varlen.json (metadata, batches with their counts, results, speedups)."""
    cases = tables.cases(results)
    data = {"metadata": meta,
            "target": {"efficiency": TARGET_EFFICIENCY, "formula": TARGET_TEXT},
            "cases": [{**c.key(), "lengths": list(c.packing.lengths),
                       "padded_tokens": c.packing.padded_tokens,
                       "token_padding": c.packing.token_padding(),
                       "pairs": c.packing.pairs(c.causal),
                       "padded_pairs": c.packing.padded_pairs(c.causal),
                       "pair_padding": c.packing.pair_padding(c.causal),
                       "target_speedup": c.packing.target_speedup(c.causal)} for c in cases],
            "results": [r.to_json() for r in results],
            "speedups": speedups(results)}
    tables.write_report(out_dir, "varlen", varlen_markdown(results, meta), data)


# ---------------------------------------------------------------------------------------------
# The run (called by bench/run.py's main with --varlen, on a GPU)


def run_varlen(args, meta: dict, out_dir: Path, dtype: torch.dtype, preset,
               log: Callable[[str], object] = print, device="cuda") -> int:
    """Non-causal then causal, for every --seqlens total (default 32k) × --dims, on the
    providers of --providers (from PROVIDERS), else of `preset` (run.PRESETS["varlen"]), modes
    --modes else the preset's. Exit status: 1 when a flashtile provider failed a check, 2 for
    a provider outside PROVIDERS or a total under MIN_LEN, else 0."""
    providers = args.providers or list(preset.providers)
    unknown = [p for p in providers if p not in FACTORIES]
    if unknown:
        log(f"flashtile bench --varlen: {', '.join(unknown)} not in the varlen set; choose from "
            f"{', '.join(PROVIDERS)}")
        return 2
    providers = sorted(dict.fromkeys(providers), key=PROVIDERS.index)
    modes = args.modes or list(preset.modes)
    try:
        packings = [packing(total, heads=preset.heads or HEADS, head_dim=d)
                    for total in (args.seqlens or preset.seqlens)
                    for d in (args.dims or preset.dims)]
    except ValueError as e:
        log(f"flashtile bench --varlen: {e}")
        return 2
    cases = [VarlenCase(p, causal) for p in packings for causal in (False, True)]
    log(f"varlen: {len(cases)} cases × {len(providers)} providers ({', '.join(providers)}), "
        f"modes {', '.join(modes)}; writing to {out_dir}/")
    for p in packings:
        log(f"batch: {p.describe()}: {list(p.lengths)}; token padding {p.token_padding():.3f}, "
            f"pair padding {p.pair_padding(False):.3f} (causal {p.pair_padding(True):.3f})")
    start = time.perf_counter()
    results: list[VarlenResult] = []
    for i, case in enumerate(cases, 1):
        log(f"[{i}/{len(cases)}, {time.perf_counter() - start:.0f} s] {case.label()}: target "
            f"speedup >= {case.packing.target_speedup(case.causal):.2f}")
        inp = varlen_inputs(case.packing, dtype, device)
        try:
            dense = dense_check_run(case, inp)
            err, tol, message = check_varlen(case, dense, inp)
        except Exception as e:
            dense, message = None, f"does not run: {_first_line(e)}"
        if message:
            log(f"{case.label()} dense comparison run: not used ({message})")
            dense = None
        else:
            log(f"{case.label()} dense comparison run: check ok (max err {err:.2e} <= tol "
                f"{tol:.2e})")
        for name in providers:
            results += measure_varlen(case, name, FACTORIES[name], inp, modes, preset.warmup_ms,
                                      preset.rep_ms, compare_to=dense, log=log)
            if device == "cuda":
                torch.cuda.empty_cache()
        del inp, dense
        if device == "cuda":
            torch.cuda.empty_cache()
        write_varlen_reports(out_dir, results, meta)  # a cut-short run keeps its rows

    log(f"\ndone in {time.perf_counter() - start:.0f} s\n")
    log(times_table(results))
    log("")
    log(TARGET_TEXT)
    for line in tables.not_measured(results):
        log(line)
    write_varlen_reports(out_dir, results, meta)
    log(f"\nwrote {out_dir}/varlen.md and varlen.json")
    failed = any(r.provider.startswith("flashtile") and r.status == "failed" for r in results)
    return 1 if failed else 0
