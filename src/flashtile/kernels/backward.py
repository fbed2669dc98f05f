"""Fused attention backward: P recomputed block by block from LSE, no N×N matrix stored.

With s the modified scores (docs/derivation.md §3–§5, §15), P = softmax(s), z the dropout keep
mask (all ones without dropout), O = (P ∘ z / (1 - dropout_p)) V:

    Delta = rowsum(dO ∘ O)                    (= rowsum(P ∘ dP))      _attn_bwd_preprocess
    p     = exp2(s - LSE · log2 e)                                     recomputed in both passes
    dV    = (p ∘ z / (1 - dropout_p))ᵀ dO
    dP    = (dO Vᵀ) ∘ z / (1 - dropout_p)
    dS    = P ∘ (dP − Delta) ∘ softcap'                               (softcap' = 1 − tanh²)
    dK    = scale · dSᵀ Q                                              _attn_bwd_dkdv
    dQ    = scale · dS K                                               _attn_bwd_dq

Two passes, each the sole writer of its output: one program per key block and key/value head
accumulates dK, dV over the query blocks that see it, for every query head of its group
(grouped-query attention sums the group's gradients in registers); one program per query block
accumulates dQ over the key blocks it sees. No atomics, so repeated runs are bitwise equal; the
price is recomputing q kᵀ and dO vᵀ once more (7 block matmuls instead of 5).

Grids: preprocess and dq (cdiv(seqlen_q, BLOCK_M), nheads, batch);
       dkdv (cdiv(seqlen_k, BLOCK_N), nheads_k, batch).
"""

import contextlib

import torch
import triton
import triton.language as tl

from flashtile.kernels import configs, hopper_backward, plans
from flashtile.kernels.common import (
    LOG2E,
    apply_mask_mod,
    block_ranges,
    block_start,
    dropout_keep,
    load_rows,
    load_tile,
    loop_range,
    query_block_start,
    row_source,
    scores_log2,
    seq_bounds,
    visible,
)
from flashtile.kernels.launch import Launcher, Replay, on_first_tensors_device
from flashtile.kernels.params import AttnOptions


