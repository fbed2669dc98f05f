"""How much of a short call's measured time is the host's: each pass timed as the bench times it
(eager, do_bench median) and as one replay of a CUDA graph of the same call (the GPU's work
alone), for flashtile and the --against providers, with --rounds interleaved repetitions.

Usage: python scripts/host_share.py [--against sdpa-flash,flex] [--rounds R] [D,causal,N ...]
       (default: the N <= 1k shapes of issue 3's grid at D 128)
For each shape (batch·N = 16k tokens, heads = 2048 / D, bf16, (B, H, N, D) tensors) and pass
(fwd; bwd = the gradients of q, k, v from a retained graph): TFLOP/s eager and replayed, median
of the rounds with the spread, and eager ÷ replay. A backward is captured with its forward (the
autograd engine runs a backward on its forward's stream, so an eager forward's backward cannot
join a capture): its replay time is that of forward + backward less the forward's. A pass whose
eager time runs well past its replay, and varies where the replay does not, is held up by the
host (docs/performance.md). Status: on the H200 at 6614cf2 every provider's capture failed
(cudaErrorStreamCaptureInvalidated, flashtile's, SDPA's and Flex's alike), not yet explained;
docs/performance.md v7.4 took the host's share from host-side timing instead.
"""

import argparse
import statistics

import torch
from triton.testing import do_bench

from flashtile.bench.decode import time_graph
from flashtile.bench.providers import PROVIDERS

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--against", default="sdpa-flash")
parser.add_argument("--rounds", type=int, default=3)
parser.add_argument("shapes", nargs="*", help="D,causal,N")
args = parser.parse_args()
shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes]
          or [(128, 0, 512), (128, 1, 512), (128, 0, 1024), (128, 1, 1024)])
names = ["flashtile", *filter(None, args.against.split(","))]

print(f"{'D':>4} {'c':>2} {'N':>6} {'pass':>4} {'provider':>10} | {'eager':>15} | "
      f"{'replay':>15} | eager/replay")
for D, causal, N in shapes:
    B, H = 16384 // N, 2048 // D
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1)
    calls, both = {}, {}
    for name in names:
        forward = PROVIDERS[name](q, k, v, bool(causal))
        out = forward()  # compiles and tunes before any timing
        calls[name, "fwd"] = forward
        calls[name, "bwd"] = (lambda out=out, inputs=(q, k, v), dout=dout:
                              torch.autograd.grad(out, inputs, dout, retain_graph=True))
        both[name] = (lambda forward=forward, inputs=(q, k, v), dout=dout:
                      torch.autograd.grad(forward(), inputs, dout))
    tflops = {key: ([], []) for key in calls}
    for _ in range(args.rounds):
        for name in names:
            try:
                fwd_replay = time_graph(calls[name, "fwd"], 25, 100)
                replays = {"fwd": fwd_replay, "bwd": time_graph(both[name], 25, 100) - fwd_replay}
            except Exception as e:  # a provider that cannot be captured
                print(f"{name}: no replay ({type(e).__name__}: {str(e)[:200]})", flush=True)
                replays = {"fwd": float("inf"), "bwd": float("inf")}
            for pass_ in ("fwd", "bwd"):
                scale = flops * (2.5 if pass_ == "bwd" else 1.0) * 1e-9
                eager, replay = tflops[name, pass_]
                eager.append(scale / do_bench(calls[name, pass_], warmup=25, rep=100,
                                              return_mode="median"))
                replay.append(scale / replays[pass_])
    for (name, pass_), (eager, replay) in tflops.items():
        cells = [f"{statistics.median(t):5.0f} ({min(t):.0f}-{max(t):.0f})"
                 for t in (eager, replay)]
        ratio = statistics.median(replay) / statistics.median(eager)
        print(f"{D:>4} {causal:>2} {N:>6} {pass_:>4} {name:>10} | {cells[0]:>15} | "
              f"{cells[1]:>15} | {ratio:.2f}", flush=True)
