"""Time the forward (or a backward kernel) with each candidate config forced, against the
autotuner's choice, in one process. For finding whether a slow shape is the kernel or the
tuner's pick.

Usage: python scripts/config_time.py [--sdpa-layout] [D,causal,N ...]
       (default: 128,1,1024 64,1,1024; --sdpa-layout: (B, H, N, D) tensors, as bench passes)
Prints one line per (shape, config): forward ms and TFLOP/s; then the autotuned forward.
"""

import sys

import torch
import triton

import flashtile
from flashtile.kernels import configs

args = [a for a in sys.argv[1:] if a != "--sdpa-layout"]
sdpa_layout = "--sdpa-layout" in sys.argv[1:]
shapes = [tuple(int(x) for x in s.split(",")) for s in args] or [(128, 1, 1024), (64, 1, 1024)]
for D, causal, N in shapes:
    B, H = 16384 // N, 2048 // D
    if sdpa_layout:  # (B, H, N, D) memory seen as (B, N, H, D)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
                   for _ in range(3))
    else:
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16)
                   for _ in range(3))
    flops = 4 * B * H * N * N * D / (2 if causal else 1)

    def fwd(q=q, k=k, v=v, causal=bool(causal)):
        return flashtile.flash_attn_func(q, k, v, causal=causal)

    for cfg in configs.candidates("fwd", configs.head_dim_pad(D), "tf32"):
        configs.set_override("fwd", configs.KernelConfig(*cfg))
        ms = triton.testing.do_bench(fwd, warmup=50, rep=200)
        print(f"D={D} causal={causal} N={N} sdpa_layout={sdpa_layout} fwd {cfg}: {ms:.3f} ms "
              f"{flops / ms * 1e-9:.0f} TFLOP/s", flush=True)
    configs.set_override("fwd", None)
    ms = triton.testing.do_bench(fwd, warmup=50, rep=200)
    print(f"D={D} causal={causal} N={N} fwd autotuned: {ms:.3f} ms "
          f"{flops / ms * 1e-9:.0f} TFLOP/s", flush=True)
