"""Fused attention forward: online softmax over key blocks, only LSE saved for the backward.

For one query block q (BLOCK_M rows) and key/value blocks k, v (BLOCK_N rows), in base 2 with
qk_scale = softmax_scale * log2(e) (docs/derivation.md §6):

    qk    = (q kᵀ) * qk_scale                      masked entries -> -inf
    m_ij  = max(m_i, rowmax(qk))
    p     = exp2(qk - m_ij)
    alpha = exp2(m_i - m_ij)
    l_i   = l_i * alpha + rowsum(p)
    acc   = acc * alpha + p v
    ...
    O     = acc / l_i,     LSE = (m_i + log2 l_i) * ln 2     (natural log at the boundary)

Key blocks split into three ranges: [0, n_full_end) needs no mask; [n_full_end, hi) holds the
causal diagonal and the ragged end of the keys and is masked; [hi, seqlen_k) is skipped because
no row of the block sees it. Tensors are (batch, seqlen, heads, headdim) through strides, so the
SDPA layout (batch, heads, seqlen, headdim) runs without copies.

Grid: (cdiv(seqlen_q, BLOCK_M), batch * nheads).
"""

import torch
import triton
import triton.language as tl

from flashtile.kernels import configs
from flashtile.kernels.common import (
    key_ranges,
    load_rows,
    load_tile,
    query_block_start,
    row_source,
    visible,
)


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, start_n_lo, start_n_hi, seqlen_q, seqlen_k, diag_offset, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    offs_n0 = tl.arange(0, BLOCK_N)
    for start_n in tl.range(start_n_lo, start_n_hi, BLOCK_N):
        offs_n = start_n + offs_n0
        # k, v: (BLOCK_N, HEAD_DIM_PAD)
        k = load_rows(K_src, start_n, offs_n, offs_d, stride_kn, stride_kd, seqlen_k,
                      HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA)
        v = load_rows(V_src, start_n, offs_n, offs_d, stride_vn, stride_vd, seqlen_k,
                      HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA)
        # -- compute qk, in log2 units --
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        if MASKED:
            keep = visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag_offset,
                           IS_CAUSAL)
            qk = tl.where(keep, qk, float("-inf"))
        # -- update m_i; a row that has seen nothing keeps m = -inf, subtract 0 there --
        m_ij = tl.maximum(m_i, tl.max(qk, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(qk - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        # -- update l_i and acc --
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh,
    nheads, seqlen_q, seqlen_k, diag_offset, qk_scale,
    seqlen_bucket,  # autotuning key only (configs.seqlen_bucket)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    start_m = query_block_start(BLOCK_M, IS_CAUSAL)
    off_bh = tl.program_id(1)
    off_b = (off_bh // nheads).to(tl.int64)
    off_h = (off_bh % nheads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    Q_block = Q + off_b * stride_qb + off_h * stride_qh
    K_src = row_source(K + off_b * stride_kb + off_h * stride_kh, seqlen_k, stride_kn,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, USE_TMA)
    V_src = row_source(V + off_b * stride_vb + off_h * stride_vh, seqlen_k, stride_vn,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, USE_TMA)
    q = load_tile(Q_block, offs_m, offs_d, stride_qm, stride_qd, seqlen_q, HEAD_DIM,
                  CHECK_ROWS=True, CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    # -- the three key ranges: unmasked, masked (diagonal and ragged end), skipped --
    n_full_end, hi = key_ranges(start_m, seqlen_k, diag_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, n_full_end, seqlen_q, seqlen_k, diag_offset, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, IS_CAUSAL, False, DOT_PRECISION, USE_TMA)
    acc, l_i, m_i = _attn_fwd_inner(
        acc, l_i, m_i, q, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, n_full_end, hi, seqlen_q, seqlen_k, diag_offset, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, IS_CAUSAL, True, DOT_PRECISION, USE_TMA)

    # -- epilogue: normalize; a row that saw nothing gives O = 0, LSE = -inf --
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + offs_m, lse, mask=offs_m < seqlen_q)
    O_block = O + off_b * stride_ob + off_h * stride_oh
    o_ptrs = O_block + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))



_attn_fwd_tunable = configs.Tunable("fwd", _attn_fwd)


def attention_forward(q, k, v, softmax_scale: float, causal: bool, diag_offset: int):
    """Launch the forward. q: (B, Nq, H, D), k, v: (B, Nk, H, D), any strides.

    Returns out (B, Nq, H, D) in q's dtype, with q's memory layout, and lse (B, H, Nq) float32,
    natural log. Inputs are assumed validated (interface.py).
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    out = torch.empty_like(q)
    lse = torch.empty(batch, nheads, seqlen_q, device=q.device, dtype=torch.float32)
    kernel, launch = _attn_fwd_tunable.select()

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * nheads)

    kernel[grid](
        q, k, v, out, lse,
        *q.stride(), *k.stride(), *v.stride(), *out.stride(),
        lse.stride(0), lse.stride(1),
        nheads, seqlen_q, seqlen_k, diag_offset, softmax_scale * 1.4426950408889634,
        configs.seqlen_bucket(seqlen_q, seqlen_k),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=configs.head_dim_pad(head_dim),
        IS_CAUSAL=causal, DOT_PRECISION=configs.dot_precision(q.dtype),
        USE_TMA=configs.use_tma("forward", k, v),
        **launch,
    )
    return out, lse
