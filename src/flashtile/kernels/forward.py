"""Fused attention forward: online softmax over key blocks, only LSE saved for the backward.

For one query block q (BLOCK_M rows) and key/value blocks k, v (BLOCK_N rows), in base 2
(docs/derivation.md §6, §15):

    s     = scores_log2(q kᵀ)                   log2(e) · (softcap(scale · q kᵀ) + ALiBi bias)
                                                masked entries -> -inf
    m_ij  = max(m_i, rowmax(s))
    p     = exp2(s - m_ij)
    alpha = exp2(m_i - m_ij)
    l_i   = l_i * alpha + rowsum(p)
    acc   = acc * alpha + (p ∘ z / (1 - dropout_p)) v        z = dropout keep mask, if DROPOUT
    ...
    O     = acc / l_i,     LSE = (m_i + log2 l_i) * ln 2     (natural log at the boundary)

Key blocks fall into `block_ranges`: masked near the window's left edge, unmasked in the middle,
masked on the causal diagonal / right edge and the ragged end; blocks nobody sees are skipped.
Tensors are (batch, seqlen, heads, headdim) through strides, so the SDPA layout
(batch, heads, seqlen, headdim) runs without copies. Query head h reads key/value head
h // group (grouped-query attention; group = 1 is multi-head).

Grid: (cdiv(seqlen_q, BLOCK_M), batch * nheads).
"""

import torch
import triton
import triton.language as tl

from flashtile.kernels import configs
from flashtile.kernels.common import (
    LOG2E,
    apply_mask_mod,
    block_ranges,
    block_start,
    dropout_keep,
    list_length,
    load_kv,
    load_tile,
    query_block_start,
    row_source,
    scores_log2,
    seq_bounds,
    visible,
)
from flashtile.kernels.params import AttnOptions


