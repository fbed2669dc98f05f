"""Folding one more partial result into a running one, in place: the step ring attention takes
after each K/V block (docs/derivation.md §16, the running form of forward.combine_splits).

For a row whose keys are split into disjoint blocks, with (O, LSE) the result over the blocks
seen so far and (O_s, LSE_s) the kernel's result over the next block alone:

    LSE' = log(exp(LSE) + exp(LSE_s)),    O' = exp(LSE − LSE') O + exp(LSE_s − LSE') O_s.

A row that has seen no key in either keeps O = 0, LSE = −∞ (both weights are then exp(−∞) = 0).
One launch reads O, O_s and both LSEs once and writes O and LSE once; written with torch it took
seven operations and three passes over O (docs/performance.md v7.12).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from flashtile.kernels import configs
from flashtile.kernels.launch import Launcher

BLOCK_M = 32  # rows of one (batch, head) per program


@triton.jit
def _merge_partial(
    O, LSE, O_s, LSE_s,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_sb, stride_sm, stride_sh, stride_sd,
    stride_lb, stride_lh, stride_lm,
    stride_tb, stride_th, stride_tm,
    seqlen,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    """Rows [pid 0 · BLOCK_M, + BLOCK_M) of head pid 1, batch entry pid 2: (O, LSE) and
    (O_s, LSE_s) merged into (O, LSE), in O's dtype. Grid: (cdiv(seqlen, BLOCK_M), H, B)."""
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows = offs_m < seqlen
    lse_at = LSE + off_b * stride_lb + off_h * stride_lh + offs_m * stride_lm
    lse = tl.load(lse_at, mask=rows, other=float("-inf"))
    lse_s = tl.load(LSE_s + off_b * stride_tb + off_h * stride_th + offs_m * stride_tm,
                    mask=rows, other=float("-inf")).to(lse.dtype)
    # -- LSE' = log(exp(LSE) + exp(LSE_s)) from the larger m of the two (no overflow; the sum
    # is then >= 1); a row that has seen nothing in either (m = -inf) stays at -inf --
    m = tl.maximum(lse, lse_s)
    seen = m != float("-inf")
    m_safe = tl.where(seen, m, 0.0)
    total = m + tl.log(tl.where(seen, tl.exp(lse - m_safe) + tl.exp(lse_s - m_safe), 1.0))
    finite = tl.where(total == float("-inf"), 0.0, total)
    weight = tl.exp(lse - finite)
    weight_s = tl.exp(lse_s - finite)
    tile = rows[:, None] & (offs_d[None, :] < HEAD_DIM)
    o_at = (O + off_b * stride_ob + off_h * stride_oh + offs_m[:, None] * stride_om
            + offs_d[None, :] * stride_od)
    o = tl.load(o_at, mask=tile, other=0.0)
    o_s = tl.load(O_s + off_b * stride_sb + off_h * stride_sh + offs_m[:, None] * stride_sm
                  + offs_d[None, :] * stride_sd, mask=tile, other=0.0).to(o.dtype)
    tl.store(o_at, o * weight[:, None].to(o.dtype) + o_s * weight_s[:, None].to(o.dtype),
             mask=tile)
    tl.store(lse_at, total, mask=rows)


_merge = Launcher(_merge_partial)


def merge_(out: torch.Tensor, lse: torch.Tensor, out_s: torch.Tensor,
           lse_s: torch.Tensor) -> None:
    """Fold the partial (out_s, lse_s) into (out, lse), in place (module docstring).

    out: (B, N, H, D), lse: (B, H, N), both float32 or both float64 (views may be slices of
    larger tensors); out_s, lse_s: the same shapes, for keys disjoint from those (out, lse) has
    seen; out_s in any float dtype. One launch."""
    batch, seqlen, nheads, head_dim = out.shape
    if out.numel() == 0:
        return
    _merge[(triton.cdiv(seqlen, BLOCK_M), nheads, batch)](
        out, lse, out_s, lse_s, *out.stride(), *out_s.stride(), *lse.stride(), *lse_s.stride(),
        seqlen, HEAD_DIM=head_dim, HEAD_DIM_PAD=configs.head_dim_pad(head_dim),
        BLOCK_M=BLOCK_M)
