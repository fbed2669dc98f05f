"""Check, time and weigh one provider on one problem; the FLOP count; the GPU's ceilings.

For each provider and problem, in this order:
1. its forward output is compared with a float64 reference by FlashAttention's rule
   (flashtile.testing), on a slice small enough to keep the reference's memory bounded; a
   provider that fails is reported and never timed;
2. each mode is timed with the median of `triton.testing.do_bench`: "fwd" the forward call
   (recording for autograd, as in training: the inputs require grad), "bwd"
   `out.backward(dout)` on one precomputed out, "fwdbwd" both; the gradients are reset to None
   before every timed call, so no accumulation kernel is timed;
3. the peak memory of one forward + backward is taken above what was allocated before it.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from triton.testing import do_bench

from flashtile.bench.providers import Factory, Forward, Unavailable
from flashtile.testing import assert_close, reference_attention, tolerance

MODES = ("fwd", "bwd", "fwdbwd")


@dataclass(frozen=True)
class Shape:
    """One attention problem: (batch, heads, seqlen, head_dim) for q, k and v alike."""

    head_dim: int
    causal: bool
    seqlen: int
    batch: int
    heads: int

    def label(self) -> str:
        return (f"D={self.head_dim} causal={int(self.causal)} N={self.seqlen} "
                f"B={self.batch} H={self.heads}")


# Matmuls in each mode, over the forward's two (Q Kᵀ and P V): the backward recomputes Q Kᵀ,
# then forms dV = Pᵀ dO, dP = dO Vᵀ, dQ = dS K and dK = dSᵀ Q.
FLOP_FACTOR = {"fwd": 1.0, "bwd": 2.5, "fwdbwd": 3.5}


def attention_flops(shape: Shape, mode: str) -> float:
    """The FLOPs credited to one call of `mode`, the only count behind every TFLOP/s figure.

    forward = 4·B·H·Nq·Nk·D: two matmuls, Q Kᵀ and P V, of 2·Nq·Nk·D each per (batch, head);
    halved when causal, since half the score matrix is masked (FlashAttention's convention);
    bwd = 2.5 × forward (five matmuls to the forward's two); fwdbwd = 3.5 × forward.
    """
    b, h, n, d = shape.batch, shape.heads, shape.seqlen, shape.head_dim
    forward = 4 * b * h * n * n * d * (0.5 if shape.causal else 1.0)
    return FLOP_FACTOR[mode] * forward


@dataclass
class Result:
    """One provider on one shape in one mode.

    status: "ok" (timed), "skipped" (cannot run here: note says why), "failed" (wrong forward
    output: note has the comparison; never timed), "error" (raised while being timed).
    ms: median time of one call; peak_mib: peak memory of one forward + backward above the
    inputs (the same for every mode of a provider and shape); check_err and check_tol: max
    |out - reference| on the checked slice and the tolerance it had to meet.
    """

    shape: Shape
    provider: str
    mode: str
    status: str
    ms: float | None = None
    tflops: float | None = None
    peak_mib: float | None = None
    check_err: float | None = None
    check_tol: float | None = None
    note: str = ""


@dataclass(frozen=True)
class Check:
    """Outcome of the forward comparison; message is empty when it passed."""

    passed: bool
    err: float | None
    tol: float
    message: str


CHECK_HEADS = 2
# Score entries per head in the reference: the float64 scores of one head then take 512 MiB,
# whatever the sequence length (the checked query rows shrink as the keys grow).
CHECK_SCORES = 2**26


def check_forward(out: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  causal: bool) -> Check:
    """Compare out (B, H, N, D) with the float64 reference on batch 0, the first CHECK_HEADS
    heads and the last query rows (those that see the most keys when causal), all keys.

    The tolerance is flashtile.testing's: twice the error of naive attention in the inputs'
    dtype on the same slice, plus a floor."""
    seqlen_q, seqlen_k = q.shape[2], k.shape[2]
    rows = min(seqlen_q, max(1, CHECK_SCORES // seqlen_k))
    start = seqlen_q - rows  # query row start + i sees keys j <= start + i when causal
    q_s = q[:1, :CHECK_HEADS, start:].transpose(1, 2)  # (1, rows, heads, D)
    k_s, v_s = (t[:1, :CHECK_HEADS].transpose(1, 2) for t in (k, v))  # (1, Nk, heads, D)
    ref = reference_attention(q_s, k_s, v_s, causal=causal, diag_offset=start,
                              dtype=torch.float64).out
    base = reference_attention(q_s, k_s, v_s, causal=causal, diag_offset=start).out
    tol = tolerance(ref, base, q.dtype)
    got = out.detach()[:1, :CHECK_HEADS, start:].transpose(1, 2)
    err = (got.double() - ref).abs().max().item()
    try:
        assert_close("out", got, ref, tol)
    except AssertionError as e:
        return Check(False, err if math.isfinite(err) else None, tol, str(e))
    return Check(True, err, tol, "")


def time_mode(forward: Forward, mode: str, dout: torch.Tensor, leaves: list[torch.Tensor],
              warmup_ms: int, rep_ms: int) -> float:
    """Median milliseconds of one call of `mode` (see the module docstring)."""
    if mode == "fwd":
        call = forward
    elif mode == "bwd":
        out = forward()

        def call():
            out.backward(dout, retain_graph=True)
    elif mode == "fwdbwd":

        def call():
            forward().backward(dout)
    else:
        raise ValueError(f"unknown mode {mode!r}; expected one of {MODES}")
    return do_bench(call, warmup=warmup_ms, rep=rep_ms, grad_to_none=leaves,
                    return_mode="median")


def peak_memory_mib(forward: Forward, dout: torch.Tensor, leaves: list[torch.Tensor]) -> float:
    """MiB allocated at the peak of one forward + backward, above what was allocated before
    (so out, the saved activations, the workspace and the gradients, not the inputs)."""
    for t in leaves:
        t.grad = None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    forward().backward(dout)
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for t in leaves:
        t.grad = None
    return peak / 2**20


def _first_line(e: BaseException) -> str:
    text = str(e).strip() or type(e).__name__
    return f"{type(e).__name__}: {text.splitlines()[0][:300]}"


def measure_provider(name: str, factory: Factory, shape: Shape, q: torch.Tensor,
                     k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor, modes: list[str],
                     warmup_ms: int, rep_ms: int,
                     log: Callable[[str], object] = print) -> list[Result]:
    """Check, then time every mode of, one provider on one shape: one Result per mode.

    Nothing a provider raises escapes: it becomes a "skipped" (setting up or the first call)
    or an "error" (timing, memory) Result, logged as one line, so one broken provider never
    stops the run."""
    leaves = [q, k, v]

    def every_mode(status: str, note: str, **fields) -> list[Result]:
        log(f"{shape.label()} {name}: {status} ({note})")
        return [Result(shape, name, mode, status, note=note, **fields) for mode in modes]

    try:
        forward = factory(q, k, v, shape.causal)
        out = forward()
    except Unavailable as e:
        return every_mode("skipped", str(e))
    except Exception as e:
        return every_mode("skipped", f"does not run: {_first_line(e)}")
    try:
        check = check_forward(out, q, k, v, shape.causal)
    except Exception as e:  # the reference itself, e.g. out of memory
        return every_mode("skipped", f"could not be checked: {_first_line(e)}")
    finally:
        del out
    checked = dict(check_err=check.err, check_tol=check.tol)
    if not check.passed:
        return every_mode("failed", check.message.splitlines()[0], **checked)
    log(f"{shape.label()} {name}: check ok (max err {check.err:.2e} <= tol {check.tol:.2e})")

    results = []
    for mode in modes:
        try:
            ms = time_mode(forward, mode, dout, leaves, warmup_ms, rep_ms)
        except Exception as e:
            results.append(Result(shape, name, mode, "error", note=_first_line(e), **checked))
            log(f"{shape.label()} {name} {mode}: error ({_first_line(e)})")
            continue
        tflops = attention_flops(shape, mode) / (ms * 1e-3) / 1e12
        results.append(Result(shape, name, mode, "ok", ms=ms, tflops=tflops, **checked))
        log(f"{shape.label()} {name} {mode}: {ms:8.3f} ms {tflops:7.1f} TFLOP/s")
    for t in leaves:
        t.grad = None
    if any(r.status == "ok" for r in results):
        try:
            peak = peak_memory_mib(forward, dout, leaves)
        except Exception as e:
            log(f"{shape.label()} {name}: peak memory not measured ({_first_line(e)})")
        else:
            log(f"{shape.label()} {name}: peak fwd+bwd memory {peak:,.0f} MiB")
            for r in results:
                r.peak_mib = peak
    return results


def _matmul_tflops(warmup_ms: int, rep_ms: int) -> float:
    a = torch.randn(8192, 8192, device="cuda", dtype=torch.bfloat16)
    b = torch.randn_like(a)
    ms = do_bench(lambda: a @ b, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return 2 * 8192**3 / (ms * 1e-3) / 1e12


def _copy_gbps(warmup_ms: int, rep_ms: int) -> float:
    x = torch.empty(2**30, device="cuda", dtype=torch.uint8).random_(0, 255)
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=warmup_ms, rep=rep_ms, return_mode="median")
    return 2 * 2**30 / (ms * 1e-3) / 1e9  # bytes read + bytes written


def ceilings(warmup_ms: int, rep_ms: int) -> dict[str, float]:
    """What this GPU can do at best, measured in this run: bf16 matmul 8192³ TFLOP/s, and the
    bandwidth of a 1 GiB device-to-device copy in GB/s (bytes read + bytes written)."""
    result = {"matmul_bf16_tflops": _matmul_tflops(warmup_ms, rep_ms),
              "copy_gbps": _copy_gbps(warmup_ms, rep_ms)}
    torch.cuda.empty_cache()
    return result
