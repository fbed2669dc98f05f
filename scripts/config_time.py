"""Time the forward, or the whole backward, with each candidate config of one kernel forced,
against the autotuner's choice, in one process. For finding whether a slow shape is the kernel
or the tuner's pick, and whether a config outside the candidate list would do better.

Usage: python scripts/config_time.py [--kernel fwd|bwd_dkdv|bwd_dq] [--sdpa-layout]
                                     [--extra M,N,warps,stages ...] [D,causal,N ...]
       (default: fwd at 128,1,1024 64,1,1024; --sdpa-layout: (B, H, N, D) tensors, as bench
       passes; --extra: configs to time beside the candidates)
       [--against sdpa-flash,flex]
       (--against: other providers of `flashtile bench`, timed in the same process on the same
       tensors, so that each config's ratio to them can be read off)
Prints one line per (shape, config): the timed pass's ms and TFLOP/s (backward: 2.5 × the
forward's FLOPs, dK/dV and dQ together); then the same autotuned, then each --against provider
(its forward, or its backward alone, as the bench times them).
"""

import argparse

import torch
import triton

import flashtile
from flashtile.bench.measure import time_mode
from flashtile.bench.providers import PROVIDERS
from flashtile.kernels import configs

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--kernel", choices=configs.KERNELS, default="fwd")
parser.add_argument("--sdpa-layout", action="store_true")
parser.add_argument("--extra", nargs="*", default=[], help="BLOCK_M,BLOCK_N,warps,stages")
parser.add_argument("--against", default="", help="comma-separated bench providers")
parser.add_argument("shapes", nargs="*", help="D,causal,N")
args = parser.parse_args()
shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes]
          or [(128, 1, 1024), (64, 1, 1024)])
extra = [tuple(int(x) for x in s.split(",")) for s in args.extra]
for D, causal, N in shapes:
    B, H = 16384 // N, 2048 // D
    if args.sdpa_layout:  # (B, H, N, D) memory seen as (B, N, H, D)
        q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True).transpose(1, 2) for _ in range(3))
    else:
        q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))
    flops = 4 * B * H * N * N * D / (2 if causal else 1)
    if args.kernel == "fwd":
        def timed(q=q, k=k, v=v, causal=bool(causal)):
            with torch.no_grad():
                return flashtile.flash_attn_func(q, k, v, causal=causal)
    else:
        flops *= 2.5
        out = flashtile.flash_attn_func(q, k, v, causal=bool(causal))
        do = torch.randn_like(out)

        def timed(q=q, k=k, v=v, out=out, do=do):
            return torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

    listed = configs.candidates(args.kernel, configs.head_dim_pad(D), "tf32")
    for cfg in listed + [c for c in extra if c not in listed]:
        configs.set_override(args.kernel, configs.KernelConfig(*cfg))
        try:
            ms = triton.testing.do_bench(timed, warmup=50, rep=200)
        except Exception as e:  # a config that does not fit (shared memory, registers)
            print(f"D={D} causal={causal} N={N} {args.kernel} {cfg}: {type(e).__name__}",
                  flush=True)
            continue
        tag = "" if cfg in listed else " (extra)"
        print(f"D={D} causal={causal} N={N} {args.kernel} {cfg}{tag}: {ms:.3f} ms "
              f"{flops / ms * 1e-9:.0f} TFLOP/s", flush=True)
    configs.set_override(args.kernel, None)
    ms = triton.testing.do_bench(timed, warmup=50, rep=200)
    print(f"D={D} causal={causal} N={N} {args.kernel} autotuned: {ms:.3f} ms "
          f"{flops / ms * 1e-9:.0f} TFLOP/s", flush=True)
    mode = "fwd" if args.kernel == "fwd" else "bwd"
    for name in filter(None, args.against.split(",")):
        # the providers take (B, H, N, D) tensors: the same memory, seen as SDPA sees it
        qs, ks, vs = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
        forward = PROVIDERS[name](qs, ks, vs, bool(causal))
        ms = time_mode(forward, mode, torch.randn_like(qs), [qs, ks, vs], 50, 200)
        print(f"D={D} causal={causal} N={N} {mode} {name}: {ms:.3f} ms "
              f"{flops / ms * 1e-9:.0f} TFLOP/s", flush=True)
