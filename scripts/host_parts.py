"""Where one call's host time goes: µs per call of each piece of flashtile's backward and forward
(D 128 causal N 512 by default, (B, N, H, D) bf16 tensors, B·N = 16k, H 16), then the floors
under them. docs/performance.md v7.6 has its figures.

Usage: python scripts/host_parts.py [--calls C] [--no-replay] [D,causal,N]
--no-replay: with configs.features["replay"] (plans, v7.7; on by default) off after part 2's
capture, which always runs with it off, so that every launch goes through Launcher.

Part 1: the functions a call goes through are wrapped with timers (perf_counter, ~0.5 µs of
overhead each, so the total reads a little high); per pass, each piece's host µs per call,
inclusive of what it calls, and how many times a call enters it.
Part 2: per compiled launch of the backward, Triton's C launcher alone (`compiled.run`) with
the tensors as arguments and with their data_ptr() integers (for which it skips
cuPointerGetAttribute), against launch.Launcher's whole launch; then torch.autograd.grad
through an autograd.Function that launches nothing, through flashtile, and through SDPA.
"""

import argparse
import collections
import time

import torch
import triton
from triton.backends.nvidia import driver as nvidia_driver
from triton.runtime import driver

import flashtile
from flashtile import interface
from flashtile.kernels import backward, configs, forward, hopper, hopper_backward, launch, params

parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
parser.add_argument("--calls", type=int, default=20)
parser.add_argument("--no-replay", action="store_true")
parser.add_argument("shape", nargs="?", default="128,1,512", help="D,causal,N")
args = parser.parse_args()
D, causal, N = (int(x) for x in args.shape.split(","))
B, H = 16384 // N, 2048 // D
q, k, v = (torch.randn(B, N, H, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
           for _ in range(3))
dout = torch.randn_like(q)


def host_us(call, calls: int, rounds: int = 7) -> str:
    """Median (range) over rounds of the host's µs per call, synchronized between rounds."""
    per_call = []
    for _ in range(rounds):
        torch.cuda.synchronize()
        start = time.perf_counter()
        for _ in range(calls):
            call()
        per_call.append((time.perf_counter() - start) / calls * 1e6)
    torch.cuda.synchronize()
    per_call.sort()
    return f"{per_call[len(per_call) // 2]:7.1f} ({per_call[0]:.1f}-{per_call[-1]:.1f})"


# Part 2 first, before any wrapper: the backward's compiled launches, as Launcher makes them
launches = {}
unwrapped = launch.Launcher.launch


def remember(self, grid, launch_args, kwargs):
    launches.setdefault(self.fn.__name__, (self, grid, launch_args, kwargs))
    return unwrapped(self, grid, launch_args, kwargs)


configs.features["replay"] = False
out = flashtile.flash_attn_func(q, k, v, causal=bool(causal))
for _ in range(3):  # compiles and tunes; Launcher remembers the signatures
    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
launch.Launcher.launch = remember
torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
launch.Launcher.launch = unwrapped
configs.features["replay"] = not args.no_replay
for _ in range(2):  # with replay on: records the plan
    torch.autograd.grad(out, (q, k, v), dout, retain_graph=True)
triton.set_allocator(configs._tma_allocator)  # the Gluon kernels' scratch, on this thread too


def launch_floors(name: str, launcher, grid, launch_args: tuple, kwargs: dict) -> str:
    key = (tuple([(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor) else a
                  for a in launch_args]), tuple(kwargs.items()), driver.active.get_current_device())
    compiled, trailing = launcher.entries[key]
    grid_xyz = (*(grid(kwargs) if callable(grid) else grid), 1, 1)
    stream = driver.active.get_current_stream(key[-1])
    as_ints = [a.data_ptr() if isinstance(a, torch.Tensor) else a for a in launch_args]
    tensors = sum(isinstance(a, torch.Tensor) for a in launch_args)

    def run(values):
        compiled.run(grid_xyz[0], grid_xyz[1], grid_xyz[2], stream, compiled.function,
                     compiled.packed_metadata, None, None, None, *values, *trailing)

    return (f"{name:28s} {tensors:2d} tensors | compiled.run "
            f"{host_us(lambda: run(launch_args), 50)} | with ints "
            f"{host_us(lambda: run(as_ints), 50)} | Launcher.launch "
            f"{host_us(lambda: launcher.launch(grid, launch_args, kwargs), 50)}")


def grad_of(output, inputs, grad):
    return lambda: torch.autograd.grad(output, inputs, grad, retain_graph=True)


floors = [launch_floors(name, *entry) for name, entry in launches.items()]


class LaunchesNothing(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v):
        return q.detach().clone()

    @staticmethod
    def backward(ctx, grad):
        return grad, grad, grad


empty_out = LaunchesNothing.apply(q, k, v)
floors.append("autograd.grad, a Function launching nothing "
              f"{host_us(grad_of(empty_out, (q, k, v), dout), 200)}")
floors.append("autograd.grad, flashtile                    "
              f"{host_us(grad_of(out, (q, k, v), dout), 50)}")
qt, kt, vt = (t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v))
sdpa_out = torch.nn.functional.scaled_dot_product_attention(qt, kt, vt, is_causal=bool(causal))
sdpa_dout = dout.transpose(1, 2)
floors.append("autograd.grad, SDPA (its default backend)   "
              f"{host_us(grad_of(sdpa_out, (qt, kt, vt), sdpa_dout), 50)}")

