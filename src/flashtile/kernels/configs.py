"""Block sizes, warps and pipeline depth for each kernel: fixed under the interpreter, autotuned
over a small pruned set per head dim on the GPU.

Under the Triton interpreter (CPU) the blocks are small and unequal (BLOCK_M != BLOCK_N), so that
tests of modest sequence lengths cross many blocks, the causal diagonal and the ragged ends.

On the GPU each kernel is wrapped in `triton.autotune` over the candidates below, keyed by the
padded head dim, dot precision, a log2 bucket of the sequence length and the compile-time
flags of the score modifications (kernels/params.py); the winner is
cached in memory and on disk (Triton's cache directory), so only the first call of a new key
pays for tuning. The candidate lists were pruned from larger sweeps on an H100
(docs/performance.md).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import torch
import triton

from flashtile.kernels.launch import Launcher

log = logging.getLogger("flashtile")

KERNELS = ("fwd", "bwd_dkdv", "bwd_dq")
PREPROCESS_BLOCK_M = 64


@dataclass(frozen=True)
class KernelConfig:
    BLOCK_M: int
    BLOCK_N: int
    num_warps: int = 4
    num_stages: int = 1

    def launch_kwargs(self) -> dict[str, int]:
        if interpreting():
            return {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N}
        return {"BLOCK_M": self.BLOCK_M, "BLOCK_N": self.BLOCK_N,
                "num_warps": self.num_warps, "num_stages": self.num_stages}


_INTERPRETER = KernelConfig(BLOCK_M=32, BLOCK_N=16)
_override: dict[str, KernelConfig] = {}


# Read once: Triton decides at import, when it decorates the kernels, whether they are
# interpreted, so the answer cannot change afterwards (and each launch asked it several times).
_INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"


def interpreting() -> bool:
    return _INTERPRETING


def head_dim_pad(head_dim: int) -> int:
    """Head dims are padded to a power of two (at least 16, the smallest tl.dot size). Plain
    Python: triton.next_power_of_2 is a jit-capable function whose host call costs µs, and
    every launch asks this several times."""
    return max(16, 1 << (head_dim - 1).bit_length())


def cdiv(a: int, b: int) -> int:
    """⌈a / b⌉ in plain Python, for grids: triton.cdiv is a jit-capable function whose host call
    costs µs, and every launch asks it."""
    return -(-a // b)


def seqlen_bucket(seqlen_q: int, seqlen_k: int) -> int:
    """Autotuning key for the sequence length: log2 of the longer one, capped at 16k."""
    return min(max(seqlen_q, seqlen_k, 1), 16384).bit_length()


def set_override(kernel: str, config: KernelConfig | None) -> None:
    """Force a config for one kernel ("fwd", "bwd_dkdv", "bwd_dq"); None removes it.
    For tests and tuning sweeps."""
    if kernel not in KERNELS:
        raise ValueError(f"kernel must be one of {KERNELS}, got {kernel!r}")
    if config is None:
        _override.pop(kernel, None)
    else:
        _override[kernel] = config


def choice_state() -> tuple:
    """What decides a launch's config besides the call itself (the overrides, autotuning on or
    off): part of a plan's signature (kernels/plans.py)."""
    return tuple(_override.items()), autotuning()


def autotuning() -> bool:
    """FLASHTILE_AUTOTUNE=0 launches each kernel with the first candidate of its head dim
    instead of tuning: the GPU tests of many flag combinations use it to keep compiles few."""
    return os.environ.get("FLASHTILE_AUTOTUNE", "1") != "0"


def fixed_config(kernel: str, head_dim_padded: int, precision: str,
                 decode: bool = False) -> KernelConfig | None:
    """The config to launch with directly (the interpreter's, an override, the first candidate
    with FLASHTILE_AUTOTUNE=0, or the only one listed), or None to let the autotuner choose.
    decode: the forward against a KV cache (`candidates`)."""
    if kernel in _override:
        return _override[kernel]
    if interpreting():
        return _INTERPRETER
    listed = candidates(kernel, head_dim_padded, precision, decode)
    if not autotuning() or len(listed) == 1:
        return KernelConfig(*listed[0])
    return None


