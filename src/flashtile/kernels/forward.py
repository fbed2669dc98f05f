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

Grid: (cdiv(seqlen_q, BLOCK_M), nheads, batch * splits), as FlashAttention's (CUDA allows
65,535 on axes 1 and 2, so batch · splits is checked against it). With PACK_GQA (KV caches with
grouped heads) a program's rows are the (query, head) pairs of one kv head's group, so the cache
is read once per kv head: (cdiv(seqlen_q · group, BLOCK_M), nheads_k, batch * splits).
"""

import torch
import triton
import triton.language as tl

from flashtile.kernels import configs, hopper, plans
from flashtile.kernels.common import (
    LOG2E,
    apply_mask_mod,
    block_ranges,
    block_start,
    dropout_keep,
    load_kv,
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
    PACK_GQA: tl.constexpr,
):
    tl.static_assert(not PACK_GQA or not (DROPOUT or VARLEN or MASK_MOD is not None),
                     "PACK_GQA is for KV caches: no dropout, varlen or mask predicate")
    start_m = query_block_start(BLOCK_M, LOCAL_RIGHT)
    # grid axes 1 and 2: the head (with PACK_GQA the kv head), then batch entry × split
    off_b = (tl.program_id(2) // num_splits).to(tl.int64)
    split = tl.program_id(2) % num_splits
    if PACK_GQA:
        # -- one program per (batch, kv head): its rows are the (query, head) pairs of the
        # kv head's group, row r = query r // group of head off_hk · group + r % group --
        off_hk = tl.program_id(1).to(tl.int64)
        offs_r = start_m + tl.arange(0, BLOCK_M)
        offs_m = offs_r // group
        offs_h = off_hk * group + offs_r % group
        off_h = off_hk * group  # the group's first head: rng_base only, unused without dropout
        first_m = start_m // group
    else:
        off_h = tl.program_id(1).to(tl.int64)
        off_hk = off_h // group
        offs_m = start_m + tl.arange(0, BLOCK_M)
        offs_h = off_h
        first_m = start_m
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    # dropout's counters: per (batch, head), over the (longest) seqlen_q × seqlen_k
    rng_base = (off_b * nheads + off_h) * seqlen_q * seqlen_k
    # -- packed variable-length batches: this entry's rows and lengths --
    q_start, k_start, seqlen_q, seqlen_k, diag_offset = seq_bounds(
        CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN)
    if VARLEN:
        # the grid covers the longest sequence for every entry: a program past its own
        # sequence's end has no rows, and exits before it loads or sets up anything more
        if start_m >= seqlen_q:
            return
    # -- a KV cache: this entry's valid length, its cache row, its page table --
    kv_b = off_b
    pool_rows = seqlen_k  # with PAGED, the key tensor is the whole pool of pages: its rows
    if KV_CACHE:
        seqlen_k = tl.load(SeqlensK + off_b)
        diag_offset = seqlen_k - seqlen_q
        kv_b = tl.load(BatchIdx + off_b).to(tl.int64)
    BlockTable_b = BlockTable + off_b * stride_btb

    Q_block = Q + off_b * stride_qb + off_h * stride_qh + q_start * stride_qm
    # TMA for keys and values; a paged cache only when every key block lies in one page, and
    # then through one descriptor over the pool (a block's rows found by its page, load_kv)
    KV_TMA: tl.constexpr = USE_TMA and (not PAGED or PAGE % BLOCK_N == 0)
    kv_rows = pool_rows if PAGED else seqlen_k
    K_src = row_source(K + kv_b * stride_kb + off_hk * stride_kh + k_start * stride_kn,
                       kv_rows, stride_kn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, KV_TMA)
    V_src = row_source(V + kv_b * stride_vb + off_hk * stride_vh + k_start * stride_vn,
                       kv_rows, stride_vn, HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, KV_TMA)
    if PACK_GQA:
        q_rows = Q + off_b * stride_qb + offs_m * stride_qm + offs_h * stride_qh
        q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qd,
                    mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM), other=0.0)
    else:
        q = load_tile(Q_block, offs_m, offs_d, stride_qm, stride_qd, seqlen_q, HEAD_DIM,
                      CHECK_ROWS=True, CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    slope2 = 0.0
    if HAS_ALIBI:
        if PACK_GQA:  # one slope per row: (BLOCK_M, 1)
            slope2 = tl.load(Alibi + off_b * stride_ab + offs_h)[:, None] * LOG2E
        else:
            slope2 = tl.load(Alibi + off_b * stride_ab + off_h) * LOG2E

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM_PAD], dtype=tl.float32)

    if MASK_MOD is not None:
        # -- a mask predicate: the key blocks its block map lists, full ones (unmasked), then
        # partial ones (masked) --
        FullList = (KvLists + off_b * stride_mapb + off_h * stride_maph
                    + (start_m // MAP_BLOCK_M) * stride_mapr)
        ranges = (FullList, FullList + stride_mapk)
    else:
        # -- key blocks: masked [a, b), unmasked [b, c), masked [c, hi); the rest skipped --
        last_m = start_m + BLOCK_M - 1
        if PACK_GQA:
            last_m = tl.minimum(last_m // group, seqlen_q - 1)
        a, b, c, hi = block_ranges(first_m, last_m, seqlen_k, diag_offset, window_left,
                                   window_right, BLOCK_N, LOCAL_LEFT, LOCAL_RIGHT)
        if SPLIT_KV:
            # -- split-KV: this program's share of the keys, whole blocks; each range is cut
            # to it (clamping keeps a <= b <= c <= hi, so masked stays masked) --
            chunk = tl.cdiv(tl.cdiv(seqlen_k, num_splits), BLOCK_N) * BLOCK_N
            split_lo = split * chunk
            split_hi = split_lo + chunk
            a = tl.minimum(tl.maximum(a, split_lo), split_hi)
            b = tl.minimum(tl.maximum(b, split_lo), split_hi)
            c = tl.minimum(tl.maximum(c, split_lo), split_hi)
            hi = tl.minimum(tl.maximum(hi, split_lo), split_hi)
        ranges = (a, b, c, hi)
    # -- one call site, unrolled at compile time over the ranges: the two lists, or the three
    # dense ranges (the first only with a window's left edge; it is always empty without) --
    SPARSE: tl.constexpr = MASK_MOD is not None
    for r in tl.static_range(2 if SPARSE else 3):
        if SPARSE or r > 0 or LOCAL_LEFT:
            # masked: a list's partial blocks, every dense range but the middle one
            List, lo, hi_r = loop_range(ranges, r, KvLists, BLOCK_N, MAP_BLOCK_N, SPARSE)
            acc, l_i, m_i = _attn_fwd_inner(
                acc, l_i, m_i, q, K_src, V_src, BlockTable_b, stride_kn, stride_kd, stride_vn,
                stride_vd,
                offs_m, offs_d, lo, hi_r, List, off_b, off_h, MaskData, mask_data_stride,
                seqlen_q, seqlen_k,
                diag_offset, window_left, window_right, qk_scale, softcap_scale, softcap_log2,
                slope2, dropout_p, dropout_scale, seed, rng_base,
                HEAD_DIM, HEAD_DIM_PAD, BLOCK_N, LOCAL_LEFT, LOCAL_RIGHT, SOFTCAP, HAS_ALIBI,
                DROPOUT, MASK_MOD, MASK_DATA, MAP_BLOCK_N, SPARSE, 1 if SPARSE else BLOCK_N,
                r == 1 if SPARSE else r != 1, DOT_PRECISION, KV_TMA, PAGED, PAGE)

    # -- epilogue: normalize; a row that saw nothing gives O = 0, LSE = -inf --
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * 0.6931471805599453)
    if SPLIT_KV:  # one partial (O, LSE) per split, combined by the launcher
        LSE += split.to(tl.int64) * stride_ls
        O += split.to(tl.int64) * stride_os
    tl.store(LSE + off_b * stride_lb + offs_h * stride_lh + q_start + offs_m, lse,
             mask=offs_m < seqlen_q)
    # offs_h: a scalar, or with PACK_GQA each row's head
    o_rows = O + off_b * stride_ob + offs_h * stride_oh + (q_start + offs_m) * stride_om
    o_ptrs = o_rows[:, None] + offs_d[None, :] * stride_od
    tl.store(o_ptrs, acc.to(O.dtype.element_ty),
             mask=(offs_m[:, None] < seqlen_q) & (offs_d[None, :] < HEAD_DIM))


_attn_fwd_tunable = configs.Tunable("fwd", _attn_fwd,
                                    extra_key=("KV_CACHE", "PAGED", "PAGE", "SPLIT_KV"))


def loads_through_tma(k, v, opts: AttnOptions, seqlen_k: int) -> bool:
    """Whether the forward reads k and v through TMA descriptors: a layout that allows it
    (configs.use_tma), and either a contiguous KV cache or at least
    configs.TMA_FORWARD_MIN_SEQLEN_K keys; paged caches only with the tma_paged feature."""
    if opts.kvcache is None:
        return seqlen_k >= configs.TMA_FORWARD_MIN_SEQLEN_K and configs.use_tma("forward", k, v)
    paged = opts.kvcache[2] is not None
    return configs.use_tma("forward", k, v) and (not paged or configs.features["tma_paged"])


@on_first_tensors_device
def attention_forward(q, k, v, opts: AttnOptions, num_splits: int = 1,
                      out_dtype: torch.dtype | None = None):
    """Launch the forward. q: (B, Nq, H, D), k, v: (B, Nk, H_k, D), H % H_k == 0, any strides.

    num_splits > 1 (KV caches: split-KV, flash-decoding) cuts every row's keys into that many
    chunks, one program each, and combines the partial results by their LSE.
    Returns out (B, Nq, H, D) in out_dtype (default q's dtype; float32 for partial results that
    are merged later, as ring attention's), with q's memory layout, and lse (B, H, Nq) float32,
    natural log. Inputs are assumed validated (interface.py).
    On a Hopper GPU a dense call that `hopper.preferred` accepts runs the Gluon forward of
    kernels/hopper.py instead (same results, docs/performance.md v6).
    With configs.features["replay"], a one-launch call (no splits, out in q's dtype) whose
    signature has a plan replays its launch (`Plan`, kernels/plans.py); one that has none
    records it.
    """
    out_dtype = out_dtype or q.dtype
    key = None
    if configs.features["replay"] and num_splits == 1 and out_dtype == q.dtype:
        key = plans.signature((q, k, v), opts)
    if key is None:
        return _launch_forward(q, k, v, opts, num_splits, out_dtype)
    return plans.replayed_or_recorded(_plans, key, (q, k, v),
                                      lambda *inputs: _one_launch(*inputs, opts), Plan,
                                      launches=1)


def _one_launch(q, k, v, opts: AttnOptions):
    """A forward of one launch: (out, lse), and every tensor it read or wrote, in the order
    Plan takes them."""
    out, lse = _launch_forward(q, k, v, opts, 1, q.dtype)
    return (out, lse), (q, k, v, out, lse)


def _outputs(q, out_dtype: torch.dtype):
    """out in q's layout and out_dtype, lse (B, H, Nq) float32."""
    return torch.empty_like(q, dtype=out_dtype), torch.empty(
        q.shape[0], q.shape[2], q.shape[1], device=q.device, dtype=torch.float32)


def _launch_forward(q, k, v, opts: AttnOptions, num_splits: int, out_dtype: torch.dtype):
    """attention_forward's launches: out, lse."""
    if (configs.features["gluon_forward"] and num_splits == 1
            and out_dtype in (q.dtype, torch.float32) and hopper.preferred(q, k, v, opts)):
        out, lse = _outputs(q, out_dtype)  # the buffers a Plan allocates for its replay
        return hopper.attention_forward(q, k, v, opts, out=out, lse=lse)
    _, _, nheads, head_dim = q.shape
    nheads_k = k.shape[2]
    batch, seqlen_q, seqlen_k = opts.problem(q, k)
    split = num_splits > 1
    # KV caches with grouped heads: one program reads a kv head once for its whole group
    pack = opts.kvcache is not None and nheads > nheads_k
    rows, programs = (seqlen_q * (nheads // nheads_k), nheads_k) if pack else (seqlen_q, nheads)
    # (B, H, Nq); with varlen (1, H, total_q), each sequence's rows at its offset
    if split:  # partial results, fp32, one per split
        out = torch.empty(num_splits, *q.shape, device=q.device, dtype=torch.float32)
        lse = torch.empty(num_splits, q.shape[0], nheads, q.shape[1], device=q.device,
                          dtype=torch.float32)
        out_k, lse_k = out[0], lse[0]  # what the kernel indexes; splits by stride
    else:
        out_k, lse_k = out, lse = _outputs(q, out_dtype)
    alibi, stride_ab = opts.alibi(lse_k)
    cu_q, cu_k = opts.cu_seqlens(lse_k)
    kv_lists, mask_data, *mask_strides = opts.mask_args("kv", lse_k)
    seqlens_k, batch_idx, block_table, stride_btb = opts.kv_args(lse_k)
    kv_flags = opts.kv_flags()
    use_tma = loads_through_tma(k, v, opts, seqlen_k)
    kernel, launch = _attn_fwd_tunable.select(configs.head_dim_pad(head_dim),
                                              configs.dot_precision(q.dtype),
                                              decode=kv_flags["KV_CACHE"])

    def grid(meta):
        return (configs.cdiv(rows, meta["BLOCK_M"]), programs, batch * num_splits)

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
        SPLIT_KV=split, PACK_GQA=pack, **launch,
    )
    if not split:
        return out, lse
    return combine_splits(out, lse, out_dtype)


# -- Plans (kernels/plans.py): a forward's launch made again for the next call of its
# signature, skipping the decisions and the binding above

_plans = plans.cache()


class Plan:
    """The one launch of a forward (forward.py's kernel or the Gluon one), as `_one_launch`
    made it, for calls of the same signature: a new out and lse, the same kernel and
    arguments, the call's tensors in their places."""

    def __init__(self, launches, tensors: tuple):
        (self.attention,) = (Replay(r, tensors) for r in launches)

    def __call__(self, q, k, v):
        out, lse = _outputs(q, q.dtype)
        if q.is_cuda:
            triton.set_allocator(configs._tma_allocator)  # descriptors made in the kernels
        self.attention.replay((q, k, v, out, lse))
        return out, lse


@triton.jit
def _combine_splits(
    O_part, LSE_part, O, LSE,
    stride_ps, stride_pb, stride_pm, stride_ph, stride_pd,
    stride_ls, stride_lb, stride_lh, stride_lm,
    stride_ob, stride_om, stride_oh, stride_od,
    nheads, seqlen_q, num_splits,
    HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, SPLITS_PAD: tl.constexpr,
):
    """One (batch, query, head) row: LSE = log Σ_s exp(LSE_s), O = Σ_s exp(LSE_s - LSE) O_s
    (docs/derivation.md §16). Grid: (batch · seqlen_q · nheads,)."""
    row = tl.program_id(0).to(tl.int64)
    off_h = row % nheads
    off_m = (row // nheads) % seqlen_q
    off_b = row // (nheads * seqlen_q)
    offs_s = tl.arange(0, SPLITS_PAD)
    offs_d = tl.arange(0, HEAD_DIM_PAD)
    lse_s = tl.load(LSE_part + offs_s * stride_ls + off_b * stride_lb + off_h * stride_lh
                    + off_m * stride_lm, mask=offs_s < num_splits, other=float("-inf"))
    # -- a split that saw no key has LSE_s = -inf, weight 0; a row that saw none: O 0, -inf --
    m = tl.max(lse_s, 0)
    m_safe = tl.where(m == float("-inf"), 0.0, m)
    w = tl.exp(lse_s - m_safe)
    total = tl.sum(w, 0)
    w = w / tl.where(total == 0.0, 1.0, total)
    o_part = tl.load(O_part + offs_s[:, None] * stride_ps + off_b * stride_pb
                     + off_m * stride_pm + off_h * stride_ph + offs_d[None, :] * stride_pd,
                     mask=(offs_s[:, None] < num_splits) & (offs_d[None, :] < HEAD_DIM),
                     other=0.0)
    o = tl.sum(o_part * w[:, None], 0)
    tl.store(O + off_b * stride_ob + off_m * stride_om + off_h * stride_oh + offs_d * stride_od,
             o.to(O.dtype.element_ty), mask=offs_d < HEAD_DIM)
    lse = tl.where(total == 0.0, float("-inf"), m_safe + tl.log(total))
    tl.store(LSE + off_b * stride_lb + off_h * stride_lh + off_m * stride_lm, lse)


_combine = Launcher(_combine_splits)


def combine_splits(out_part: torch.Tensor, lse_part: torch.Tensor, dtype: torch.dtype):
    """Partial results (S, B, Nq, H, D) and (S, B, H, Nq) of disjoint key chunks -> out
    (B, Nq, H, D) in `dtype`, lse (B, H, Nq) float32 (float64 partials give float64). One
    launch."""
    splits, batch, seqlen_q, nheads, head_dim = out_part.shape
    out = torch.empty(out_part.shape[1:], device=out_part.device, dtype=dtype)
    lse = torch.empty(lse_part.shape[1:], device=out.device,
                      dtype=torch.promote_types(lse_part.dtype, torch.float32))
    _combine[(batch * seqlen_q * nheads,)](
        out_part, lse_part, out, lse, *out_part.stride(), *lse_part.stride(), *out.stride(),
        nheads, seqlen_q, splits, HEAD_DIM=head_dim,
        HEAD_DIM_PAD=configs.head_dim_pad(head_dim),
        SPLITS_PAD=max(2, 1 << (splits - 1).bit_length()))
    return out, lse
