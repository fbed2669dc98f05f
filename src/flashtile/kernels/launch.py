"""Launching a compiled kernel again without `JITFunction.run`'s per-call work.

On every launch, Triton's `kernel[grid](*args)` binds each argument by name, computes its
specialization (a pointer's 16-byte alignment, an integer's divisibility by 16 or equality to 1,
its 32- or 64-bit range), hashes all of it into a cache key, builds launch metadata for the
launch hooks, and only then calls the compiled kernel's launcher. With ~55 arguments per kernel
that is most of a small attention call's host time (docs/performance.md, v5.7).

A model calls attention with the same shapes every step. `Launcher` remembers the compiled
kernel that Triton returned for a call's *signature*, and launches it directly when the same
signature comes again. The signature implies Triton's specialization, so the kernel launched is
the one Triton would have chosen:
- every non-tensor argument, positional or keyword (constexprs, launch options), by value;
- every tensor by its dtype and whether its address is 16-byte aligned, which is all Triton
  specializes a pointer on.
A new signature (first call, new shape or strides), a launch hook (a profiler such as Proton
adds one), and the interpreter all take Triton's own path.
"""

from __future__ import annotations

import contextlib
import functools

import torch
from triton import knobs
from triton.runtime import driver
from triton.runtime.jit import JITFunction

MAX_ENTRIES = 256  # signatures remembered per kernel; past that the memory starts again


class Launcher:
    """`Launcher(jit_fn)[grid](*args, **kwargs)`, the same call as `jit_fn[grid](...)`.
    `grid` is a tuple or a callable of the keyword arguments (the meta-parameters)."""

    def __init__(self, fn):
        self.fn = fn  # a triton.JITFunction; under the interpreter, an InterpretedFunction
        self.compiled = isinstance(fn, JITFunction)
        self.params = fn.params if self.compiled else []
        self.entries: dict[tuple, tuple] = {}  # signature -> (compiled kernel, trailing args)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.launch(grid, args, kwargs)
        return launch

    def launch(self, grid, args: tuple, kwargs: dict) -> None:
        if not self.compiled:
            self.fn[grid](*args, **kwargs)
            return
        rt = knobs.runtime
        key = (tuple([(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor) else a
                      for a in args]), tuple(kwargs.items()),
               driver.active.get_current_device())
        entry = self.entries.get(key)
        if entry is None or _hooked(rt.launch_enter_hook) or _hooked(rt.launch_exit_hook):
            compiled = self.fn[grid](*args, **kwargs)
            if entry is None and compiled is not None:
                self._remember(key, compiled, len(args), kwargs)
            return
        compiled, trailing = entry
        if callable(grid):
            grid = grid(kwargs)
        grid = (*grid, 1, 1)
        compiled.run(grid[0], grid[1], grid[2], driver.active.get_current_stream(key[-1]),
                     compiled.function, compiled.packed_metadata, None, None, None,
                     *args, *trailing)

    def _remember(self, key: tuple, compiled, npos: int, kwargs: dict) -> None:
        """The parameters after the positional ones, in order, as Triton binds them: a keyword
        argument's value, else the parameter's default. Constants of the signature, so they are
        stored with it."""
        trailing = []
        for param in self.params[npos:]:
            if param.name in kwargs:
                trailing.append(kwargs[param.name])
            elif param.has_default:
                trailing.append(param.default)
            else:
                return  # Triton would have raised; nothing to remember
        if len(self.entries) >= MAX_ENTRIES:
            self.entries.clear()
        self.entries[key] = (compiled, tuple(trailing))


@functools.cache
def launcher_for(fn) -> Launcher:
    """The one `Launcher` of kernel `fn`, made on its first call: for call sites that choose
    between Triton's own launch and this one at run time (the Gluon kernels, by
    configs.features["gluon_launcher"])."""
    return Launcher(fn)


def _hooked(hook) -> bool:
    """Whether a launch hook is set: Triton 3.6 keeps them in HookChains, empty by default;
    a plain function or None is also accepted there."""
    return hook is not None and bool(getattr(hook, "calls", True))


def on_device(device: torch.device):
    """A context in which `device` is the current CUDA device, as FlashAttention's device guard
    makes it: Triton launches on the current device, and a model split across GPUs in one
    process (transformers' device_map="auto") calls attention with tensors on another one."""
    if device.type != "cuda" or device.index is None or (
            device.index == torch.cuda.current_device()):
        return contextlib.nullcontext()
    return torch.cuda.device(device)


def on_first_tensors_device(fn):
    """Run a launcher function (its first argument a tensor) with that tensor's device current."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        with on_device(args[0].device):
            return fn(*args, **kwargs)

    return wrapper
