"""Fused attention backward: P recomputed block by block from LSE, no N×N matrix stored.

With S = softmax_scale · Q Kᵀ, P = softmax(S), O = P V (docs/derivation.md §3–§5):

    Delta = rowsum(dO ∘ O)                    (= rowsum(P ∘ dP))      _attn_bwd_preprocess
    p     = exp2(qk · qk_scale − LSE · log2 e)                         recomputed in both passes
    dV    = Pᵀ dO
    dP    = dO Vᵀ
    dS    = P ∘ (dP − Delta)
    dK    = scale · dSᵀ Q                                              _attn_bwd_dkdv
    dQ    = scale · dS K                                               _attn_bwd_dq

Two passes, each the sole writer of its output: one program per key block accumulates dK, dV
over the query blocks that see it; one program per query block accumulates dQ over the key
blocks it sees. No atomics, so repeated runs are bitwise equal; the price is recomputing
q kᵀ and dO vᵀ once more (7 block matmuls instead of 5).

Grids: preprocess and dq (cdiv(seqlen_q, BLOCK_M), batch * nheads);
       dkdv (cdiv(seqlen_k, BLOCK_N), batch * nheads).
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
    query_ranges,
    row_source,
    visible,
)

LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def _attn_bwd_preprocess(
    O, dO, Delta,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lh,
    nheads, seqlen_q,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    off_b = (tl.program_id(1) // nheads).to(tl.int64)
    off_h = (tl.program_id(1) % nheads).to(tl.int64)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    o = load_tile(O + off_b * stride_ob + off_h * stride_oh, offs_m, offs_d, stride_om, stride_od,
                  seqlen_q, HEAD_DIM, CHECK_ROWS=True, CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    do = load_tile(dO + off_b * stride_dob + off_h * stride_doh, offs_m, offs_d, stride_dom,
                   stride_dod, seqlen_q, HEAD_DIM, CHECK_ROWS=True,
                   CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_b * stride_lb + off_h * stride_lh + offs_m, delta, mask=offs_m < seqlen_q)


@triton.jit
def _load_lse2(LSE_block, offs_m, seqlen_q, CHECK: tl.constexpr):
    """LSE in log2 units; rows that saw nothing (LSE = -inf) and rows past the end get +inf, so
    that their recomputed p = exp2(qk - inf) is exactly 0."""
    if CHECK:
        lse = tl.load(LSE_block + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
    else:
        lse = tl.load(LSE_block + offs_m)
    return tl.where(lse == float("-inf"), float("inf"), lse * LOG2E)


@triton.jit
def _attn_bwd_dkdv_inner(
    dk, dv, k, v,
    Q_src, dO_src, LSE_block, Delta_block,
    stride_qm, stride_qd, stride_dom, stride_dod,
    offs_n, offs_d, start_m_lo, start_m_hi, seqlen_q, seqlen_k, diag_offset, qk_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    IS_CAUSAL: tl.constexpr, MASKED: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    offs_m0 = tl.arange(0, BLOCK_M)
    for start_m in tl.range(start_m_lo, start_m_hi, BLOCK_M):
        offs_m = start_m + offs_m0
        # q, do: (BLOCK_M, HEAD_DIM_PAD)
        q = load_rows(Q_src, start_m, offs_m, offs_d, stride_qm, stride_qd, seqlen_q,
                      HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA)
        qT = tl.trans(q)
        do = load_rows(dO_src, start_m, offs_m, offs_d, stride_dom, stride_dod, seqlen_q,
                       HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA)
        lse2 = _load_lse2(LSE_block, offs_m, seqlen_q, MASKED)
        if MASKED:
            delta = tl.load(Delta_block + offs_m, mask=offs_m < seqlen_q, other=0.0)
        else:
            delta = tl.load(Delta_block + offs_m)
        # -- recompute pT = exp2(qkT - lse2): (BLOCK_N, BLOCK_M) --
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION) * qk_scale
        pT = tl.math.exp2(qkT - lse2[None, :])
        if MASKED:
            keep = visible(offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, diag_offset,
                           IS_CAUSAL)
            pT = tl.where(keep, pT, 0.0)
        # -- dV += pᵀ dO --
        dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # -- dpT = (dO Vᵀ)ᵀ; dsT = pT ∘ (dpT − Delta); dK += dsᵀ q --
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        dsT = pT * (dpT - delta[None, :])
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, dO, LSE, Delta, dK, dV,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_lb, stride_lh,
    nheads, seqlen_q, seqlen_k, diag_offset, qk_scale, softmax_scale,
    seqlen_bucket,  # autotuning key only (configs.seqlen_bucket)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    # Causal: key block 0 is seen by the most query rows, so the natural order is heaviest-first.
    start_n = tl.program_id(0) * BLOCK_N
    off_b = (tl.program_id(1) // nheads).to(tl.int64)
    off_h = (tl.program_id(1) % nheads).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    k = load_tile(K + off_b * stride_kb + off_h * stride_kh, offs_n, offs_d, stride_kn, stride_kd,
                  seqlen_k, HEAD_DIM, CHECK_ROWS=True, CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    v = load_tile(V + off_b * stride_vb + off_h * stride_vh, offs_n, offs_d, stride_vn, stride_vd,
                  seqlen_k, HEAD_DIM, CHECK_ROWS=True, CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)

    Q_src = row_source(Q + off_b * stride_qb + off_h * stride_qh, seqlen_q, stride_qm,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, USE_TMA)
    dO_src = row_source(dO + off_b * stride_dob + off_h * stride_doh, seqlen_q, stride_dom,
                        HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, USE_TMA)
    LSE_block = LSE + off_b * stride_lb + off_h * stride_lh
    Delta_block = Delta + off_b * stride_lb + off_h * stride_lh

    # -- query ranges: masked diagonal [lo, m_mid), unmasked [m_mid, m_even_end), ragged end --
    lo, m_mid, m_even_end = query_ranges(start_n, seqlen_q, diag_offset, BLOCK_M, BLOCK_N,
                                         IS_CAUSAL)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q_src, dO_src, LSE_block, Delta_block,
        stride_qm, stride_qd, stride_dom, stride_dod,
        offs_n, offs_d, lo, m_mid, seqlen_q, seqlen_k, diag_offset, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, IS_CAUSAL, True, DOT_PRECISION, USE_TMA)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q_src, dO_src, LSE_block, Delta_block,
        stride_qm, stride_qd, stride_dom, stride_dod,
        offs_n, offs_d, tl.maximum(m_mid, lo), m_even_end, seqlen_q, seqlen_k, diag_offset,
        qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, IS_CAUSAL, False, DOT_PRECISION, USE_TMA)
    dk, dv = _attn_bwd_dkdv_inner(
        dk, dv, k, v, Q_src, dO_src, LSE_block, Delta_block,
        stride_qm, stride_qd, stride_dom, stride_dod,
        offs_n, offs_d, tl.maximum(m_even_end, lo), seqlen_q, seqlen_q, seqlen_k, diag_offset,
        qk_scale, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, IS_CAUSAL, True, DOT_PRECISION, USE_TMA)

    dk = dk * softmax_scale
    mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = (dK + off_b * stride_dkb + off_h * stride_dkh
               + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
    tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=mask)
    dv_ptrs = (dV + off_b * stride_dvb + off_h * stride_dvh
               + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd)
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
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
        # -- recompute p = exp2(qk - lse2): (BLOCK_M, BLOCK_N) --
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION) * qk_scale
        p = tl.math.exp2(qk - lse2[:, None])
        if MASKED:
            keep = visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag_offset,
                           IS_CAUSAL)
            p = tl.where(keep, p, 0.0)
        # -- dp = dO vᵀ; ds = p ∘ (dp − Delta); dQ += ds k --
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        ds = p * (dp - delta[:, None])
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, dO, LSE, Delta, dQ,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_lb, stride_lh,
    nheads, seqlen_q, seqlen_k, diag_offset, qk_scale, softmax_scale,
    seqlen_bucket,  # autotuning key only (configs.seqlen_bucket)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_CAUSAL: tl.constexpr, DOT_PRECISION: tl.constexpr,
    USE_TMA: tl.constexpr,
):
    start_m = query_block_start(BLOCK_M, IS_CAUSAL)
    off_b = (tl.program_id(1) // nheads).to(tl.int64)
    off_h = (tl.program_id(1) % nheads).to(tl.int64)
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)

    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh, offs_m, offs_d, stride_qm, stride_qd,
                  seqlen_q, HEAD_DIM, CHECK_ROWS=True, CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    do = load_tile(dO + off_b * stride_dob + off_h * stride_doh, offs_m, offs_d, stride_dom,
                   stride_dod, seqlen_q, HEAD_DIM, CHECK_ROWS=True,
                   CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    lse2 = _load_lse2(LSE + off_b * stride_lb + off_h * stride_lh, offs_m, seqlen_q, True)
    delta = tl.load(Delta + off_b * stride_lb + off_h * stride_lh + offs_m,
                    mask=offs_m < seqlen_q, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    K_src = row_source(K + off_b * stride_kb + off_h * stride_kh, seqlen_k, stride_kn,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, USE_TMA)
    V_src = row_source(V + off_b * stride_vb + off_h * stride_vh, seqlen_k, stride_vn,
                       HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, USE_TMA)
    # -- key ranges as in the forward: unmasked, masked (diagonal and ragged end), skipped --
    n_full_end, hi = key_ranges(start_m, seqlen_k, diag_offset, BLOCK_M, BLOCK_N, IS_CAUSAL)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, 0, n_full_end, seqlen_q, seqlen_k, diag_offset, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, IS_CAUSAL, False, DOT_PRECISION, USE_TMA)
    dq = _attn_bwd_dq_inner(
        dq, q, do, lse2, delta, K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
        offs_m, offs_d, n_full_end, hi, seqlen_q, seqlen_k, diag_offset, qk_scale,
        HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, IS_CAUSAL, True, DOT_PRECISION, USE_TMA)

    dq = dq * softmax_scale
    dq_ptrs = (dQ + off_b * stride_dqb + off_h * stride_dqh
               + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
    tl.store(dq_ptrs, dq.to(dQ.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))



_attn_bwd_dkdv_tunable = configs.Tunable("bwd_dkdv", _attn_bwd_dkdv)
_attn_bwd_dq_tunable = configs.Tunable("bwd_dq", _attn_bwd_dq)


def attention_backward(do, q, k, v, out, lse, softmax_scale: float, causal: bool,
                       diag_offset: int):
    """Launch the backward: Delta, then dK and dV, then dQ. Layouts as attention_forward.

    Returns dq, dk, dv in the inputs' dtypes and memory layouts.
    """
    batch, seqlen_q, nheads, head_dim = q.shape
    seqlen_k = k.shape[1]
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    delta = torch.empty_like(lse)
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=configs.head_dim_pad(head_dim))
    per_kernel = dict(IS_CAUSAL=causal, DOT_PRECISION=configs.dot_precision(q.dtype),
                      USE_TMA=configs.use_tma("backward", q, k, v, do), **common)
    scalars = (nheads, seqlen_q, seqlen_k, diag_offset, softmax_scale * 1.4426950408889634,
               softmax_scale, configs.seqlen_bucket(seqlen_q, seqlen_k))

    grid = (triton.cdiv(seqlen_q, configs.PREPROCESS_BLOCK_M), batch * nheads)
    _attn_bwd_preprocess[grid](
        out, do, delta, *out.stride(), *do.stride(), lse.stride(0), lse.stride(1),
        nheads, seqlen_q, BLOCK_M=configs.PREPROCESS_BLOCK_M, **common,
    )
    kernel, launch = _attn_bwd_dkdv_tunable.select()
    kernel[lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), batch * nheads)](
        q, k, v, do, lse, delta, dk, dv,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dk.stride(), *dv.stride(),
        lse.stride(0), lse.stride(1), *scalars, **per_kernel, **launch,
    )
    kernel, launch = _attn_bwd_dq_tunable.select()
    kernel[lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * nheads)](
        q, k, v, do, lse, delta, dq,
        *q.stride(), *k.stride(), *v.stride(), *do.stride(), *dq.stride(),
        lse.stride(0), lse.stride(1), *scalars, **per_kernel, **launch,
    )
    return dq, dk, dv
