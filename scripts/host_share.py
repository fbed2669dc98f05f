"""How much of a short call's time is the host's: per pass, the wall time of --calls calls in a
row and the host's time to issue them (the same calls, timed until the last one returns, before
synchronizing). Where the host's time per call reaches the wall time, the GPU waits for the
host, and the measured rate follows the host's pace (docs/performance.md v7.4).

Usage: python scripts/host_share.py [--against sdpa-flash,flex] [--variants "gluon_launcher=0"]
                                    [--rounds R] [--calls C] [D,causal,N ...]
       (default: the N <= 1k shapes of issue 3's grid at D 128)
For each shape (batch·N = 16k tokens, heads = 2048 / D, bf16, (B, H, N, D) tensors, the bench's
layout): rows for flashtile with its default features, for each --variants entry (configs.features
switched: name=0|1, several joined by "+"), and for each --against provider (`flashtile bench`'s
providers). Passes: fwd (the forward call), bwd (torch.autograd.grad of a retained forward) and,
for flashtile, launch (kernels.backward.attention_backward on the forward's saved tensors: the
launchers without autograd). Cells: host / wall µs per call, the median round with the range of
the host's; "host-bound" where the host's median is 90% of the wall's or more.
Last column: whether one call waits for the GPU (a synchronization somewhere in it): the call
is issued behind ~50 ms of GPU sleep (torch.cuda._sleep) and the host's time for it printed in
ms; a call that does not wait returns in well under 1 ms.
--profile: then, per shape, the torch profiler's table of where the host's time goes in
flashtile's bwd pass (Python, ATen and CUDA runtime calls, by self CPU time), each call issued
behind ~10 ms of GPU sleep, so that a call that waits stands out by its time.
"""

import argparse
import statistics
import time

import torch

import flashtile
from flashtile.bench.providers import PROVIDERS
from flashtile.kernels import configs
from flashtile.kernels.backward import attention_backward

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--against", default="sdpa-flash,flex")
parser.add_argument("--variants", default="gluon_launcher=0,overlap_dq=0,replay=0",
                    help='comma-separated; each "name=0|1" or several joined by "+"')
parser.add_argument("--rounds", type=int, default=5)
parser.add_argument("--calls", type=int, default=50)
parser.add_argument("--profile", action="store_true")
parser.add_argument("shapes", nargs="*", help="D,causal,N")
args = parser.parse_args()
shapes = ([tuple(int(x) for x in s.split(",")) for s in args.shapes]
          or [(128, 1, 512), (128, 0, 512), (128, 1, 1024), (128, 0, 1024)])
DEFAULT = dict(configs.features)
variants = {"flashtile": {}}
for entry in filter(None, args.variants.split(",")):
    variants[f"flashtile {entry}"] = {name: bool(int(value)) for name, value in
                                      (part.split("=") for part in entry.split("+"))}
against = [name for name in args.against.split(",") if name]


def host_and_wall(call, calls: int) -> tuple[float, float]:
    """µs per call: until the last call returns, and until the GPU has finished them."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        call()
    issued = time.perf_counter()
    torch.cuda.synchronize()
    done = time.perf_counter()
    return (issued - start) / calls * 1e6, (done - start) / calls * 1e6


def waits_ms(call) -> float:
    """Host ms of one call issued behind ~50 ms of GPU work (about 1e8 cycles)."""
    torch.cuda.synchronize()
    torch.cuda._sleep(100_000_000)
    start = time.perf_counter()
    call()
    took = time.perf_counter() - start
    torch.cuda.synchronize()
    return took * 1e3


def flashtile_calls(q, k, v, dout, causal: bool) -> dict:
    """fwd, bwd and launch calls of flash_attn_func on (B, N, H, D) views of the inputs."""
    qt, kt, vt, dot = (t.transpose(1, 2) for t in (q, k, v, dout))
    out = flashtile.flash_attn_func(qt, kt, vt, causal=causal)
    node = out.grad_fn  # _FlashAttnFunction's: its saved tensors and options
    saved, opts = node.saved_tensors, node.opts
    return {"fwd": lambda: flashtile.flash_attn_func(qt, kt, vt, causal=causal),
            "bwd": lambda: torch.autograd.grad(out, (q, k, v), dot, retain_graph=True),
            "launch": lambda: attention_backward(dot, *saved, opts)}


def provider_calls(name: str, q, k, v, dout, causal: bool) -> dict:
    forward = PROVIDERS[name](q, k, v, causal)
    out = forward()
    return {"fwd": forward,
            "bwd": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)}


print(f"{'D':>4} {'c':>2} {'N':>6} {'pass':>6} {'provider':>32} | {'host µs':>17} | "
      f"{'wall µs':>8} | {'waits ms':>8} |")
for D, causal, N in shapes:
    B, H = 16384 // N, 2048 // D
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    dout = torch.randn_like(q)
    rows = {}
    for name, switched in variants.items():
        configs.features.update(DEFAULT, **switched)
        for pass_, call in flashtile_calls(q, k, v, dout, bool(causal)).items():
            call()  # compiles and tunes before any timing
            rows[name, pass_] = (switched, call)
    for name in against:
        configs.features.update(DEFAULT)
        for pass_, call in provider_calls(name, q, k, v, dout, bool(causal)).items():
            call()
            rows[name, pass_] = ({}, call)
    configs.features.update(DEFAULT)
    times = {key: ([], []) for key in rows}
    for _ in range(args.rounds):
        for key, (switched, call) in rows.items():
            configs.features.update(DEFAULT, **switched)
            host, wall = host_and_wall(call, args.calls)
            times[key][0].append(host)
            times[key][1].append(wall)
    waits = {}
    for key, (switched, call) in rows.items():
        configs.features.update(DEFAULT, **switched)
        waits[key] = waits_ms(call)
    configs.features.update(DEFAULT)
    for (name, pass_), (host, wall) in times.items():
        h, w = statistics.median(host), statistics.median(wall)
        flag = "host-bound" if h >= 0.9 * w else ""
        print(f"{D:>4} {causal:>2} {N:>6} {pass_:>6} {name:>32} | "
              f"{h:6.0f} ({min(host):.0f}-{max(host):.0f}) | {w:8.0f} | "
              f"{waits[name, pass_]:8.2f} | {flag}", flush=True)
    if args.profile:
        call = rows["flashtile", "bwd"][1]
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU,
                                                torch.profiler.ProfilerActivity.CUDA],
                                    with_stack=False) as prof:
            for _ in range(args.calls):
                torch.cuda._sleep(20_000_000)
                call()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20),
              flush=True)
