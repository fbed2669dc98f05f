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

A whole call can be remembered the same way: inside `with recording() as launches:` every
launch through a Launcher on this thread is kept, and `Replay` makes one of them again with
other tensors in the same places (kernels/plans.py, configs.features["replay"]).
"""

from __future__ import annotations

import contextlib
import functools
import threading

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
        launches = getattr(_recording, "launches", None)
        if not self.compiled:
            self.fn[grid](*args, **kwargs)
            if launches is not None:
                launches.append(Recorded(self.fn, grid(kwargs) if callable(grid) else grid,
                                         args, kwargs=kwargs))
            return
        key = (tuple([(a.dtype, a.data_ptr() & 15 == 0) if isinstance(a, torch.Tensor) else a
                      for a in args]), tuple(kwargs.items()),
               driver.active.get_current_device())
        entry = self.entries.get(key)
        if entry is None or hooks_set():
            compiled = self.fn[grid](*args, **kwargs)
            if entry is None and compiled is not None:
                self._remember(key, compiled, len(args), kwargs)
            if launches is not None:
                launches.complete = False  # launched by Triton: nothing to make again
            return
        compiled, trailing = entry
        if callable(grid):
            grid = grid(kwargs)
        grid = (*grid, 1, 1)
        if launches is not None:
            launches.append(Recorded(compiled, grid, args, trailing=trailing))
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


def hooks_set() -> bool:
    """Whether a launch hook is set (a profiler's): then every launch takes Triton's path,
    which calls it."""
    rt = knobs.runtime
    return _hooked(rt.launch_enter_hook) or _hooked(rt.launch_exit_hook)


def _hooked(hook) -> bool:
    """Whether a launch hook is set: Triton 3.6 keeps them in HookChains, empty by default;
    a plain function or None is also accepted there."""
    return hook is not None and bool(getattr(hook, "calls", True))


# -- Recording a call's launches, and making them again ------------------------------------

_recording = threading.local()  # .launches: the Recording in progress on this thread


class Recorded:
    """One launch: the kernel (Triton's compiled kernel, or under the interpreter the function
    itself), its grid (a tuple: three entries when compiled) and arguments; `trailing` the
    compiled kernel's remaining parameters (Launcher._remember), `kwargs` the interpreted
    function's keyword arguments."""

    def __init__(self, kernel, grid: tuple, args: tuple, trailing: tuple = (),
                 kwargs: dict | None = None):
        self.kernel, self.grid, self.args = kernel, grid, args
        self.trailing, self.kwargs = trailing, kwargs


class Recording(list):
    """The Recorded launches of one `recording()`, in order. `complete` is False when a launch
    inside went through Triton's own path (a first signature, a launch hook), which is not
    recorded."""

    complete = True


@contextlib.contextmanager
def recording():
    """`with recording() as launches:` keeps every launch through a Launcher on this thread."""
    previous = getattr(_recording, "launches", None)
    _recording.launches = launches = Recording()
    try:
        yield launches
    finally:
        _recording.launches = previous


class Replay:
    """A Recorded launch made again for other tensors of the same signature. Each tensor
    argument of the recorded launch must be exactly one of `tensors` (by identity): it becomes
    that position, and `replay(tensors)` launches with the new call's tensors there. No tensor
    of the recorded call is kept. Raises LookupError for a tensor that is not among them, or
    that stands in several places of them (flash_attn_func(x, x, x): which of q, k, v a
    parameter took could not be told, and a later call with three tensors would get the
    wrong one), and for an argument that is neither a tensor nor a plain value."""

    def __init__(self, recorded: Recorded, tensors: tuple):
        self.kernel, self.grid = recorded.kernel, recorded.grid
        self.trailing, self.kwargs = recorded.trailing, recorded.kwargs
        self.compiled = recorded.kwargs is None
        self.args = list(recorded.args)
        self.slots = []  # (argument position, index into tensors)
        for position, arg in enumerate(recorded.args):
            if isinstance(arg, torch.Tensor):
                found = [i for i, t in enumerate(tensors) if t is arg]
                if len(found) != 1:
                    raise LookupError(f"argument {position} is {len(found)} of the call's "
                                      "tensors, not one")
                self.slots.append((position, found[0]))
                self.args[position] = None
            elif not isinstance(arg, (int, float, str, type(None))):
                # an object that may hold a tensor (a host-side tensor descriptor): replayed as
                # it is, it would point at the recorded call's memory
                raise LookupError(f"argument {position} is a {type(arg).__name__}")

    def replay(self, tensors: tuple) -> None:
        args = self.args.copy()
        for position, index in self.slots:
            args[position] = tensors[index]
        if not self.compiled:
            self.kernel[self.grid](*args, **self.kwargs)
            return
        kernel, grid = self.kernel, self.grid
        stream = driver.active.get_current_stream(driver.active.get_current_device())
        kernel.run(grid[0], grid[1], grid[2], stream, kernel.function, kernel.packed_metadata,
                   None, None, None, *args, *self.trailing)


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