# -- GPU candidates: (BLOCK_M, BLOCK_N, num_warps, num_stages) per kernel and padded head dim --
# float32 (IEEE dots) tiles take twice the shared memory: they get the small-tile lists.
_CANDIDATES: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {
        64: [(128, 64, 4, 3), (128, 128, 8, 3), (64, 64, 4, 4), (128, 64, 4, 4), (128, 128, 4, 3)],
        128: [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (128, 64, 8, 4),
              (128, 128, 8, 2), (64, 64, 4, 3)],
        256: [(64, 32, 4, 2), (64, 64, 8, 2), (128, 64, 8, 2), (128, 32, 8, 2)],
        512: [(64, 32, 8, 1), (32, 32, 4, 1), (64, 16, 8, 1), (32, 16, 4, 1)],
    },
    "bwd_dkdv": {
        64: [(32, 128, 4, 3), (64, 128, 4, 3), (64, 128, 8, 3), (32, 64, 4, 4), (64, 64, 4, 3)],
        128: [(64, 128, 8, 2), (32, 128, 4, 3), (32, 128, 4, 5), (32, 128, 8, 3),
              (64, 128, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4)],
        256: [(16, 64, 8, 1), (32, 64, 8, 1), (32, 64, 8, 2), (16, 64, 4, 2)],
        512: [(16, 32, 8, 1), (16, 16, 4, 1), (32, 32, 8, 1), (16, 16, 8, 1)],
    },
    "bwd_dq": {
        64: [(128, 32, 4, 3), (128, 64, 8, 3), (64, 64, 4, 3), (128, 64, 4, 3)],
        128: [(128, 32, 8, 2), (128, 64, 8, 2), (128, 32, 4, 3), (64, 64, 4, 3),
              (128, 64, 8, 3), (64, 32, 4, 4)],
        256: [(64, 16, 8, 1), (64, 32, 8, 1), (32, 32, 4, 2), (64, 32, 8, 2)],
        512: [(32, 16, 8, 1), (16, 16, 4, 1), (32, 32, 8, 1), (16, 16, 8, 1)],
    },
}
# One candidate each, so float32 is never tuned: an IEEE float32 dot compiles to FMA loops, and
# on the H100 host each forward config took 35-48 s to compile (all three kernels ~40 s per
# config), so tuning three made a first float32 call take minutes. float32 is the accuracy
# path, not a speed target. The 128 entries are the ones tuning chose at 1000 × 1000, D 128.
_CANDIDATES_FP32: dict[str, dict[int, list[tuple[int, int, int, int]]]] = {
    "fwd": {128: [(64, 32, 4, 2)], 256: [(32, 16, 4, 1)], 512: [(16, 16, 4, 1)]},
    "bwd_dkdv": {128: [(32, 32, 4, 2)], 256: [(16, 32, 4, 1)], 512: [(16, 16, 4, 1)]},
    "bwd_dq": {128: [(32, 32, 4, 2)], 256: [(32, 16, 4, 1)], 512: [(16, 16, 4, 1)]},
}


# Decoding against a KV cache (the forward with KV_CACHE): a few query rows per program, so
# BLOCK_M = 16, the smallest tl.dot tile, and long key blocks. D 128 has one config, not tuned:
# (16, 128, 4, 2) was the fastest or within 1% of it at every measured case (caches of 16k and
# 128k, B 1 and 8, contiguous and paged), and tuning, keyed by a length bucket that 16k and
# 128k share, could pick on a launch-bound first call a config 13% slower at 128k × 8 paged
# (docs/performance.md, v5.18). The other head dims: not yet measured.
_CANDIDATES_DECODE: dict[int, list[tuple[int, int, int, int]]] = {
    64: [(16, 64, 4, 3), (16, 128, 4, 3), (64, 64, 4, 3)],
    128: [(16, 128, 4, 2)],
    256: [(16, 32, 4, 2), (16, 64, 4, 2), (64, 32, 4, 2)],
    512: [(16, 16, 4, 1), (16, 32, 4, 1)],
}


def _tag(config: triton.Config) -> tuple:
    return (config.kwargs["BLOCK_M"], config.kwargs["BLOCK_N"], config.num_warps,
            config.num_stages)


def tuning_space(kernel: str) -> list[triton.Config]:
    """Every candidate of a kernel, all head dims together; `prune` keeps the relevant ones."""
    tables = [_CANDIDATES[kernel], _CANDIDATES_FP32[kernel]]
    if kernel == "fwd":
        tables.append(_CANDIDATES_DECODE)
    tags = {t for table in tables for per_dim in table.values() for t in per_dim}
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in sorted(tags)]