# Part 1: the pieces
seconds, entered = collections.defaultdict(float), collections.Counter()


def wrap(owner, name: str, label: str | None = None) -> None:
    fn = getattr(owner, name)
    label = label or f"{getattr(owner, '__name__', type(owner).__name__)}.{name}"

    def timed(*a, **kw):
        start = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            seconds[label] += time.perf_counter() - start
            entered[label] += 1

    setattr(owner, name, timed)


for name in ("_backward", "_forward", "_check_qkv", "_options", "_check_tensors"):
    wrap(interface, name, f"interface.{name}")
wrap(interface._FlashAttnFunction, "apply", "_FlashAttnFunction.apply")
wrap(launch, "on_device", "launch.on_device")
wrap(torch, "empty_like", "torch.empty_like")
wrap(backward._preprocess, "launch", "preprocess: Launcher.launch")
for tunable in (backward._attn_bwd_dq_tunable, backward._attn_bwd_dkdv_tunable):
    wrap(tunable, "select", f"{tunable.name}: Tunable.select")
    wrap(tunable.launcher, "launch", f"{tunable.name}: Launcher.launch")
    wrap(tunable.remembered, "key", f"{tunable.name}: Remembered.key")
wrap(launch.Launcher, "launch", "Launcher.launch (the Gluon kernels')")
wrap(nvidia_driver.CudaLauncher, "__call__", "Triton's C launcher (every launch)")
wrap(backward._DqStream, "__init__", "_DqStream.__init__")
wrap(backward._DqStream, "__exit__", "_DqStream.__exit__")
wrap(torch.cuda, "current_stream", "torch.cuda.current_stream")
for name in ("preferred", "dkdv", "dq", "_tma_ready"):
    wrap(hopper_backward, name, f"hopper_backward.{name}")
for name in ("supports", "preferred", "attention_forward"):
    wrap(hopper, name, f"hopper.{name}")
wrap(forward, "attention_forward", "forward.attention_forward")
wrap(triton, "set_allocator", "triton.set_allocator")
for name in ("strides", "scalars", "flags", "mask_args", "mask_flags", "alibi", "cu_seqlens",
             "problem"):
    wrap(params.AttnOptions, name, f"opts.{name}")
for name in ("use_tma", "dot_precision", "seqlen_bucket", "head_dim_pad"):
    wrap(configs, name, f"configs.{name}")

passes = {"bwd": lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
          "fwd": lambda: flashtile.flash_attn_func(q, k, v, causal=bool(causal))}
print(f"D {D}, causal {causal}, N {N}, B {B}, H {H}; features {configs.features}")
for name, call in passes.items():
    for _ in range(3):
        call()
    torch.cuda.synchronize()
    seconds.clear()
    entered.clear()
    total, calls = 0.0, 0
    for _ in range(10):
        for _ in range(args.calls):
            start = time.perf_counter()
            call()
            total += time.perf_counter() - start
            calls += 1
        torch.cuda.synchronize()
    print(f"== {name}: {total / calls * 1e6:.0f} µs per call, wrappers included")
    for label, spent in sorted(seconds.items(), key=lambda item: -item[1]):
        print(f"   {spent / calls * 1e6:8.1f} µs  x{entered[label] / calls:.0f}  {label}")
print("== floors (host µs per call, median (range) of 7 rounds)")
print("\n".join(floors))
