"""Compare kernel variants in one run, beside other providers: feature flags (TMA loads per
pass) and the keyword arguments of flash_attn_func.

Usage: python scripts/variants.py [--variants "default,no overlap"] [--against sdpa-cudnn,flex]
                                  [--rounds R] [--split] [D,causal,N ...]
For each shape (batch·N = 16k tokens, heads = 2048 / D, bf16, the (B, H, N, D) tensors the bench
passes): forward and backward TFLOP/s of flashtile under each variant and of each --against
provider (`flashtile bench`'s providers), timed as the bench times them (bench/measure.py's
time_mode: median of do_bench, gradients reset before each backward). With --rounds R every
variant and provider is timed R times, interleaved, and the median round is printed with the
spread (min-max) beside it: at N <= 1k one timing varies by more than the differences sought.
--split: the default variant's backward split over its kernels (torch profiler).
"""

import argparse
import statistics

import torch

import flashtile
from flashtile.bench.measure import time_mode
from flashtile.bench.providers import PROVIDERS, flashtile_attention
from flashtile.kernels import configs

# name: (configs.features switched from their defaults, flash_attn_func keyword arguments)
DEFAULT = dict(configs.features)
VARIANTS = {"default": ({}, {}),
            "ptr": (dict(tma_forward=False, tma_backward=False), {}),
            "tma both": (dict(tma_forward=True, tma_backward=True), {}),
            "no overlap": (dict(overlap_dq=False), {}),
            "triton fwd": (dict(gluon_forward=False), {}),
            "triton bwd": (dict(gluon_backward=False), {}),
            "triton bwd no overlap": (dict(gluon_backward=False, overlap_dq=False), {}),
            "triton launch": (dict(gluon_launcher=False), {}),
            "no replay": (dict(replay=False), {})}
SHAPES = [(128, 0, 4096), (128, 1, 4096), (128, 0, 16384), (128, 1, 16384), (64, 0, 4096),
          (64, 1, 16384)]
parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--variants", default="default,ptr,tma both",
                    help="comma-separated names from: " + ", ".join(VARIANTS))
parser.add_argument("--against", default="sdpa-cudnn",
                    help="comma-separated providers of flashtile bench: " + ", ".join(PROVIDERS))
parser.add_argument("--rounds", type=int, default=1)
parser.add_argument("--split", action="store_true")
parser.add_argument("shapes", nargs="*", help="D,causal,N (default: six shapes)")
args = parser.parse_args()
VARIANTS = {name: VARIANTS[name] for name in args.variants.split(",")}
AGAINST = [name for name in args.against.split(",") if name]
if args.shapes:
    SHAPES = [tuple(int(x) for x in s.split(",")) for s in args.shapes]


def flashtile_forward(q, k, v, causal: bool, kwargs: dict):
    """flash_attn_func with `kwargs` on (B, N, H, D) views of the (B, H, N, D) inputs."""
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    return lambda: flashtile.flash_attn_func(qt, kt, vt, causal=causal, **kwargs).transpose(1, 2)


print(f"{'D':>4} {'c':>2} {'N':>6} {'mode':>4} | "
      + " | ".join(f"{name:>16}" for name in [*VARIANTS, *AGAINST]))
for D, causal, N in SHAPES:
    B, H = 16384 // N, 2048 // D
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1)
    forwards = {name: flashtile_forward(q, k, v, bool(causal), VARIANTS[name][1])
                for name in VARIANTS}
    forwards.update({name: PROVIDERS[name](q, k, v, bool(causal)) for name in AGAINST})
    dout = torch.randn_like(q)
    for name, forward in forwards.items():  # compiles (Flex) and tunes before any timing
        configs.features.update(VARIANTS[name][0] if name in VARIANTS else DEFAULT)
        forward().backward(dout)
        configs.features.update(DEFAULT)
    for mode, scale in (("fwd", 1.0), ("bwd", 2.5)):
        times: dict[str, list[float]] = {name: [] for name in forwards}
        for _ in range(args.rounds):
            for name, forward in forwards.items():
                # a variant's flags hold for the whole timing: the backward runs after the call
                configs.features.update(VARIANTS[name][0] if name in VARIANTS else DEFAULT)
                try:
                    times[name].append(time_mode(forward, mode, dout, [q, k, v], 25, 100))
                except Exception as e:  # a variant that does not compile here
                    print(f"      {name}: {type(e).__name__}: {str(e)[:300]}", flush=True)
                    times[name].append(float("nan"))
                finally:
                    configs.features.update(DEFAULT)
        cells = []
        for ms in times.values():
            tf = [scale * flops / t * 1e-9 for t in ms]
            cell = f"{statistics.median(tf):5.0f}"
            if len(tf) > 1:
                cell += f" ({min(tf):.0f}-{max(tf):.0f})"
            cells.append(f"{cell:>16}")
        print(f"{D:>4} {causal:>2} {N:>6} {mode:>4} | " + " | ".join(cells), flush=True)
    if args.split:
        out = flashtile_attention(q, k, v, bool(causal))()
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            for _ in range(5):
                torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
            torch.cuda.synchronize()
        split = {e.key[:28]: e.device_time_total / 5 / 1e3 for e in prof.key_averages()
                 if e.device_time_total > 0}
        print("      backward ms (default): "
              + ", ".join(f"{k} {t:.3f}" for k, t in split.items() if t > 0.005), flush=True)
