"""The attention probabilities the forward used, written out: for return_attn_probs=True.

P[b, h, i, j] = exp(s_ij - LSE_i) with the forward's own scores, masks and dropout numbers
(kernels/common.py), dropped entries 0 and kept ones scaled by 1 / (1 - dropout_p), so that
out = P @ v. It stores a (batch, nheads, seqlen_q, seqlen_k) matrix: meant for tests and
visualization at small sizes, never on the training path.

Grid: (cdiv(seqlen_q, BLOCK_M), nheads, batch); each program walks every key block of its rows.
"""

import torch
import triton
import triton.language as tl

from flashtile.kernels import configs
from flashtile.kernels.common import (
    LOG2E,
    apply_mask_mod,
    dropout_keep,
    load_tile,
    scores_log2,
    seq_bounds,
    visible,
)
from flashtile.kernels.launch import on_first_tensors_device
from flashtile.kernels.params import AttnOptions


@triton.jit
def _attn_probs(
    Q, K, LSE, P, Alibi, MaskData, CuSeqQ, CuSeqK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_lb, stride_lh, stride_pb, stride_ph, stride_pm, stride_ab, mask_data_stride,
    nheads, group, seqlen_q, seqlen_k,
    diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
    dropout_p, dropout_scale, seed,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOCAL_LEFT: tl.constexpr, LOCAL_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_MOD: tl.constexpr, MASK_DATA: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = off_h // group
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rng_base = (off_b * nheads + off_h) * seqlen_q * seqlen_k
    q_start, k_start, seqlen_q, seqlen_k, diag_offset = seq_bounds(
        CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN)
    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm, offs_m,
                  offs_d, stride_qm, stride_qd, seqlen_q, HEAD_DIM, CHECK_ROWS=True,
                  CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    lse = tl.load(LSE + off_b * stride_lb + off_h * stride_lh + q_start + offs_m,
                  mask=offs_m < seqlen_q, other=float("inf"))
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + off_b * stride_ab + off_h) * LOG2E
    P_block = P + off_b * stride_pb + off_h * stride_ph
    for start_n in range(0, seqlen_k, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = load_tile(K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn, offs_n,
                      offs_d, stride_kn, stride_kd, seqlen_k, HEAD_DIM, CHECK_ROWS=True,
                      CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _ = scores_log2(qk, offs_m[:, None], offs_n[None, :], diag_offset, qk_scale,
                           softcap_scale, softcap_log2, slope2, SOFTCAP, HAS_ALIBI)
        keep = visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag_offset,
                       window_left, window_right, LOCAL_LEFT, LOCAL_RIGHT)
        if MASK_MOD is not None:
            keep = apply_mask_mod(keep, off_b, off_h, offs_m[:, None], offs_n[None, :],
                                  seqlen_q, seqlen_k, MaskData, mask_data_stride, MASK_MOD,
                                  MASK_DATA)
        p = tl.where(keep, tl.math.exp2(s - lse2[:, None]), 0.0)
        if DROPOUT:
            z = dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], seqlen_k,
                             dropout_p)
            p = tl.where(z, p * dropout_scale, 0.0)
        tl.store(P_block + offs_m[:, None] * stride_pm + offs_n[None, :], p,
                 mask=(offs_m[:, None] < seqlen_q) & (offs_n[None, :] < seqlen_k))


@on_first_tensors_device
def attention_probs(q, k, lse, opts: AttnOptions) -> torch.Tensor:
    """(batch, nheads, seqlen_q, seqlen_k) float32 probabilities of the forward with `lse`;
    with varlen (batch, nheads, max_seqlen_q, max_seqlen_k), zero beyond each sequence."""
    _, _, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    batch, seqlen_q, seqlen_k = opts.problem(q, k)
    alloc = torch.zeros if opts.varlen is not None else torch.empty
    probs = alloc(batch, nheads, seqlen_q, seqlen_k, device=q.device, dtype=torch.float32)
    alibi, stride_ab = opts.alibi(lse)
    cu_q, cu_k = opts.cu_seqlens(lse)
    _, mask_data, *_, mask_data_stride = opts.mask_args("kv", lse)
    mask_flags = opts.mask_flags()
    head_dim_pad = configs.head_dim_pad(head_dim)
    if configs.interpreting():
        block_m, block_n = 32, 16
    else:  # a plain loop, no tuning: tiles that fit shared memory at every head dim
        block_m, block_n = {16: (64, 64), 32: (64, 64), 64: (64, 64), 128: (64, 64),
                            256: (64, 32)}.get(head_dim_pad, (32, 16))
    grid = (configs.cdiv(seqlen_q, block_m), nheads, batch)
    _attn_probs[grid](
        q, k, lse, probs, alibi, mask_data, cu_q, cu_k, *opts.strides(q), *opts.strides(k),
        opts.strides(lse)[0], lse.stride(1), *probs.stride()[:3], stride_ab, mask_data_stride,
        nheads, nheads // nheads_k, seqlen_q, seqlen_k, *opts.scalars(),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=head_dim_pad, BLOCK_M=block_m, BLOCK_N=block_n,
        DOT_PRECISION=configs.dot_precision(q.dtype), **opts.flags(),
        MASK_MOD=mask_flags["MASK_MOD"], MASK_DATA=mask_flags["MASK_DATA"],
    )
    return probs
