"""flashtile's kernels beside FlexAttention's, shape by shape: time per kernel, and what ptxas
says of Flex's generated kernels (registers, spills, warps, stages).

Usage: python scripts/flex_compare.py [--dump DIR] [D,causal,N ...]

For each shape (batch·N = 16k tokens, heads = 2048 / D, bf16): forward and backward TFLOP/s of
both in one process, then each backward's time split over its kernels (torch profiler, mean of
5 calls). With --dump, Flex's generated kernels (Triton source, PTX, metadata) are copied from
Triton's cache into DIR, and ptxas' report on each is printed: the evidence for what the Flex
backward does differently (docs/performance.md, v5.13).
"""

import argparse
import json
import os
import shutil
import subprocess
import tempfile

# Flex's kernels go to a fresh cache, so the dump holds this run's kernels only
os.environ.setdefault("TRITON_CACHE_DIR", tempfile.mkdtemp(prefix="flex-triton-"))

import torch  # noqa: E402
import triton  # noqa: E402
from registers import ptx_resources  # noqa: E402  (scripts/registers.py, beside this one)

import flashtile  # noqa: E402
from flashtile.bench import providers  # noqa: E402

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--dump", help="copy Flex's generated kernels here and run ptxas on them")
parser.add_argument("shapes", nargs="*", default=["128,0,1024", "128,1,4096"],
                    help="D,causal,N (default: 128,0,1024 128,1,4096)")
args = parser.parse_args()


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def kernel_split(fn, calls=5):
    """Mean device time per call of each kernel fn launches, in µs."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / calls for e in prof.key_averages()
            if e.device_time_total > 0}


def ptxas_resources(ptx_path):
    """(registers, spill stores, spill loads) by ptxas, or None with ptxas' complaint printed
    (a PTX version this ptxas does not know, say), never zeros that look like a result."""
    try:
        with open(ptx_path) as f:
            found = ptx_resources(f.read())
    except subprocess.CalledProcessError as e:
        print(f"  ptxas refused {os.path.basename(ptx_path)}: {e.stderr.strip()[:200]}")
        return None
    return found["registers"], found["spill_stores"], found["spill_loads"]


print(f"{'D':>4} {'c':>2} {'N':>6} | flashtile f/b | flex f/b | bwd ratio")
splits = []
for shape in args.shapes:
    D, causal, N = (int(x) for x in shape.split(","))
    B, H = 16384 // N, 2048 // D
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1)

    def ft(q=q, k=k, v=v, causal=causal):
        return flashtile.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                                         causal=bool(causal)).transpose(1, 2)

    results = {}
    for name, fn in (("flashtile", ft), ("flex", providers.flex(q, k, v, bool(causal)))):
        o = fn()
        do = torch.randn_like(o)
        tf = bench(fn)
        tb = bench(lambda o=o, do=do: o.backward(do, retain_graph=True))
        results[name] = (flops / tf / 1e9, 2.5 * flops / tb / 1e9)
        split = kernel_split(lambda o=o, do=do: o.backward(do, retain_graph=True))
        splits.append((shape, name, split))
    (ff, fb), (xf, xb) = results["flashtile"], results["flex"]
    print(f"{D:>4} {causal:>2} {N:>6} | {ff:5.0f}/{fb:5.0f}   | {xf:4.0f}/{xb:4.0f} "
          f"| {fb / xb:.3f}", flush=True)

print("\nbackward kernels, µs per call (torch profiler, mean of 5):")
for shape, name, split in splits:
    print(f"  {shape} {name}: " + ", ".join(f"{key[:40]} {t:.1f}" for key, t in split.items()))

if args.dump:
    os.makedirs(args.dump, exist_ok=True)
    print(f"\nFlex's kernels (Triton cache {os.environ['TRITON_CACHE_DIR']}):")
    print(f"{'kernel':<44} {'warps':>5} {'stages':>6} {'regs':>4} {'spill st/ld':>12} "
          f"{'smem KiB':>8}")
    for root, _, files in os.walk(os.environ["TRITON_CACHE_DIR"]):
        for name in files:
            if not name.endswith(".json") or name.startswith("__grp__"):
                continue
            meta = json.load(open(os.path.join(root, name)))
            kernel = meta.get("name", name)
            ptx = os.path.join(root, name[:-5] + ".ptx")
            if "flex" not in kernel and "tem" not in kernel or not os.path.exists(ptx):
                continue
            for ext in (".ptx", ".ttgir", ".json", ".source"):
                if os.path.exists(os.path.join(root, name[:-5] + ext)):
                    shutil.copy(os.path.join(root, name[:-5] + ext),
                                os.path.join(args.dump, os.path.basename(root)[:8] + "-"
                                             + name[:-5] + ext))
            found = ptxas_resources(ptx)
            regs, st, ld = found if found else ("?", "?", "?")
            print(f"{kernel[:44]:<44} {meta.get('num_warps', '?'):>5} "
                  f"{meta.get('num_stages', '?'):>6} {regs:>4} {st:>5}/{ld:<6} "
                  f"{meta.get('shared', 0) / 1024:>8.1f}")
