"""Block sizes, warps and pipeline depth for each kernel, per head dim and dtype.

Under the Triton interpreter (CPU) the blocks are small and unequal (BLOCK_M != BLOCK_N), so that
tests of modest sequence lengths cross many blocks, the causal diagonal and the ragged ends.
On the GPU the sizes are chosen per padded head dim; docs/performance.md records why.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton


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


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def head_dim_pad(head_dim: int) -> int:
    """Head dims are padded to a power of two (at least 16, the smallest tl.dot size)."""
    return max(16, triton.next_power_of_2(head_dim))


def set_override(kernel: str, config: KernelConfig | None) -> None:
    """Force a config for one kernel ("fwd", "bwd_dkdv", "bwd_dq"); None removes it. For tests."""
    if config is None:
        _override.pop(kernel, None)
    else:
        _override[kernel] = config


def get_config(kernel: str, head_dim: int, dtype: torch.dtype) -> KernelConfig:
    if kernel in _override:
        return _override[kernel]
    if interpreting():
        return _INTERPRETER
    d = head_dim_pad(head_dim)
    wide = dtype == torch.float32  # 4-byte tiles: half the elements fit in shared memory
    if kernel == "fwd":
        if d <= 64:
            return KernelConfig(128, 64, num_warps=4, num_stages=3)
        if d <= 128:
            return KernelConfig(128, 32 if wide else 64, num_warps=8, num_stages=2 if wide else 3)
        return KernelConfig(64, 32, num_warps=8, num_stages=2 if wide else 3)
    if kernel == "bwd_dkdv":
        if d <= 64:
            return KernelConfig(32, 128, num_warps=4, num_stages=3)
        if d <= 128:
            return KernelConfig(32 if wide else 64, 128 if not wide else 64, num_warps=8,
                                num_stages=2)
        return KernelConfig(16, 64, num_warps=8, num_stages=1)
    if kernel == "bwd_dq":
        if d <= 64:
            return KernelConfig(128, 32, num_warps=4, num_stages=3)
        if d <= 128:
            return KernelConfig(128 if not wide else 64, 32 if not wide else 32, num_warps=8,
                                num_stages=2)
        return KernelConfig(64, 16, num_warps=8, num_stages=1)
    raise ValueError(f"unknown kernel {kernel!r}")


PREPROCESS_BLOCK_M = 64