def candidates(kernel: str, head_dim_padded: int, precision: str,
               decode: bool = False) -> list[tuple]:
    """The (BLOCK_M, BLOCK_N, num_warps, num_stages) candidates for a padded head dim: those
    listed for the smallest listed head dim that covers it (decode: the forward against a KV
    cache, in 16-bit dtypes)."""
    if decode and kernel == "fwd" and precision != "ieee":
        table = _CANDIDATES_DECODE
    else:
        table = (_CANDIDATES_FP32 if precision == "ieee" else _CANDIDATES)[kernel]
    dims = sorted(table)
    return table[next((d for d in dims if d >= head_dim_padded), dims[-1])]


def pruner(kernel: str):
    """early_config_prune for triton.autotune: the candidates of this head dim and precision,
    logging once per key that tuning is under way."""

    def prune(configs, named_args, **kwargs):
        wanted = set(candidates(kernel, kwargs["HEAD_DIM_PAD"], kwargs["DOT_PRECISION"],
                                decode=bool(kwargs.get("KV_CACHE", False))))
        kept = [c for c in configs if _tag(c) in wanted]
        # a warning, so that it shows without any logging set up: it explains the pause
        log.warning("flashtile: autotuning %s for head dim %d over %d configs (first call "
                    "of this shape bucket; the choice is cached on disk)", kernel,
                    kwargs["HEAD_DIM"], len(kept))
        return kept

    return prune


TUNING_KEY = ["HEAD_DIM_PAD", "DOT_PRECISION", "seqlen_bucket", "USE_TMA",
              "LOCAL_LEFT", "LOCAL_RIGHT", "SOFTCAP", "HAS_ALIBI", "DROPOUT", "MASK_DATA",
              "MAP_BLOCK_M", "group", "VARLEN"]


TUNABLES: list[Tunable] = []  # every Tunable made, in import order (for `tuned_choices`)


class Tunable:
    """A kernel beside its autotuned twin. `select(head_dim_padded, precision, decode)` gives
    what to launch: the kernel (through `Launcher`) with a fixed config (interpreter, override,
    FLASHTILE_AUTOTUNE=0, a single candidate), else the autotuner over `tuning_space(name)`,
    keyed by TUNING_KEY, through `Remembered`."""

    def __init__(self, name: str, kernel, extra_key: tuple[str, ...] = ()):
        TUNABLES.append(self)
        self.name = name
        self.kernel = kernel
        self.tuned = triton.autotune(
            tuning_space(name), key=TUNING_KEY + list(extra_key), cache_results=True,
            prune_configs_by={"early_config_prune": pruner(name)})(kernel)
        self.launcher = Launcher(kernel)
        self.remembered = Remembered(self)

    def select(self, head_dim_padded: int, precision: str, decode: bool = False):
        fixed = fixed_config(self.name, head_dim_padded, precision, decode)
        return (self.launcher, fixed.launch_kwargs()) if fixed else (self.remembered, {})


class Remembered:
    """`tunable.remembered[grid](*args, **kwargs)`: the autotuner on the first call of a tuning
    key, then its choice launched on the kernel directly (through `Launcher`). triton.autotune's
    own call binds every argument by name each time: on the H100's host that Python took as
    long as a small problem's GPU work (docs/performance.md, v5 outcome)."""

    def __init__(self, tunable: Tunable):
        self.tunable = tunable
        self.best: dict[tuple, dict] = {}  # tuning key + dtype -> the config's launch kwargs
        self._index: dict[str, int] | None = None

    def key(self, args: tuple, kwargs: dict) -> tuple:
        if self._index is None:
            self._index = {n: i for i, n in enumerate(self.tunable.kernel.arg_names)}
        values = [kwargs[n] if n in kwargs else args[self._index[n]]
                  for n in self.tunable.tuned.keys]
        return (*values, args[0].dtype)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            key = self.key(args, kwargs)
            best = self.best.get(key)
            if best is None:
                self.tunable.tuned[grid](*args, **kwargs)
                self.best[key] = self.tunable.tuned.best_config.all_kwargs()
            else:
                self.tunable.launcher.launch(grid, args, {**kwargs, **best})

        return launch