@triton.jit
def _attn_bwd_preprocess(
    O, dO, Delta,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_lb, stride_lh, seqlen_q,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
):
    # With varlen every packed row is one sequence: the block's first row, times the row
    # stride, passes 2^31 in large packs, so it enters the pointers in 64 bits
    start_m = tl.program_id(0).to(tl.int64) * BLOCK_M
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_m = tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rows = seqlen_q - start_m
    o = load_tile(O + off_b * stride_ob + off_h * stride_oh + start_m * stride_om, offs_m, offs_d,
                  stride_om, stride_od, rows, HEAD_DIM, CHECK_ROWS=True,
                  CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    do = load_tile(dO + off_b * stride_dob + off_h * stride_doh + start_m * stride_dom, offs_m,
                   offs_d, stride_dom, stride_dod, rows, HEAD_DIM, CHECK_ROWS=True,
                   CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    tl.store(Delta + off_b * stride_lb + off_h * stride_lh + start_m + offs_m, delta,
             mask=offs_m < rows)


@triton.jit
def _load_lse2(LSE_block, offs_m, seqlen_q, CHECK: tl.constexpr):
    """LSE in log2 units; rows that saw nothing (LSE = -inf) and rows past the end get +inf, so
    that their recomputed p = exp2(s - inf) is exactly 0."""
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
    offs_n, offs_d, block_lo, block_hi, List, off_b, off_h, MaskData, mask_data_stride,
    seqlen_q, seqlen_k,
    diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2, slope2,
    dropout_p, dropout_scale, seed, rng_base,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_M: tl.constexpr,
    LOCAL_LEFT: tl.constexpr, LOCAL_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_MOD: tl.constexpr, MASK_DATA: tl.constexpr, MAP_BLOCK_M: tl.constexpr,
    SPARSE: tl.constexpr, STEP: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Query blocks starting at block_lo, block_lo + STEP, ... < block_hi (dense: positions,
    STEP = BLOCK_M), or with SPARSE (STEP = 1) those of a mask's block list `List`; MASKED
    applies the visibility mask (and the mask predicate)."""
    offs_m0 = tl.arange(0, BLOCK_M)
    for j in tl.range(block_lo, block_hi, STEP):
        start_m = block_start(j, List, BLOCK_M, MAP_BLOCK_M, SPARSE)
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
        # -- recompute pT = exp2(sT - lse2): (BLOCK_N, BLOCK_M) --
        qkT = tl.dot(k, qT, input_precision=DOT_PRECISION)
        sT, dscaleT = scores_log2(qkT, offs_m[None, :], offs_n[:, None], diag_offset, qk_scale,
                                  softcap_scale, softcap_log2, slope2, SOFTCAP, HAS_ALIBI)
        pT = tl.math.exp2(sT - lse2[None, :])
        if MASKED:
            keep = visible(offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, diag_offset,
                           window_left, window_right, LOCAL_LEFT, LOCAL_RIGHT)
            if MASK_MOD is not None:
                keep = apply_mask_mod(keep, off_b, off_h, offs_m[None, :], offs_n[:, None],
                                      seqlen_q, seqlen_k, MaskData, mask_data_stride, MASK_MOD,
                                      MASK_DATA)
            pT = tl.where(keep, pT, 0.0)
        # -- dpT = (dO Vᵀ)ᵀ --
        dpT = tl.dot(v, tl.trans(do), input_precision=DOT_PRECISION)
        if DROPOUT:
            zT = dropout_keep(seed, rng_base, offs_m[None, :], offs_n[:, None], seqlen_k,
                              dropout_p)
            # -- dV += (p ∘ z / (1 - dropout_p))ᵀ dO; dP = dP_drop ∘ z / (1 - dropout_p) --
            dv = tl.dot(tl.where(zT, pT * dropout_scale, 0.0).to(do.dtype), do, dv,
                        input_precision=DOT_PRECISION)
            dpT = tl.where(zT, dpT * dropout_scale, 0.0)
        else:
            # -- dV += pᵀ dO --
            dv = tl.dot(pT.to(do.dtype), do, dv, input_precision=DOT_PRECISION)
        # -- dsT = pT ∘ (dpT − Delta) ∘ softcap'; dK += dsᵀ q --
        dsT = pT * (dpT - delta[None, :])
        if SOFTCAP:
            dsT = dsT * dscaleT
        dk = tl.dot(dsT.to(q.dtype), q, dk, input_precision=DOT_PRECISION)
    return dk, dv


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, dO, LSE, Delta, dK, dV, Alibi, QLists, MaskData, CuSeqQ, CuSeqK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dkb, stride_dkn, stride_dkh, stride_dkd,
    stride_dvb, stride_dvn, stride_dvh, stride_dvd,
    stride_lb, stride_lh, stride_ab,
    stride_mapb, stride_maph, stride_mapr, stride_mapk, mask_data_stride,
    nheads, group, seqlen_q, seqlen_k,
    diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
    dropout_p, dropout_scale, seed,
    seqlen_bucket, softmax_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOCAL_LEFT: tl.constexpr, LOCAL_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_MOD: tl.constexpr, MASK_DATA: tl.constexpr,
    MAP_BLOCK_M: tl.constexpr, MAP_BLOCK_N: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    # Causal: key block 0 is seen by the most query rows, so the natural order is heaviest-first.
    SPARSE: tl.constexpr = MASK_MOD is not None  # visit a mask's block lists
    start_n = tl.program_id(0) * BLOCK_N
    off_hk = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    offs_n = start_n + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rng_seqlens = seqlen_q * seqlen_k  # dropout counters per head: over the longest lengths
    # -- packed variable-length batches: this entry's rows and lengths --
    q_start, k_start, seqlen_q, seqlen_k, diag_offset = seq_bounds(
        CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN)
    if VARLEN:
        # a program past its sequence's end owns no key: it exits at once (with no queries,
        # seqlen_q = 0, it goes on and writes its keys' zero gradients)
        if start_n >= seqlen_k:
            return

    k = load_tile(K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn, offs_n,
                  offs_d, stride_kn, stride_kd, seqlen_k, HEAD_DIM, CHECK_ROWS=True,
                  CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    v = load_tile(V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn, offs_n,
                  offs_d, stride_vn, stride_vd, seqlen_k, HEAD_DIM, CHECK_ROWS=True,
                  CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    dk = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, HEAD_DIM_PAD], dtype=tl.float32)

    # -- the query heads that share this key/value head, gradients summed --
    for off_g in range(0, group):
        off_h = off_hk * group + off_g
        Q_src = row_source(Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm,
                           seqlen_q, stride_qm, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, USE_TMA)
        dO_src = row_source(dO + off_b * stride_dob + off_h * stride_doh + q_start * stride_dom,
                            seqlen_q, stride_dom, HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, USE_TMA)
        LSE_block = LSE + off_b * stride_lb + off_h * stride_lh + q_start
        Delta_block = Delta + off_b * stride_lb + off_h * stride_lh + q_start
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Alibi + off_b * stride_ab + off_h) * LOG2E
        rng_base = (off_b * nheads + off_h) * rng_seqlens
        if MASK_MOD is not None:
            # -- a mask predicate: the query blocks its block map lists, full ones (unmasked),
            # then partial ones (masked) --
            FullList = (QLists + off_b * stride_mapb + off_h * stride_maph
                        + (start_n // MAP_BLOCK_N) * stride_mapr)
            ranges = (FullList, FullList + stride_mapk)
        else:
            # -- query blocks: masked [a, b), unmasked [b, c), masked [c, hi) --
            ranges = block_ranges(start_n, start_n + BLOCK_N - 1, seqlen_q, -diag_offset,
                                  window_right, window_left, BLOCK_M, LOCAL_RIGHT, LOCAL_LEFT)
        # -- one call site, unrolled at compile time over the ranges: the two lists, or the
        # three dense ranges (the first only with a right edge, causal's diagonal) --
        for r in tl.static_range(2 if SPARSE else 3):
            if SPARSE or r > 0 or LOCAL_RIGHT:
                # masked: a list's partial blocks, every dense range but the middle one
                List, lo, hi = loop_range(ranges, r, QLists, BLOCK_M, MAP_BLOCK_M, SPARSE)
                dk, dv = _attn_bwd_dkdv_inner(
                    dk, dv, k, v, Q_src, dO_src, LSE_block, Delta_block,
                    stride_qm, stride_qd, stride_dom, stride_dod,
                    offs_n, offs_d, lo, hi, List, off_b, off_h, MaskData, mask_data_stride,
                    seqlen_q, seqlen_k,
                    diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
                    slope2, dropout_p, dropout_scale, seed, rng_base,
                    HEAD_DIM, HEAD_DIM_PAD, BLOCK_M, LOCAL_LEFT, LOCAL_RIGHT, SOFTCAP, HAS_ALIBI,
                    DROPOUT, MASK_MOD, MASK_DATA, MAP_BLOCK_M, SPARSE,
                    1 if SPARSE else BLOCK_M, r == 1 if SPARSE else r != 1, DOT_PRECISION,
                    USE_TMA)

    dk = dk * softmax_scale
    mask = (offs_n[:, None] < seqlen_k) & (offs_d[None, :] < HEAD_DIM)
    dk_ptrs = (dK + off_b * stride_dkb + off_hk * stride_dkh + k_start * stride_dkn
               + offs_n[:, None] * stride_dkn + offs_d[None, :] * stride_dkd)
    tl.store(dk_ptrs, dk.to(dK.dtype.element_ty), mask=mask)
    dv_ptrs = (dV + off_b * stride_dvb + off_hk * stride_dvh + k_start * stride_dvn
               + offs_n[:, None] * stride_dvn + offs_d[None, :] * stride_dvd)
    tl.store(dv_ptrs, dv.to(dV.dtype.element_ty), mask=mask)


@triton.jit
def _attn_bwd_dq_inner(
    dq, q, do, lse2, delta,
    K_src, V_src, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, block_lo, block_hi, List, off_b, off_h, MaskData, mask_data_stride,
    seqlen_q, seqlen_k,
    diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2, slope2,
    dropout_p, dropout_scale, seed, rng_base,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    LOCAL_LEFT: tl.constexpr, LOCAL_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_MOD: tl.constexpr, MASK_DATA: tl.constexpr, MAP_BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr, STEP: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    """Key blocks as in the forward's loop (_attn_fwd_inner)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for j in tl.range(block_lo, block_hi, STEP):
        start_n = block_start(j, List, BLOCK_N, MAP_BLOCK_N, SPARSE)
        offs_n = start_n + offs_n0
        # k, v: (BLOCK_N, HEAD_DIM_PAD)
        k = load_rows(K_src, start_n, offs_n, offs_d, stride_kn, stride_kd, seqlen_k,
                      HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA)
        v = load_rows(V_src, start_n, offs_n, offs_d, stride_vn, stride_vd, seqlen_k,
                      HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA)
        # -- recompute p = exp2(s - lse2): (BLOCK_M, BLOCK_N) --
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, dscale = scores_log2(qk, offs_m[:, None], offs_n[None, :], diag_offset, qk_scale,
                                softcap_scale, softcap_log2, slope2, SOFTCAP, HAS_ALIBI)
        p = tl.math.exp2(s - lse2[:, None])
        if MASKED:
            keep = visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag_offset,
                           window_left, window_right, LOCAL_LEFT, LOCAL_RIGHT)
            if MASK_MOD is not None:
                keep = apply_mask_mod(keep, off_b, off_h, offs_m[:, None], offs_n[None, :],
                                      seqlen_q, seqlen_k, MaskData, mask_data_stride, MASK_MOD,
                                      MASK_DATA)
            p = tl.where(keep, p, 0.0)
        # -- dp = dO vᵀ (∘ z / (1 - dropout_p)); ds = p ∘ (dp − Delta) ∘ softcap'; dQ += ds k --
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PRECISION)
        if DROPOUT:
            z = dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], seqlen_k,
                             dropout_p)
            dp = tl.where(z, dp * dropout_scale, 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:
            ds = ds * dscale
        dq = tl.dot(ds.to(k.dtype), k, dq, input_precision=DOT_PRECISION)
    return dq


@triton.jit
def _attn_bwd_dq(
    Q, K, V, dO, LSE, Delta, dQ, Alibi, KvLists, MaskData, CuSeqQ, CuSeqK,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_dob, stride_dom, stride_doh, stride_dod,
    stride_dqb, stride_dqm, stride_dqh, stride_dqd,
    stride_lb, stride_lh, stride_ab,
    stride_mapb, stride_maph, stride_mapr, stride_mapk, mask_data_stride,
    nheads, group, seqlen_q, seqlen_k,
    diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
    dropout_p, dropout_scale, seed,
    seqlen_bucket, softmax_scale,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOCAL_LEFT: tl.constexpr, LOCAL_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_MOD: tl.constexpr, MASK_DATA: tl.constexpr,
    MAP_BLOCK_M: tl.constexpr, MAP_BLOCK_N: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
):
    SPARSE: tl.constexpr = MASK_MOD is not None  # visit a mask's block lists
    start_m = query_block_start(BLOCK_M, LOCAL_RIGHT)
    off_h = tl.program_id(1).to(tl.int64)
    off_b = tl.program_id(2).to(tl.int64)
    off_hk = off_h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    rng_base = (off_b * nheads + off_h) * seqlen_q * seqlen_k
    # -- packed variable-length batches: this entry's rows and lengths --
    q_start, k_start, seqlen_q, seqlen_k, diag_offset = seq_bounds(
        CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN)
    if VARLEN:
        # a program past its sequence's end owns no query row: it exits at once
        if start_m >= seqlen_q:
            return

    q = load_tile(Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm, offs_m, offs_d,
                  stride_qm, stride_qd, seqlen_q, HEAD_DIM, CHECK_ROWS=True,
                  CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    do = load_tile(dO + off_b * stride_dob + off_h * stride_doh + q_start * stride_dom, offs_m,
                   offs_d, stride_dom, stride_dod, seqlen_q, HEAD_DIM, CHECK_ROWS=True,
                   CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    lse2 = _load_lse2(LSE + off_b * stride_lb + off_h * stride_lh + q_start, offs_m, seqlen_q,
                      True)
    delta = tl.load(Delta + off_b * stride_lb + off_h * stride_lh + q_start + offs_m,
                    mask=offs_m < seqlen_q, other=0.0)
    dq = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + off_b * stride_ab + off_h) * LOG2E

    K_src = row_source(K + off_b * stride_kb + off_hk * stride_kh + k_start * stride_kn,
                       seqlen_k, stride_kn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, USE_TMA)
    V_src = row_source(V + off_b * stride_vb + off_hk * stride_vh + k_start * stride_vn,
                       seqlen_k, stride_vn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, USE_TMA)
    if MASK_MOD is not None:
        # -- a mask predicate: the key blocks its block map lists, full ones (unmasked), then
        # partial ones (masked) --
        FullList = (KvLists + off_b * stride_mapb + off_h * stride_maph
                    + (start_m // MAP_BLOCK_M) * stride_mapr)
        ranges = (FullList, FullList + stride_mapk)
    else:
        # -- key blocks as in the forward: masked [a, b), unmasked [b, c), masked [c, hi) --
        ranges = block_ranges(start_m, start_m + BLOCK_M - 1, seqlen_k, diag_offset,
                              window_left, window_right, BLOCK_N, LOCAL_LEFT, LOCAL_RIGHT)
    # -- one call site, unrolled at compile time over the ranges: the two lists, or the three
    # dense ranges (the first only with a window's left edge) --
    for r in tl.static_range(2 if SPARSE else 3):
        if SPARSE or r > 0 or LOCAL_LEFT:
            # masked: a list's partial blocks, every dense range but the middle one
            List, lo, hi = loop_range(ranges, r, KvLists, BLOCK_N, MAP_BLOCK_N, SPARSE)
            dq = _attn_bwd_dq_inner(
                dq, q, do, lse2, delta, K_src, V_src, stride_kn, stride_kd, stride_vn,
                stride_vd,
                offs_m, offs_d, lo, hi, List, off_b, off_h, MaskData, mask_data_stride,
                seqlen_q, seqlen_k,
                diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
                slope2, dropout_p, dropout_scale, seed, rng_base,
                HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LOCAL_LEFT, LOCAL_RIGHT, SOFTCAP, HAS_ALIBI,
                DROPOUT, MASK_MOD, MASK_DATA, MAP_BLOCK_N, SPARSE, 1 if SPARSE else BLOCK_N,
                r == 1 if SPARSE else r != 1, DOT_PRECISION, USE_TMA)

    dq = dq * softmax_scale
    dq_ptrs = (dQ + off_b * stride_dqb + off_h * stride_dqh + q_start * stride_dqm
               + offs_m[:, None] * stride_dqm + offs_d[None, :] * stride_dqd)
    tl.store(dq_ptrs, dq.to(dQ.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))


_preprocess = Launcher(_attn_bwd_preprocess)
_attn_bwd_dkdv_tunable = configs.Tunable("bwd_dkdv", _attn_bwd_dkdv)
_attn_bwd_dq_tunable = configs.Tunable("bwd_dq", _attn_bwd_dq)


class _DqStream:
    """A second stream of the current device for dQ's launches. Made, it waits for everything
    queued on the caller's stream so far; `with` it, launches go to it; on leaving, the caller's
    stream waits for them. torch.cuda.stream() and two wait_stream() calls do the same in ~90 µs
    of host time per backward on the H200's host, a fifth of a small backward's (v7.6)."""

    _streams: dict[int, torch.cuda.Stream] = {}  # one per device, made on first use

    def __init__(self, device_index: int):
        self.main = torch.cuda.current_stream(device_index)
        self.side = self._streams.get(device_index)
        if self.side is None:
            self.side = self._streams[device_index] = torch.cuda.Stream(device_index)
        self.side.wait_event(self.main.record_event())

    def __enter__(self):
        torch.cuda.set_stream(self.side)

    def __exit__(self, *exc):
        torch.cuda.set_stream(self.main)
        self.main.wait_event(self.side.record_event())


def _dq_stream(q):
    """Where dQ's launches go: a _DqStream with `overlap_dq` on a GPU (q's device is the
    current one: on_first_tensors_device), else the caller's stream."""
    if configs.features["overlap_dq"] and q.is_cuda:
        return _DqStream(q.device.index)
    return contextlib.nullcontext()


@on_first_tensors_device
def attention_backward(do, q, k, v, out, lse, opts: AttnOptions):
    """Launch the backward: Delta, then dK and dV beside dQ (on a second stream with
    `overlap_dq`). Layouts as attention_forward. On a Hopper GPU each pass of a dense call
    that `hopper_backward.preferred` accepts for it runs in the Gluon kernel of
    kernels/hopper_backward.py instead (same results, docs/performance.md v7).
    With configs.features["replay"], a call whose signature has a plan replays its launches
    (`Plan`, kernels/plans.py), and one that has none records them.

    Returns dq, dk, dv in the inputs' dtypes and memory layouts (dk, dv with k's heads).
    """
    key = (plans.signature((do, q, k, v, out, lse), opts) if configs.features["replay"]
           else None)
    if key is None:
        return _launch_backward(do, q, k, v, out, lse, opts)[0]
    return plans.replayed_or_recorded(
        _plans, key, (do, q, k, v, out, lse),
        lambda *inputs: _launch_backward(*inputs, opts), Plan, launches=3)


def _buffers(q, k, v, lse):
    """dq, dk, dv in q's, k's, v's layouts; lse and Delta (B, H, Nq) with one set of strides,
    rows at unit stride (a view of a larger lse, a slice as ring attention passes, is copied)."""
    lse = lse.contiguous()
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v), lse, torch.empty_like(lse)


def _launch_backward(do, q, k, v, out, lse, opts: AttnOptions):
    """attention_backward's launches: (dq, dk, dv), and every tensor they read or wrote, in
    the order Plan takes them."""
    _, _, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    batch, seqlen_q, seqlen_k = opts.problem(q, k)
    dq, dk, dv, lse, delta = _buffers(q, k, v, lse)
    alibi, stride_ab = opts.alibi(lse)
    cu_q, cu_k = opts.cu_seqlens(lse)
    q_lists, mask_data, *q_list_strides = opts.mask_args("q", lse)
    kv_lists, _, *kv_list_strides = opts.mask_args("kv", lse)
    common = dict(HEAD_DIM=head_dim, HEAD_DIM_PAD=configs.head_dim_pad(head_dim))
    per_kernel = dict(DOT_PRECISION=configs.dot_precision(q.dtype),
                      USE_TMA=configs.use_tma("backward", q, k, v, do), **opts.flags(),
                      **opts.mask_flags(), **common)
    scalars = (nheads, nheads // nheads_k, seqlen_q, seqlen_k, *opts.scalars(),
               configs.seqlen_bucket(seqlen_q, seqlen_k), opts.softmax_scale)
    lse_strides = (opts.strides(lse)[0], lse.stride(1))

    # Delta is per row: the tensors' own shape (with varlen, all packed rows as one sequence)
    grid = (configs.cdiv(q.shape[1], configs.PREPROCESS_BLOCK_M), nheads, q.shape[0])
    _preprocess[grid](
        out, do, delta, *out.stride(), *do.stride(), lse.stride(0), lse.stride(1),
        q.shape[1], BLOCK_M=configs.PREPROCESS_BLOCK_M, **common,
    )
    # dK/dV and dQ depend only on what came before (Delta included), not on each other: with
    # `overlap_dq` dQ runs on a second stream, so that its programs fill the SMs that dK/dV's
    # last wave leaves idle, and the caller's stream waits for both
    dq_stream = _dq_stream(q)
    gluon = configs.features["gluon_backward"]
    if gluon and hopper_backward.preferred("dkdv", q, k, v, do, (dk, dv), opts):
        hopper_backward.dkdv(q, k, v, do, lse, delta, dk, dv, opts)
    else:
        kernel, launch_kwargs = _attn_bwd_dkdv_tunable.select(common["HEAD_DIM_PAD"],
                                                         per_kernel["DOT_PRECISION"])
        kernel[lambda meta: (configs.cdiv(seqlen_k, meta["BLOCK_N"]), nheads_k, batch)](
            q, k, v, do, lse, delta, dk, dv, alibi, q_lists, mask_data, cu_q, cu_k,
            *opts.strides(q), *opts.strides(k), *opts.strides(v), *opts.strides(do),
            *opts.strides(dk), *opts.strides(dv), *lse_strides, stride_ab, *q_list_strides,
            *scalars, **per_kernel, **launch_kwargs,
        )
    with dq_stream:
        if gluon and hopper_backward.preferred("dq", q, k, v, do, (dq,), opts):
            hopper_backward.dq(q, k, v, do, lse, delta, dq, opts)
        else:
            kernel, launch_kwargs = _attn_bwd_dq_tunable.select(common["HEAD_DIM_PAD"],
                                                           per_kernel["DOT_PRECISION"])
            kernel[lambda meta: (configs.cdiv(seqlen_q, meta["BLOCK_M"]), nheads, batch)](
                q, k, v, do, lse, delta, dq, alibi, kv_lists, mask_data, cu_q, cu_k,
                *opts.strides(q), *opts.strides(k), *opts.strides(v), *opts.strides(do),
                *opts.strides(dq), *lse_strides, stride_ab, *kv_list_strides, *scalars,
                **per_kernel, **launch_kwargs,
            )
    return (dq, dk, dv), (do, q, k, v, out, lse, delta, dq, dk, dv)


# -- Plans (kernels/plans.py): a backward's launches made again for the next call of its
# signature, skipping the decisions and bindings above

_plans = plans.cache()


class Plan:
    """The three launches of one backward (preprocess, dK/dV, dQ), as `_launch_backward` made
    them, for calls of the same signature: new outputs, the same kernels and arguments, the
    call's tensors in their places, dQ on the second stream as `overlap_dq` puts it.
    `tensors`: `_launch_backward`'s second result."""

    def __init__(self, launches, tensors: tuple):
        self.preprocess, self.dkdv, self.dq = (Replay(r, tensors) for r in launches)

    def __call__(self, do, q, k, v, out, lse):
        dq, dk, dv, lse, delta = _buffers(q, k, v, lse)
        tensors = (do, q, k, v, out, lse, delta, dq, dk, dv)
        if q.is_cuda:
            triton.set_allocator(configs._tma_allocator)  # the Gluon kernels' scratch
        self.preprocess.replay(tensors)
        dq_stream = _dq_stream(q)
        self.dkdv.replay(tensors)
        with dq_stream:
            self.dq.replay(tensors)
        return dq, dk, dv
