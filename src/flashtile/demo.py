"""`flashtile demo`: one forward and backward on the best device here, checked and measured.

It runs flashtile on a default problem (a GPU: compiled kernels; the CPU: the same kernels
through the Triton interpreter), compares out, lse and the gradients against the float64
reference by FlashAttention's rule, and prints the errors, the time, and the memory that naive
attention would have needed beside what flashtile used.
"""

from __future__ import annotations

import time

import torch

import flashtile
from flashtile.testing import device, reference_attention, tolerance

GPU_DEFAULTS = dict(batch=2, seqlen=4096, heads=16, head_dim=128, dtype="bfloat16")
CPU_DEFAULTS = dict(batch=1, seqlen=256, heads=2, head_dim=64, dtype="float16")


def _size(n_bytes: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n_bytes >= scale:
            return f"{n_bytes / scale:,.1f} {unit}"
    return f"{n_bytes:.0f} B"


def _timed(fn, dev: torch.device) -> float:
    """Seconds for one call: the median of do_bench on a GPU, one wall-clock run on the CPU."""
    if dev.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median") / 1e3
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def run_demo(args) -> int:
    dev = device()
    defaults = GPU_DEFAULTS if dev.type == "cuda" else CPU_DEFAULTS
    B = args.batch or defaults["batch"]
    N = args.seqlen or defaults["seqlen"]
    H = args.heads or defaults["heads"]
    D = args.head_dim or defaults["head_dim"]
    dtype = getattr(torch, args.dtype or defaults["dtype"])
    causal = args.causal
    where = (f"{torch.cuda.get_device_name()} (compiled Triton kernels)" if dev.type == "cuda"
             else "CPU (Triton interpreter)")
    print(f"flashtile {flashtile.__version__} on {where}")
    print(f"problem: batch {B}, seqlen {N}, heads {H}, head dim {D}, {dtype}, causal={causal}")

    q, k, v = (torch.randn(B, N, H, D, device=dev, dtype=dtype, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)

    def fwd():
        return flashtile.flash_attn_func(q, k, v, causal=causal, return_lse=True)

    def fwd_bwd():
        out, _ = fwd()
        return torch.autograd.grad(out, (q, k, v), dout)

    # -- correctness: flashtile, then naive attention in the same dtype, against float64 --
    if dev.type == "cuda":
        fwd_bwd()  # compile and autotune first: tuning's scratch buffers are not flashtile's
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    base_mem = torch.cuda.memory_allocated() if dev.type == "cuda" else 0
    out, lse = fwd()
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), dout)
    peak = (torch.cuda.max_memory_allocated() - base_mem) if dev.type == "cuda" else None
    got = dict(out=out, lse=lse, dq=dq, dk=dk, dv=dv)
    ref = reference_attention(q, k, v, dout, causal=causal, dtype=torch.float64)
    base = reference_attention(q, k, v, dout, causal=causal)
    print("\nmax |error| against float64   flashtile   naive same dtype   tolerance   ok")
    all_ok = True
    for field, value in got.items():
        r, b = getattr(ref, field), getattr(base, field)
        finite = torch.isfinite(r)
        err = (value.double() - r)[finite].abs().max().item()
        base_err = (b.double() - r)[finite].abs().max().item()
        tol = tolerance(r, b, dtype)
        ok = err <= tol and not bool(value[finite].isnan().any())
        all_ok &= ok
        print(f"  {field:28s} {err:11.2e} {base_err:18.2e} {tol:11.2e}   {'yes' if ok else 'NO'}")
    del ref, base

    # -- time --
    t_fwd = _timed(fwd, dev)
    t_all = _timed(fwd_bwd, dev)
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1.0)
    print(f"\ntime: forward {t_fwd * 1e3:.2f} ms, forward+backward {t_all * 1e3:.2f} ms"
          + (f"  ({flops / t_fwd / 1e12:.0f} / {3.5 * flops / t_all / 1e12:.0f} TFLOP/s)"
             if dev.type == "cuda" else "  (interpreter: correctness, not speed)"))

    # -- memory: what naive attention materializes vs what flashtile keeps --
    elt = torch.finfo(dtype).bits // 8
    naive = 4 * B * H * N * N * elt  # S and P forward, dP and dS backward
    extra = 2 * B * H * N * 4  # lse and Delta, float32
    print("\nmemory beyond q, k, v, out and their gradients:")
    print(f"  naive attention (S, P, dP, dS of {N}×{N} per head): {_size(naive)}")
    print(f"  flashtile (lse and Delta, {N} floats per head each): {_size(extra)}")
    if peak is not None:
        outputs = 4 * B * N * H * D * elt  # out, dq, dk, dv
        print(f"  measured: forward+backward allocated at peak {_size(peak)} above the inputs, "
              f"of which out, dq, dk, dv are {_size(outputs)}")
    print("\nresult:", "all within tolerance" if all_ok else "ERRORS ABOVE TOLERANCE")
    return 0 if all_ok else 1