def tuned_choices() -> list[dict]:
    """The configs this process's autotuners chose (or read from Triton's disk cache): one
    entry per kernel and tuning key, {"kernel", "key": {name: value}, "config": launch
    kwargs}. For benchmark reports, so that a run's figures can be traced to its configs."""
    choices = []
    for tunable in TUNABLES:
        names = [*tunable.tuned.keys, "dtype"]  # Remembered.key's order
        for key, config in tunable.remembered.best.items():
            choices.append({"kernel": tunable.name,
                            "key": {n: _plain(v) for n, v in zip(names, key)},
                            "config": {n: _plain(v) for n, v in config.items()}})
    return choices


def _plain(value):
    """A JSON-ready form of a tuning key's or config's value."""
    return value if isinstance(value, (bool, int, float, str, type(None))) else str(value)


def dot_precision(dtype: torch.dtype) -> str:
    """float32 inputs are computed to float32 accuracy: IEEE dots, never tf32."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Kernel features that tests and tuning sweeps switch (docs/performance.md):
# - tma_forward: TMA loads made the forward 9-15% faster on an H100 at head dim 128 (v2),
#   from 2k keys (shorter: TMA_FORWARD_MIN_SEQLEN_K below);
# - tma_backward: the backward with TMA moved -4% to +3%, within noise, so it keeps plain loads;
# - tma_paged: paged KV caches through TMA were slower than the gather path (v5.5);
# - overlap_dq: dQ on a second stream beside dK/dV, 0-5% faster, most at N = 1k (v5.8);
# - gluon_forward: the dense forward through kernels/hopper.py on Hopper GPUs, where it
#   measured faster (v6: up to 1.2x the Triton forward at D 128);
# - gluon_backward: the dense backward's passes through kernels/hopper_backward.py on Hopper
#   GPUs, each where it measured faster (v7);
# - gluon_varlen: packed batches (one cu_seqlens for queries and keys) through the Gluon
#   kernels too (v7.2: a drawn batch's forward 1.18x, backward 1.11x the Triton kernels');
# - gluon_launcher: the Gluon kernels launched through launch.Launcher, as the Triton kernels
#   are, instead of Triton's per-call binding: ~37 µs less host time per Gluon launch on the
#   H200's host, where the backward at N <= 1k waits for the host (v7.4, v7.6).
# - replay: a dense forward or backward whose signature was seen replays the launches
#   recorded for it (kernels/plans.py) instead of deciding and binding them again: on the
#   H200's host, ~170 µs less per short backward and ~45 less per forward (v7.7).
features = {"tma_forward": True, "tma_backward": False, "tma_paged": False,
            "overlap_dq": True, "gluon_forward": True, "gluon_backward": True,
            "gluon_varlen": True, "gluon_launcher": True, "replay": True}


# The forward's TMA descriptors are made in each program, once: a cost that its loop over the
# keys repays only when the loop is long. With fewer keys than this (and no KV cache, where
# pointer loads measured slower, v5.10) forward.py loads through pointers: on the H200 that was
# 3-15% faster at N = 512-1k, within 3% either way at 2k (docs/performance.md, v7.3).
# 0: TMA at every length.
TMA_FORWARD_MIN_SEQLEN_K = 2048


def _tma_allocator(size: int, alignment: int, stream):
    """Global scratch for tensor descriptors made inside kernels."""
    return torch.empty(size, dtype=torch.int8, device="cuda")


def use_tma(pass_name: str, *tensors: torch.Tensor) -> bool:
    """Whether a pass ("forward", "backward") reads these (B, N, H, D) tensors through TMA
    descriptors: when its feature is on, the head dim is a power of two of at least 16 bytes
    with unit stride, and every other stride and the data pointer are 16-byte aligned. Other
    tensors take the pointer path."""
    if not features[f"tma_{pass_name}"]:
        return False
    for t in tensors:
        elt = t.element_size()
        head_dim = t.shape[-1]
        if head_dim != head_dim_pad(head_dim) or head_dim * elt < 16 or t.stride(-1) != 1:
            return False
        if any(s * elt % 16 for s in t.stride()[:-1]) or t.data_ptr() % 16:
            return False
    if not interpreting():
        # Set on every call: Triton keeps the allocator in a context variable, and autograd runs
        # the backward on another thread, where one set in the forward is not seen.
        triton.set_allocator(_tma_allocator)
    return True
