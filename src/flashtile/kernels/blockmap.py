"""Block maps of a mask predicate: which tiles are empty, partial or full.

For a mask (masks.py) and a problem shape, `_block_map` evaluates the whole visibility rule
(bounds, causal/window, the predicate) over each MAP_BLOCK_M × MAP_BLOCK_N tile and classifies
it: 0 empty (no pair kept), 1 partial, 2 full (every pair kept). `block_lists` turns the map into
the lists the attention kernels walk:

    kv[b, h, query map block, kind, :]  kind 0 full, 1 partial: [count, key map blocks...]
    q [b, h, key map block,   kind, :]  the same per key map block, for the dK/dV pass

Kernel blocks must divide the map blocks (128 on the GPU, 32 under the interpreter). The lists
are built once per mask, shape and options, and cached on the mask object.
With DENSE, the kernel writes the elementwise keep matrix instead (for tests).

Grid: (cdiv(seqlen_q, MAP_BLOCK_M), cdiv(seqlen_k, MAP_BLOCK_N), map batch * map heads).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from flashtile.kernels import configs
from flashtile.kernels.common import apply_mask_mod, visible
from flashtile.kernels.launch import on_device


@triton.jit
def _block_map(
    Out, MaskData,
    stride_ob, stride_oh, stride_om, n_blocks_n,
    seqlen_q, seqlen_k, diag_offset, window_left, window_right, mask_data_stride,
    MAP_BLOCK_M: tl.constexpr, MAP_BLOCK_N: tl.constexpr,
    LOCAL_LEFT: tl.constexpr, LOCAL_RIGHT: tl.constexpr,
    MASK_MOD: tl.constexpr, MASK_DATA: tl.constexpr, DENSE: tl.constexpr,
):
    # grid: (query blocks × key blocks, heads, batch)
    block_m = tl.program_id(0) // n_blocks_n
    block_n = tl.program_id(0) % n_blocks_n
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    offs_m = block_m * MAP_BLOCK_M + tl.arange(0, MAP_BLOCK_M)
    offs_n = block_n * MAP_BLOCK_N + tl.arange(0, MAP_BLOCK_N)
    keep = visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag_offset,
                   window_left, window_right, LOCAL_LEFT, LOCAL_RIGHT)
    keep = apply_mask_mod(keep, off_b, off_h, offs_m[:, None], offs_n[None, :], seqlen_q,
                          seqlen_k, MaskData, mask_data_stride, MASK_MOD, MASK_DATA)
    out = Out + off_b.to(tl.int64) * stride_ob + off_h.to(tl.int64) * stride_oh
    if DENSE:
        tl.store(out + offs_m[:, None] * stride_om + offs_n[None, :], keep.to(tl.int8),
                 mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))
    else:
        kept = tl.sum(tl.sum(keep.to(tl.int32), 1), 0)
        state = tl.where(kept == 0, 0, tl.where(kept == MAP_BLOCK_M * MAP_BLOCK_N, 2, 1))
        tl.store(out + block_m * stride_om + block_n, state.to(tl.int8))


def map_block_size() -> int:
    return 32 if configs.interpreting() else 128


@dataclass(frozen=True)
class BlockLists:
    """The kernels' view of a block map (module docstring). Batch and head strides are 0 where
    the mask does not depend on them."""

    kv: torch.Tensor
    q: torch.Tensor
    map_block: int

    def kernel_args(self, kind: str) -> tuple:
        """(lists tensor, stride_b, stride_h, stride_row, stride_kind) for "kv" or "q"."""
        t = getattr(self, kind)
        strides = [0 if t.shape[i] == 1 else t.stride(i) for i in (0, 1)]
        return (t, *strides, t.stride(2), t.stride(3))


def _launch(mask, out, seqlen_q, seqlen_k, opts, block_m, block_n, dense):
    map_batch, map_heads = out.shape[:2]
    data = mask.data if mask.data is not None else out
    n_blocks_n = configs.cdiv(seqlen_k, block_n)
    grid = (configs.cdiv(seqlen_q, block_m) * n_blocks_n, map_heads, map_batch)
    flags = opts.flags()
    with on_device(out.device):
        _block_map[grid](
            out, data, out.stride(0), out.stride(1), out.stride(2), n_blocks_n,
            seqlen_q, seqlen_k, opts.diag_offset, max(opts.window_left, 0),
            max(opts.window_right, 0), mask.data_stride,
            MAP_BLOCK_M=block_m, MAP_BLOCK_N=block_n, LOCAL_LEFT=flags["LOCAL_LEFT"],
            LOCAL_RIGHT=flags["LOCAL_RIGHT"], MASK_MOD=mask.fn,
            MASK_DATA=mask.data is not None, DENSE=dense,
        )


def _lists(state: torch.Tensor) -> torch.Tensor:
    """(..., R, C) map states -> (..., R, 2, 1 + C) int32: per row, [count, column indices...]
    of its full (kind 0) and partial (kind 1) blocks, ascending."""
    parts = []
    for wanted in (2, 1):
        hit = state == wanted
        count = hit.sum(-1, dtype=torch.int32)[..., None]
        cols = torch.argsort((~hit).to(torch.int8), dim=-1, stable=True).to(torch.int32)
        parts.append(torch.cat([count, cols], dim=-1))
    return torch.stack(parts, dim=-2).contiguous()


def _normalized(device) -> torch.device:
    """"cuda" and "cuda:0" name one device: one cache entry."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None:
        device = torch.device("cuda", torch.cuda.current_device())
    return device


def block_lists(mask, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, opts,
                device) -> BlockLists:
    """The block lists of `mask` for this shape and these options, cached on the mask."""
    device = _normalized(device)
    mask = mask.to(device)
    size = map_block_size()
    map_batch = batch if mask.per_batch else 1
    map_heads = nheads if mask.per_head else 1
    key = (map_batch, map_heads, seqlen_q, seqlen_k, opts.diag_offset, opts.window_left,
           opts.window_right, size, str(device))
    if key not in mask._maps:
        state = torch.empty(map_batch, map_heads, configs.cdiv(seqlen_q, size),
                            configs.cdiv(seqlen_k, size), dtype=torch.int8, device=device)
        _launch(mask, state, seqlen_q, seqlen_k, opts, size, size, dense=False)
        mask._maps[key] = BlockLists(kv=_lists(state), q=_lists(state.transpose(-1, -2)),
                                     map_block=size)
    return mask._maps[key]


def dense_keep(mask, batch: int, nheads: int, seqlen_q: int, seqlen_k: int, opts,
               device) -> torch.Tensor:
    """(batch, nheads, seqlen_q, seqlen_k) bool: the full visibility rule with this mask, as
    the kernels see it (for tests and the reference)."""
    mask = mask.to(device)
    out = torch.empty(batch, nheads, seqlen_q, seqlen_k, dtype=torch.int8, device=device)
    size = map_block_size()
    _launch(mask, out, seqlen_q, seqlen_k, opts, size, size, dense=True)
    return out.bool()