@triton.jit
def _attn_fwd_inner(
    acc, l_i, m_i, q,
    K_src, V_src, BlockTable, stride_kn, stride_kd, stride_vn, stride_vd,
    offs_m, offs_d, block_lo, block_hi, List, off_b, off_h, MaskData, mask_data_stride,
    seqlen_q, seqlen_k,
    diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2, slope2,
    dropout_p, dropout_scale, seed, rng_base,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, BLOCK_N: tl.constexpr,
    LOCAL_LEFT: tl.constexpr, LOCAL_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_MOD: tl.constexpr, MASK_DATA: tl.constexpr, MAP_BLOCK_N: tl.constexpr,
    SPARSE: tl.constexpr, STEP: tl.constexpr, MASKED: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr,
):
    """Key blocks starting at block_lo, block_lo + STEP, ... < block_hi (dense: positions,
    STEP = BLOCK_N), or with SPARSE (STEP = 1) the blocks of a mask's block list `List`;
    MASKED applies the visibility mask (and the mask predicate)."""
    offs_n0 = tl.arange(0, BLOCK_N)
    for j in tl.range(block_lo, block_hi, STEP):
        start_n = block_start(j, List, BLOCK_N, MAP_BLOCK_N, SPARSE)
        offs_n = start_n + offs_n0
        # k, v: (BLOCK_N, HEAD_DIM_PAD)
        k = load_kv(K_src, BlockTable, start_n, offs_n, offs_d, stride_kn, stride_kd, seqlen_k,
                    HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA, PAGED, PAGE)
        v = load_kv(V_src, BlockTable, start_n, offs_n, offs_d, stride_vn, stride_vd, seqlen_k,
                    HEAD_DIM, HEAD_DIM_PAD, MASKED, USE_TMA, PAGED, PAGE)
        # -- scores, in log2 units --
        qk = tl.dot(q, tl.trans(k), input_precision=DOT_PRECISION)
        s, _ = scores_log2(qk, offs_m[:, None], offs_n[None, :], diag_offset, qk_scale,
                           softcap_scale, softcap_log2, slope2, SOFTCAP, HAS_ALIBI)
        if MASKED:
            keep = visible(offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag_offset,
                           window_left, window_right, LOCAL_LEFT, LOCAL_RIGHT)
            if MASK_MOD is not None:
                keep = apply_mask_mod(keep, off_b, off_h, offs_m[:, None], offs_n[None, :],
                                      seqlen_q, seqlen_k, MaskData, mask_data_stride, MASK_MOD,
                                      MASK_DATA)
            s = tl.where(keep, s, float("-inf"))
        # -- update m_i; a row that has seen nothing keeps m = -inf, subtract 0 there --
        m_ij = tl.maximum(m_i, tl.max(s, 1))
        m_safe = tl.where(m_ij == float("-inf"), 0.0, m_ij)
        p = tl.math.exp2(s - m_safe[:, None])
        alpha = tl.math.exp2(m_i - m_safe)
        # -- update l_i (every p) and acc (the p that survive dropout) --
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        if DROPOUT:
            z = dropout_keep(seed, rng_base, offs_m[:, None], offs_n[None, :], seqlen_k,
                             dropout_p)
            p = tl.where(z, p * dropout_scale, 0.0)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=DOT_PRECISION)
        m_i = m_ij
    return acc, l_i, m_i


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, Alibi, KvLists, MaskData, CuSeqQ, CuSeqK, SeqlensK, BatchIdx, BlockTable,
    stride_qb, stride_qm, stride_qh, stride_qd,
    stride_kb, stride_kn, stride_kh, stride_kd,
    stride_vb, stride_vn, stride_vh, stride_vd,
    stride_ob, stride_om, stride_oh, stride_od,
    stride_lb, stride_lh, stride_ab,
    stride_mapb, stride_maph, stride_mapr, stride_mapk, mask_data_stride, stride_btb,
    stride_os, stride_ls, num_splits,
    nheads, group, seqlen_q, seqlen_k,
    diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
    dropout_p, dropout_scale, seed,
    seqlen_bucket,  # autotuning key only (configs.seqlen_bucket)
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    LOCAL_LEFT: tl.constexpr, LOCAL_RIGHT: tl.constexpr, SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, DROPOUT: tl.constexpr,
    MASK_MOD: tl.constexpr, MASK_DATA: tl.constexpr,
    MAP_BLOCK_M: tl.constexpr, MAP_BLOCK_N: tl.constexpr, VARLEN: tl.constexpr,
    DOT_PRECISION: tl.constexpr, USE_TMA: tl.constexpr,
    KV_CACHE: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr, SPLIT_KV: tl.constexpr,
):
    start_m = query_block_start(BLOCK_M, LOCAL_RIGHT)
    off_bh = tl.program_id(1)
    off_b = (off_bh // nheads).to(tl.int64)
    off_h = (off_bh % nheads).to(tl.int64)
    off_hk = off_h // group
    offs_m = start_m + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    # dropout's counters: per (batch, head), over the (longest) seqlen_q × seqlen_k
    rng_base = off_bh.to(tl.int64) * seqlen_q * seqlen_k
    # -- packed variable-length batches: this entry's rows and lengths --
    q_start, k_start, seqlen_q, seqlen_k, diag_offset = seq_bounds(
        CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN)
    # -- a KV cache: this entry's valid length, its cache row, its page table --
    kv_b = off_b
    if KV_CACHE:
        seqlen_k = tl.load(SeqlensK + off_b)
        diag_offset = seqlen_k - seqlen_q
        kv_b = tl.load(BatchIdx + off_b).to(tl.int64)
    BlockTable_b = BlockTable + off_b * stride_btb
    # a program past its sequence's end visits no key (seqlen_k of 0 for the block ranges)
    keys_visited = seqlen_k
    if VARLEN:
        keys_visited = tl.where(start_m < seqlen_q, seqlen_k, 0)

    Q_block = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm
    K_src = row_source(K + kv_b * stride_kb + off_hk * stride_kh + k_start * stride_kn,
                       seqlen_k, stride_kn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, USE_TMA)
    V_src = row_source(V + kv_b * stride_vb + off_hk * stride_vh + k_start * stride_vn,
                       seqlen_k, stride_vn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, USE_TMA)
    q = load_tile(Q_block, offs_m, offs_d, stride_qm, stride_qd, seqlen_q, HEAD_DIM,
                  CHECK_ROWS=True, CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + off_b * stride_ab + off_h) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    if MASK_MOD is not None:
        # -- a mask predicate: the key blocks its block map lists, full ones then partial --
        FullList = (KvLists + off_b * stride_mapb + off_h * stride_maph
                    + (start_m // MAP_BLOCK_M) * stride_mapr)
        PartList = FullList + stride_mapk
        n_full = list_length(FullList, BLOCK_N, MAP_BLOCK_N)
        n_part = list_length(PartList, BLOCK_N, MAP_BLOCK_N)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_src, V_src, BlockTable_b, stride_kn, stride_kd, stride_vn,
                stride_vd,
            offs_m, offs_d, 0, n_full, FullList, off_b, off_h, MaskData, mask_data_stride,
            seqlen_q, seqlen_k,
            diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
            slope2, dropout_p, dropout_scale, seed, rng_base,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LOCAL_LEFT, LOCAL_RIGHT, SOFTCAP, HAS_ALIBI,
            DROPOUT, MASK_MOD, MASK_DATA, MAP_BLOCK_N, True, 1, False, DOT_PRECISION,
            USE_TMA, PAGED, PAGE)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_src, V_src, BlockTable_b, stride_kn, stride_kd, stride_vn,
                stride_vd,
            offs_m, offs_d, 0, n_part, PartList, off_b, off_h, MaskData, mask_data_stride,
            seqlen_q, seqlen_k,
            diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
            slope2, dropout_p, dropout_scale, seed, rng_base,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LOCAL_LEFT, LOCAL_RIGHT, SOFTCAP, HAS_ALIBI,
            DROPOUT, MASK_MOD, MASK_DATA, MAP_BLOCK_N, True, 1, True, DOT_PRECISION,
            USE_TMA, PAGED, PAGE)
    else:
        # -- key blocks: masked [a, b), unmasked [b, c), masked [c, hi); the rest skipped --
        a, b, c, hi = block_ranges(start_m, keys_visited, diag_offset, window_left,
                                   window_right, BLOCK_M, BLOCK_N, LOCAL_LEFT, LOCAL_RIGHT)
        if SPLIT_KV:
            # -- split-KV: this program's share of the keys, whole blocks; each range is cut
            # to it (clamping keeps a <= b <= c <= hi, so masked stays masked) --
            chunk = tl.cdiv(tl.cdiv(seqlen_k, num_splits), BLOCK_N) * BLOCK_N
            split_lo = tl.program_id(2) * chunk
            split_hi = split_lo + chunk
            a = tl.minimum(tl.maximum(a, split_lo), split_hi)
            b = tl.minimum(tl.maximum(b, split_lo), split_hi)
            c = tl.minimum(tl.maximum(c, split_lo), split_hi)
            hi = tl.minimum(tl.maximum(hi, split_lo), split_hi)
        if LOCAL_LEFT:  # the window's left edge: no such range without one
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, K_src, V_src, BlockTable_b, stride_kn, stride_kd, stride_vn,
                stride_vd,
                offs_m, offs_d, a, b, KvLists, off_b, off_h, MaskData, mask_data_stride,
                seqlen_q, seqlen_k,
                diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
                slope2, dropout_p, dropout_scale, seed, rng_base,
                HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LOCAL_LEFT, LOCAL_RIGHT, SOFTCAP, HAS_ALIBI,
                DROPOUT, MASK_MOD, MASK_DATA, MAP_BLOCK_N, False, BLOCK_N, True, DOT_PRECISION,
                USE_TMA, PAGED, PAGE)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_src, V_src, BlockTable_b, stride_kn, stride_kd, stride_vn,
                stride_vd,
            offs_m, offs_d, b, c, KvLists, off_b, off_h, MaskData, mask_data_stride,
            seqlen_q, seqlen_k,
            diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
            slope2, dropout_p, dropout_scale, seed, rng_base,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LOCAL_LEFT, LOCAL_RIGHT, SOFTCAP, HAS_ALIBI,
            DROPOUT, MASK_MOD, MASK_DATA, MAP_BLOCK_N, False, BLOCK_N, False, DOT_PRECISION,
            USE_TMA, PAGED, PAGE)
        acc, l_i, m_i = _attn_fwd_inner(
            acc, l_i, m_i, q, K_src, V_src, BlockTable_b, stride_kn, stride_kd, stride_vn,
                stride_vd,
            offs_m, offs_d, c, hi, KvLists, off_b, off_h, MaskData, mask_data_stride,
            seqlen_q, seqlen_k,
            diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
            slope2, dropout_p, dropout_scale, seed, rng_base,
            HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LOCAL_LEFT, LOCAL_RIGHT, SOFTCAP, HAS_ALIBI,
            DROPOUT, MASK_MOD, MASK_DATA, MAP_BLOCK_N, False, BLOCK_N, True, DOT_PRECISION,
            USE_TMA, PAGED, PAGE)

    # -- epilogue: normalize; a row that saw nothing gives O = 0, LSE = -inf --
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    if SPLIT_KV:  # one partial (O, LSE) per split, combined by the launcher
        LSE += tl.program_id(2).to(tl.int64) * stride_ls
        O += tl.program_id(2).to(tl.int64) * stride_os
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + q_start + offs_m, lse,
             mask=offs_m < seqlen_q)
    O_block = O + off_b * stride_ob + off_h * stride_oh + q_start * stride_om
    o_ptrs = O_block + offs_m[:, None] * stride_om + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))


