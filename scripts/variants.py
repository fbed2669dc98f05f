"""Compare kernel variants in one run, beside cuDNN: feature flags (TMA loads per pass) and the
keyword arguments of flash_attn_func.

Usage: python scripts/variants.py [--variants "ptr,tma fwd"] [D,causal,N ...]
For each shape: forward and backward TFLOP/s of flashtile under each variant, cuDNN's in the same
run, then the backward's time split over its kernels (torch profiler), default variant.
"""

import argparse

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

import flashtile
from flashtile.kernels import configs

# name: (configs.features, flash_attn_func keyword arguments)
DEFAULT = dict(tma_forward=True, tma_backward=False)
VARIANTS = {"ptr": (dict(tma_forward=False, tma_backward=False), {}),
            "tma fwd": (DEFAULT, {}),
            "tma both": (dict(tma_forward=True, tma_backward=True), {})}
SHAPES = [(128, 0, 4096), (128, 1, 4096), (128, 0, 16384), (128, 1, 16384), (64, 0, 4096),
          (64, 1, 16384)]
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--variants", default=",".join(VARIANTS),
                    help="comma-separated names from: " + ", ".join(VARIANTS))
parser.add_argument("shapes", nargs="*", help="D,causal,N (default: six shapes)")
args = parser.parse_args()
VARIANTS = {name: VARIANTS[name] for name in args.variants.split(",")}
if args.shapes:
    SHAPES = [tuple(int(x) for x in s.split(",")) for s in args.shapes]


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def fwd_bwd_tflops(fn, flops):
    o = fn()
    do = torch.randn_like(o)
    tf = bench(fn)
    tb = bench(lambda: o.backward(do, retain_graph=True))
    return flops / tf / 1e9, 2.5 * flops / tb / 1e9, o, do


print(f"{'D':>4} {'c':>2} {'N':>6} | " + " | ".join(f"{v:>11}" for v in VARIANTS)
      + " |   cudnn f/b")
for D, causal, N in SHAPES:
    B, H = 16384 // N, 2048 // D
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1)

    def ft(q=q, k=k, v=v, causal=causal, **kwargs):
        return flashtile.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         causal=bool(causal), **kwargs).transpose(1, 2)

    cells = []
    for flags, kwargs in VARIANTS.values():
        configs.features.update(flags)
        try:
            f, b, _, _ = fwd_bwd_tflops(lambda kwargs=kwargs: ft(**kwargs), flops)
            cells.append(f"{f:5.0f}/{b:5.0f}")
        except Exception as e:  # a variant that does not compile here
            cells.append(f"{type(e).__name__[:11]:>11}")
            print(f"      {type(e).__name__}: {str(e)[:300]}", flush=True)
    configs.features.update(DEFAULT)

    def cudnn(q=q, k=k, v=v, causal=causal):
        with sdpa_kernel([SDPBackend.CUDNN_ATTENTION]):
            return sdpa(q, k, v, is_causal=bool(causal))
    f, b, _, _ = fwd_bwd_tflops(cudnn, flops)
    print(f"{D:>4} {causal:>2} {N:>6} | " + " | ".join(cells) + f" | {f:5.0f}/{b:5.0f}",
          flush=True)
    _, _, o, do = fwd_bwd_tflops(ft, flops)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(5):
            o.backward(do, retain_graph=True)
        torch.cuda.synchronize()
    split = {e.key[:28]: e.device_time_total / 5 / 1e3 for e in prof.key_averages()
             if e.device_time_total > 0}
    print("      backward ms (default): "
          + ", ".join(f"{k} {t:.3f}" for k, t in split.items() if t > 0.005),
          flush=True)