_attn_fwd_tunable = configs.Tunable("fwd", _attn_fwd,
                                    extra_key=("KV_CACHE", "PAGED", "PAGE", "SPLIT_KV"))


def attention_forward(q, k, v, opts: AttnOptions, num_splits: int = 1):
    """Launch the forward. q: (B, Nq, H, D), k, v: (B, Nk, H_k, D), H % H_k == 0, any strides.

    num_splits > 1 (KV caches: split-KV, flash-decoding) cuts every row's keys into that many
    chunks, one program each, and combines the partial results by their LSE.
    Returns out (B, Nq, H, D) in q's dtype, with q's memory layout, and lse (B, H, Nq) float32,
    natural log. Inputs are assumed validated (interface.py).
    """
    _, _, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    batch, seqlen_q, seqlen_k = opts.problem(q, k)
    split = num_splits > 1
    # (B, H, Nq); with varlen (1, H, total_q), each sequence's rows at its offset
    if split:  # partial results, fp32, one per split
        out = torch.empty(num_splits, *q.shape, device=q.device, dtype=torch.float32)
        lse = torch.empty(num_splits, q.shape[0], nheads, q.shape[1], device=q.device,
                          dtype=torch.float32)
        out_k, lse_k = out[0], lse[0]  # what the kernel indexes; splits by stride
    else:
        out_k = out = torch.empty_like(q)
        lse_k = lse = torch.empty(q.shape[0], nheads, q.shape[1], device=q.device,
                                  dtype=torch.float32)
    alibi, stride_ab = opts.alibi(lse_k)
    cu_q, cu_k = opts.cu_seqlens(lse_k)
    kv_lists, mask_data, *mask_strides = opts.mask_args("kv", lse_k)
    seqlens_k, batch_idx, block_table, stride_btb = opts.kv_args(lse_k)
    kv_flags = opts.kv_flags()
    use_tma = configs.use_tma("forward", k, v) and not kv_flags["PAGED"]
    kernel, launch = _attn_fwd_tunable.select(configs.head_dim_pad(head_dim),
                                              configs.dot_precision(q.dtype))

    def grid(meta):
        return (triton.cdiv(seqlen_q, meta["BLOCK_M"]), batch * nheads, num_splits)

    kernel[grid](
        q, k, v, out_k, lse_k, alibi, kv_lists, mask_data, cu_q, cu_k, seqlens_k, batch_idx,
        block_table,
        *opts.strides(q), *opts.strides(k), *opts.strides(v), *opts.strides(out_k),
        opts.strides(lse_k)[0], lse_k.stride(1), stride_ab, *mask_strides, stride_btb,
        out.stride(0) if split else 0, lse.stride(0) if split else 0, num_splits,
        nheads, nheads // nheads_k, seqlen_q, seqlen_k, *opts.scalars(),
        configs.seqlen_bucket(seqlen_q, seqlen_k),
        HEAD_DIM=head_dim, HEAD_DIM_PAD=configs.head_dim_pad(head_dim), **opts.flags(),
        **opts.mask_flags(),
        DOT_PRECISION=configs.dot_precision(q.dtype), USE_TMA=use_tma, **kv_flags,
        SPLIT_KV=split, **launch,
    )
    if not split:
        return out, lse
    return combine_splits(out, lse, q.dtype)


def combine_splits(out: torch.Tensor, lse: torch.Tensor, dtype: torch.dtype):
    """Partial results (S, B, Nq, H, D), (S, B, H, Nq) of disjoint key chunks -> out, lse:
    LSE = log Σ_s exp(LSE_s), O = Σ_s exp(LSE_s - LSE) O_s (a split that saw no key has
    LSE_s = -inf and weight 0; a row that saw none anywhere gives 0 and -inf)."""
    total = torch.logsumexp(lse, dim=0)  # (B, H, Nq)
    weight = torch.exp(lse - torch.where(total == float("-inf"), 0.0, total))  # (S, B, H, Nq)
    combined = (out * weight.permute(0, 1, 3, 2)[..., None]).sum(0)
    return combined.to(dtype), total
