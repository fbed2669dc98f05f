"""The forward on Hopper, written in Gluon: the same online softmax as forward.py, with the
overlap that Triton 3.6 does not generate (docs/performance.md, "A path through Gluon").

forward.py's loop runs q kᵀ, then the softmax, then p v, each waiting for the one before:
Triton waits for every wgmma before its result is read. Here the waits are ours, and the loop
is software-pipelined one key block deep (FlashAttention-3's intra-warpgroup overlap):

    s_j  = q k_jᵀ                 issued, not waited for
    acc += p_{j-1} v_{j-1}        issued behind it
    wait for s_j (one wgmma group may stay in flight: the p v one)
    softmax of s_j -> p_j         the exponentials run while the tensor cores do p_{j-1} v_{j-1}
    wait for acc, acc *= alpha_j

Keys and values arrive through TMA into STAGES-deep rings, each slot with its own mbarrier.
Two kernels run that loop:
- `_attn_fwd_hopper`, pipelined: 8 warps, two warpgroups of 64 rows each; the same warps
  refill a slot after a CTA barrier once every warp has waited for the wgmma that read it.
- `_attn_fwd_hopper_ws`, warp-specialized: a load warp issues every copy and waits on each
  slot's "empty" mbarrier, which each of the two compute warpgroups arrives on when done with
  the slot; nothing holds the warpgroups in step, so one's softmax runs beside the other's
  wgmmas. CHOICE says which one a head dim takes.

This path covers the dense forward: (B, N, H, D) tensors with a unit head-dim stride and
16-byte aligned rows, float16 or bfloat16, D in {64, 128}, softmax_scale > 0, no window but
causal, no softcap, ALiBi, dropout, mask predicate or KV cache, and with causal
seqlen_q <= seqlen_k (every row sees key 0). O is written in q's dtype through TMA, or in
float32 (OUT_F32: ring attention's partial results) straight from the registers. Packed
batches (VARLEN: each program finds its sequence's rows from the cumulative lengths, its
descriptors end where the sequence ends) only with the gluon_varlen feature (on; v7.2) and one
cumulative-lengths tensor for both queries and keys (`varlen_covered`). `supports` says whether
a call is covered, `preferred` whether it is one where this path measured faster; everything
else takes forward.py. It does not run in Triton's interpreter: forward.py is the reference it
is tested against, on the GPU (tests/test_hopper.py).

Grid: (cdiv(seqlen_q, BLOCK_M), nheads, batch), causal query blocks heaviest first, as in
forward.py (with varlen, seqlen_q the longest sequence's; programs past their own end exit).
Names follow forward.py: s scores (raw q kᵀ here; scaled inside the exp2),
m_i running max (scaled, log2 units), l_i running sum, acc unnormalized output.
"""

from __future__ import annotations

import functools

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper as gh
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from flashtile.kernels import configs
from flashtile.kernels.launch import launcher_for
from flashtile.kernels.params import LOG2E

# Per head dim, the kernel and config that measured fastest (docs/performance.md v6, and v7.14
# for D 64, H200): (warp-specialized?, (BLOCK_M, BLOCK_N, STAGES, num_warps)). Both kernels
# take either head dim.
CHOICE = {64: (False, (64, 128, 2, 4)), 128: (True, (128, 128, 3, 4))}
# The shortest key length at which that choice beat forward.py in the same run, per (head dim,
# causal); below it, and for query blocks shorter than BLOCK_M, forward.py stays (`preferred`).
MIN_SEQLEN_K = {(64, False): 1024, (64, True): 4096, (128, False): 1024, (128, True): 2048}
# The warp-specialized kernel's config where the head dim's choice does not fit it (its two
# warpgroups own 64 query rows each, so BLOCK_M = 128): tests and sweeps that ask for it.
WS_FALLBACK = (128, 128, 2, 4)


def default_config(head_dim: int, ws: bool) -> tuple[int, int, int, int]:
    """(BLOCK_M, BLOCK_N, STAGES, num_warps) of a kernel at a head dim: CHOICE's, unless the
    warp-specialized kernel is asked for and CHOICE's BLOCK_M is not 128 (WS_FALLBACK)."""
    config = CHOICE[head_dim][1]
    return WS_FALLBACK if ws and config[0] != 128 else config


@gluon.jit
def _masked_scores(s, start_m, start_n, seqlen_k, diag_offset,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                   s_layout: gl.constexpr):
    """s with -inf where key start_n + j lies past seqlen_k or (causal) right of the row's
    diagonal."""
    offs_n = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
    keep = gl.expand_dims(offs_n < seqlen_k, 0)
    if CAUSAL:
        offs_m = start_m + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, s_layout))
        keep = keep & (gl.expand_dims(offs_n, 0) <= gl.expand_dims(offs_m + diag_offset, 1))
    return gl.where(keep, s, float("-inf"))


@gluon.jit
def _block_needs_mask(start_m, start_n, seqlen_k, diag_offset,
                      BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Whether key block [start_n, start_n + BLOCK_N) has an invisible entry for some row of
    the query block starting at start_m: the ragged end, or (causal) the diagonal."""
    needs = start_n + BLOCK_N > seqlen_k
    if CAUSAL:
        needs = needs | (start_n + BLOCK_N - 1 > start_m + diag_offset)
    return needs


@gluon.jit
def _row_descriptor(base, n_rows, stride_r, BLOCK: gl.constexpr, HEAD_DIM: gl.constexpr,
                    layout: gl.constexpr):
    """A TMA descriptor over the (n_rows, HEAD_DIM) matrix at `base` (one batch entry and
    head), BLOCK rows a copy: the copy engine zero-fills rows past n_rows on loads and drops
    them on stores."""
    return tma.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_r, 1],
                                      block_shape=[BLOCK, HEAD_DIM], layout=layout)


@gluon.jit
def _program_ids(BLOCK_M: gl.constexpr, CAUSAL: gl.constexpr):
    """This program's first query row (causal: the query blocks with the most keys first),
    head and batch entry."""
    pid_m = gl.program_id(0)
    if CAUSAL:
        pid_m = gl.num_programs(0) - 1 - pid_m
    return pid_m * BLOCK_M, gl.program_id(1).to(gl.int64), gl.program_id(2).to(gl.int64)


@gluon.jit
def _sequence(CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN: gl.constexpr):
    """Where batch entry off_b's rows start in the packed tensors, its lengths and its
    diagonal, as common.seq_bounds: with VARLEN from the cumulative lengths (each sequence's own
    bottom-right diagonal), otherwise rows from 0 and the arguments passed through."""
    if VARLEN:
        q_start = gl.load(CuSeqQ + off_b).to(gl.int64)
        k_start = gl.load(CuSeqK + off_b).to(gl.int64)
        seqlen_q = (gl.load(CuSeqQ + off_b + 1) - q_start).to(gl.int32)
        seqlen_k = (gl.load(CuSeqK + off_b + 1) - k_start).to(gl.int32)
        diag_offset = seqlen_k - seqlen_q
    else:
        q_start = 0
        k_start = 0
    return q_start, k_start, seqlen_q, seqlen_k, diag_offset


@gluon.jit
def _program_rows(Q, K, V, O,
                  stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
                  stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh,
                  off_b, off_h, q_start, k_start, group, seqlen_q, seqlen_k,
                  Q_ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                  OUT_F32: gl.constexpr, layout: gl.constexpr):
    """TMA descriptors over the rows of q and O (Q_ROWS a copy) of (batch, head) from
    q_start, and over those of k and v (BLOCK_N a copy) of its key/value head from k_start:
    the copy engine zero-fills rows past the end on loads and drops them on stores. With
    OUT_F32, O's is a pointer to that row instead (_write_output)."""
    off_hk = off_h // group
    q_desc = _row_descriptor(Q + off_b * stride_qb + q_start * stride_qm + off_h * stride_qh,
                             seqlen_q, stride_qm, Q_ROWS, HEAD_DIM, layout)
    o_dst = O + off_b * stride_ob + q_start * stride_om + off_h * stride_oh
    if not OUT_F32:
        o_dst = _row_descriptor(o_dst, seqlen_q, stride_om, Q_ROWS, HEAD_DIM, layout)
    k_desc = _row_descriptor(K + off_b * stride_kb + k_start * stride_kn + off_hk * stride_kh,
                             seqlen_k, stride_kn, BLOCK_N, HEAD_DIM, layout)
    v_desc = _row_descriptor(V + off_b * stride_vb + k_start * stride_vn + off_hk * stride_vh,
                             seqlen_k, stride_vn, BLOCK_N, HEAD_DIM, layout)
    return q_desc, o_dst, k_desc, v_desc


@gluon.jit
def _softmax_first(s, start_m, seqlen_k, diag_offset, qk_scale,
                   BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                   s_layout: gl.constexpr):
    """m_i, l_i and p of key block 0. Every row sees key 0 (`supports`), so m_i is finite."""
    if _block_needs_mask(start_m, 0, seqlen_k, diag_offset, BLOCK_N, CAUSAL):
        s = _masked_scores(s, start_m, 0, seqlen_k, diag_offset, BLOCK_M, BLOCK_N, CAUSAL,
                           s_layout)
    m_i = gl.max(s, 1) * qk_scale
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_i, 1))
    return m_i, gl.sum(p, 1), p


@gluon.jit
def _softmax_next(s, m_i, l_i, start_m, start_n, seqlen_k, diag_offset, qk_scale,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
                  s_layout: gl.constexpr):
    """The online softmax's step for key block start_n: (m_i, l_i, p, alpha)."""
    if _block_needs_mask(start_m, start_n, seqlen_k, diag_offset, BLOCK_N, CAUSAL):
        s = _masked_scores(s, start_m, start_n, seqlen_k, diag_offset, BLOCK_M, BLOCK_N,
                           CAUSAL, s_layout)
    m_ij = gl.maximum(m_i, gl.max(s, 1) * qk_scale)
    p = gl.exp2(s * qk_scale - gl.expand_dims(m_ij, 1))
    alpha = gl.exp2(m_i - m_ij)
    l_i = l_i * alpha + gl.sum(p, 1)
    return m_ij, l_i, p, alpha


@gluon.jit
def _write_output(acc, m_i, l_i, o_smem, o_dst, LSE_rows, row0, seqlen_q, stride_om,
                  ROWS: gl.constexpr, HEAD_DIM: gl.constexpr, SYNC: gl.constexpr,
                  OUT_F32: gl.constexpr, row_s: gl.constexpr, o_layout: gl.constexpr):
    """O = acc / l into rows [row0, row0 + ROWS), and LSE (natural log) at LSE_rows + row.
    In q's dtype o_dst is O's TMA descriptor and the rows go through o_smem; SYNC: a CTA
    barrier first (o_smem is q's buffer, which another warpgroup may still be reading). With
    OUT_F32 (the partial results of ring attention's blocks) o_dst points at the (batch, head)'s
    row 0 of a float32 O, stride_om apart, and the registers are stored directly: a float32 tile
    would not fit beside the K/V rings in shared memory."""
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    out = acc / gl.expand_dims(gl.convert_layout(l_i, row_o), 1)
    if OUT_F32:
        offs_r = row0 + gl.arange(0, ROWS, layout=row_o)
        offs_d = gl.arange(0, HEAD_DIM, layout=gl.SliceLayout(0, o_layout))
        ptrs = (o_dst + gl.expand_dims(offs_r.to(gl.int64) * stride_om, 1)
                + gl.expand_dims(offs_d, 0))
        gl.store(ptrs, out, mask=gl.expand_dims(offs_r < seqlen_q, 1))
    else:
        if SYNC:
            gl.thread_barrier()
        o_smem.store(out.to(o_smem.dtype))
        gh.fence_async_shared()
        tma.async_copy_shared_to_global(o_dst, [row0, 0], o_smem)
    offs_m = row0 + gl.arange(0, ROWS, layout=row_s)
    lse = (m_i + gl.log2(l_i)) * 0.6931471805599453
    gl.store(LSE_rows + offs_m, lse, mask=offs_m < seqlen_q)
    if not OUT_F32:
        tma.store_wait(pendings=0)


@gluon.jit
def _attend(q_s, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, k_desc, v_desc, row0,
            n_blocks, seqlen_k, diag_offset, qk_scale,
            ROWS: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
            STAGES: gl.constexpr, CAUSAL: gl.constexpr, WARPS: gl.constexpr,
            LOADS: gl.constexpr):
    """The pipelined loop over key blocks for the ROWS query rows from row0 held in q_s (q
    already waited for), spread over WARPS warps; returns acc, m_i, l_i.

    A slot of the k and v rings is free once its wgmma is done. LOADS (the pipelined kernel):
    these warps refill it themselves after a CTA barrier (k_desc, v_desc; k_empty, v_empty
    unused). Otherwise (the warp-specialized kernel) they arrive on k_empty / v_empty for the
    load warp (k_desc, v_desc unused)."""
    dtype: gl.constexpr = q_s.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    row_o: gl.constexpr = gl.SliceLayout(1, o_layout)
    kv_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2

    # -- key block 0: its scores and softmax, before the pipelined loop --
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, layout=s_layout)
    mbarrier.wait(k_ready.index(0), 0)
    s = gh.warpgroup_mma(q_s, k_smem.index(0).permute((1, 0)), s_zero, use_acc=False,
                         is_async=True)
    s = gh.warpgroup_mma_wait(num_outstanding=0, deps=[s])
    # -- k_0's slot is free: it takes key block STAGES --
    if LOADS:
        gl.thread_barrier()
        fill = STAGES < n_blocks
        mbarrier.expect(k_ready.index(0), kv_bytes, pred=fill)
        tma.async_copy_global_to_shared(k_desc, [STAGES * BLOCK_N, 0], k_ready.index(0),
                                        k_smem.index(0), pred=fill)
    else:
        mbarrier.arrive(k_empty.index(0), count=1)
    m_i, l_i, p = _softmax_first(s, row0, seqlen_k, diag_offset, qk_scale, ROWS, BLOCK_N,
                                 CAUSAL, s_layout)
    p_op = gl.convert_layout(p.to(dtype), p_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, layout=o_layout)

    for j in range(1, n_blocks):
        slot = j % STAGES
        prev = (j - 1) % STAGES
        start_n = j * BLOCK_N
        # -- s_j = q k_jᵀ, then acc += p_{j-1} v_{j-1}, both in flight --
        mbarrier.wait(k_ready.index(slot), (j // STAGES) & 1)
        s = gh.warpgroup_mma(q_s, k_smem.index(slot).permute((1, 0)), s_zero,
                             use_acc=False, is_async=True)
        mbarrier.wait(v_ready.index(prev), ((j - 1) // STAGES) & 1)
        acc = gh.warpgroup_mma(p_op, v_smem.index(prev), acc, is_async=True)
        # -- the softmax of s_j while p_{j-1} v_{j-1} runs --
        s = gh.warpgroup_mma_wait(num_outstanding=1, deps=[s])
        if not LOADS:
            mbarrier.arrive(k_empty.index(slot), count=1)
        m_i, l_i, p, alpha = _softmax_next(s, m_i, l_i, row0, start_n, seqlen_k, diag_offset,
                                           qk_scale, ROWS, BLOCK_N, CAUSAL, s_layout)
        acc, p_op = gh.warpgroup_mma_wait(num_outstanding=0, deps=[acc, p_op])
        if not LOADS:
            mbarrier.arrive(v_empty.index(prev), count=1)
        acc = acc * gl.expand_dims(gl.convert_layout(alpha, row_o), 1)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        if LOADS:
            # -- every warp is done with k_j and v_{j-1}: refill their slots --
            gl.thread_barrier()
            nxt = j + STAGES
            fill = nxt < n_blocks
            mbarrier.expect(k_ready.index(slot), kv_bytes, pred=fill)
            tma.async_copy_global_to_shared(k_desc, [nxt * BLOCK_N, 0], k_ready.index(slot),
                                            k_smem.index(slot), pred=fill)
            fill = nxt - 1 < n_blocks
            mbarrier.expect(v_ready.index(prev), kv_bytes, pred=fill)
            tma.async_copy_global_to_shared(v_desc, [(nxt - 1) * BLOCK_N, 0],
                                            v_ready.index(prev), v_smem.index(prev), pred=fill)

    # -- the last block's p v --
    last = n_blocks - 1
    mbarrier.wait(v_ready.index(last % STAGES), (last // STAGES) & 1)
    acc = gh.warpgroup_mma(p_op, v_smem.index(last % STAGES), acc, is_async=True)
    acc = gh.warpgroup_mma_wait(num_outstanding=0, deps=[acc])
    return acc, m_i, l_i


@gluon.jit
def _attn_fwd_hopper(
    Q, K, V, O, LSE, CuSeqQ, CuSeqK,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    group, seqlen_q, seqlen_k, diag_offset, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
    OUT_F32: gl.constexpr, num_warps: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    # -- the row layouts of _attend's accumulators, for the epilogue --
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[num_warps, 1], instr_shape=[16, HEAD_DIM, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128,
                                                     element_bitwidth=16, rank=2)

    start_m, off_h, off_b = _program_ids(BLOCK_M, CAUSAL)
    q_start, k_start, seqlen_q, seqlen_k, diag_offset = _sequence(
        CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN)
    if VARLEN:  # the grid covers the longest sequence: past this one's end, nothing to do
        if start_m >= seqlen_q:
            return
    q_desc, o_dst, k_desc, v_desc = _program_rows(
        Q, K, V, O, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh,
        off_b, off_h, q_start, k_start, group, seqlen_q, seqlen_k, BLOCK_M, BLOCK_N, HEAD_DIM,
        OUT_F32, smem_layout)

    q_smem = gl.allocate_shared_memory(dtype, [BLOCK_M, HEAD_DIM], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    k_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_bars.index(i), count=1)
        mbarrier.init(v_bars.index(i), count=1)
    gh.fence_async_shared()

    # -- key blocks [0, hi): causal stops after this query block's last diagonal --
    hi = seqlen_k
    if CAUSAL:
        hi = gl.minimum(seqlen_k, start_m + BLOCK_M + diag_offset)
    n_blocks = gl.cdiv(hi, BLOCK_N)
    kv_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2

    mbarrier.expect(q_bar, BLOCK_M * HEAD_DIM * 2)
    tma.async_copy_global_to_shared(q_desc, [start_m, 0], q_bar, q_smem)
    for i in gl.static_range(STAGES):
        fill = i < n_blocks
        mbarrier.expect(k_bars.index(i), kv_bytes, pred=fill)
        tma.async_copy_global_to_shared(k_desc, [i * BLOCK_N, 0], k_bars.index(i),
                                        k_smem.index(i), pred=fill)
        mbarrier.expect(v_bars.index(i), kv_bytes, pred=fill)
        tma.async_copy_global_to_shared(v_desc, [i * BLOCK_N, 0], v_bars.index(i),
                                        v_smem.index(i), pred=fill)

    mbarrier.wait(q_bar, 0)
    acc, m_i, l_i = _attend(q_smem, k_smem, v_smem, k_bars, v_bars, k_bars, v_bars, k_desc,
                            v_desc, start_m, n_blocks, seqlen_k, diag_offset, qk_scale, BLOCK_M,
                            BLOCK_N, HEAD_DIM, STAGES, CAUSAL, num_warps, True)

    mbarrier.invalidate(q_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(k_bars.index(i))
        mbarrier.invalidate(v_bars.index(i))

    # -- epilogue: O through q's buffer, once both warpgroups' last q kᵀ is done --
    _write_output(acc, m_i, l_i, q_smem, o_dst,
                  LSE + off_b * stride_lb + off_h * stride_lh + q_start, start_m, seqlen_q,
                  stride_om, BLOCK_M, HEAD_DIM, True, OUT_F32, row_s, o_layout)


@gluon.jit
def _ws_load(q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
             k_empty, v_empty, start_m, n_blocks,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
             STAGES: gl.constexpr):
    """The load warp: each warpgroup's half of q once, then k_j and v_j into slot j % STAGES
    as soon as both warpgroups have released the block that held it."""
    HALF: gl.constexpr = BLOCK_M // 2
    for h in gl.static_range(2):
        mbarrier.expect(q_bars.index(h), HALF * HEAD_DIM * 2)
        tma.async_copy_global_to_shared(q_desc, [start_m + h * HALF, 0], q_bars.index(h),
                                        q_smem.index(h))
    kv_bytes: gl.constexpr = BLOCK_N * HEAD_DIM * 2
    for j in range(n_blocks):
        slot = j % STAGES
        parity = ((j // STAGES) & 1) ^ 1  # the release of block j - STAGES
        mbarrier.wait(k_empty.index(slot), parity, pred=j >= STAGES)
        mbarrier.expect(k_ready.index(slot), kv_bytes)
        tma.async_copy_global_to_shared(k_desc, [j * BLOCK_N, 0], k_ready.index(slot),
                                        k_smem.index(slot))
        mbarrier.wait(v_empty.index(slot), parity, pred=j >= STAGES)
        mbarrier.expect(v_ready.index(slot), kv_bytes)
        tma.async_copy_global_to_shared(v_desc, [j * BLOCK_N, 0], v_ready.index(slot),
                                        v_smem.index(slot))


@gluon.jit
def _ws_compute(h: gl.constexpr, o_dst, LSE, q_smem, k_smem, v_smem, q_bars, k_ready,
                v_ready, k_empty, v_empty, start_m, n_blocks, seqlen_q, seqlen_k, diag_offset,
                qk_scale, stride_om, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                HEAD_DIM: gl.constexpr, STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                OUT_F32: gl.constexpr):
    """One warpgroup: rows [start_m + h · BLOCK_M / 2, + BLOCK_M / 2) of the query block, the
    pipelined loop of _attn_fwd_hopper, releasing each slot to the load warp when done."""
    HALF: gl.constexpr = BLOCK_M // 2
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    o_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    row_s: gl.constexpr = gl.SliceLayout(1, s_layout)
    my_start = start_m + h * HALF
    q_h = q_smem.index(h)

    mbarrier.wait(q_bars.index(h), 0)
    acc, m_i, l_i = _attend(q_h, k_smem, v_smem, k_ready, v_ready, k_empty, v_empty, None,
                            None, my_start, n_blocks, seqlen_k, diag_offset, qk_scale, HALF,
                            BLOCK_N, HEAD_DIM, STAGES, CAUSAL, 4, False)

    # -- O through this warpgroup's own q buffer: its last q kᵀ is done, no barrier --
    _write_output(acc, m_i, l_i, q_h, o_dst, LSE, my_start, seqlen_q, stride_om, HALF,
                  HEAD_DIM, False, OUT_F32, row_s, o_layout)


@gluon.jit
def _attn_fwd_hopper_ws(
    Q, K, V, O, LSE, CuSeqQ, CuSeqK,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_ob, stride_om, stride_oh,
    stride_lb, stride_lh,
    group, seqlen_q, seqlen_k, diag_offset, qk_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
    OUT_F32: gl.constexpr, num_warps: gl.constexpr,
):
    """_attn_fwd_hopper warp-specialized: a load warp issues the TMA copies, and each of two
    warpgroups (the default partition and a worker, num_warps = 4) owns half of the query
    block, so the warpgroups are not held in step by a barrier per key block."""
    dtype: gl.constexpr = Q.dtype.element_ty
    HALF: gl.constexpr = BLOCK_M // 2
    smem_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128,
                                                     element_bitwidth=16, rank=2)
    start_m, off_h, off_b = _program_ids(BLOCK_M, CAUSAL)
    q_start, k_start, seqlen_q, seqlen_k, diag_offset = _sequence(
        CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN)
    if VARLEN:  # the grid covers the longest sequence: past this one's end, nothing to do
        if start_m >= seqlen_q:
            return
    q_desc, o_dst, k_desc, v_desc = _program_rows(
        Q, K, V, O, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh, stride_ob, stride_om, stride_oh,
        off_b, off_h, q_start, k_start, group, seqlen_q, seqlen_k, HALF, BLOCK_N, HEAD_DIM,
        OUT_F32, smem_layout)
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], smem_layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], smem_layout)
    q_bars = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for h in gl.static_range(2):
        mbarrier.init(q_bars.index(h), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)  # one arrival per warpgroup
        mbarrier.init(v_empty.index(i), count=2)
    gh.fence_async_shared()

    hi = seqlen_k
    if CAUSAL:
        hi = gl.minimum(seqlen_k, start_m + BLOCK_M + diag_offset)
    n_blocks = gl.cdiv(hi, BLOCK_N)
    LSE_bh = LSE + off_b * stride_lb + off_h * stride_lh + q_start
    gl.warp_specialize([
        (_ws_compute, (0, o_dst, LSE_bh, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
                       k_empty, v_empty, start_m, n_blocks, seqlen_q, seqlen_k, diag_offset,
                       qk_scale, stride_om, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                       OUT_F32)),
        (_ws_compute, (1, o_dst, LSE_bh, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
                       k_empty, v_empty, start_m, n_blocks, seqlen_q, seqlen_k, diag_offset,
                       qk_scale, stride_om, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL,
                       OUT_F32)),
        (_ws_load, (q_desc, k_desc, v_desc, q_smem, k_smem, v_smem, q_bars, k_ready, v_ready,
                    k_empty, v_empty, start_m, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)),
    ], [4, 1], [240, 24])


def supports(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts) -> bool:
    """Whether this call is one the Gluon forward covers (module docstring)."""
    if not (q.is_cuda and _is_hopper(q.device.index)):
        return False
    if q.dtype not in (torch.float16, torch.bfloat16) or q.shape[-1] not in CHOICE:
        return False
    if opts.kvcache is not None or opts.mask_mod is not None:
        return False
    if opts.varlen is not None and not varlen_covered(opts):
        return False
    if (opts.softcap > 0 or opts.alibi_slopes is not None or opts.dropout_p > 0
            or opts.softmax_scale <= 0):
        return False
    if opts.window_left >= 0 or opts.window_right > 0:
        return False
    if opts.causal and opts.diag_offset < 0:
        return False
    for t in (q, k, v):
        if t.stride(-1) != 1 or t.data_ptr() % 16 or any(s * t.element_size() % 16
                                                          for s in t.stride()[:-1]):
            return False
    return q.shape[1] > 0 and k.shape[1] > 0


@functools.cache
def _is_hopper(device_index: int) -> bool:
    """Per device, once: torch.cuda.get_device_capability took 12 µs a call on the H200's host."""
    return torch.cuda.get_device_capability(device_index)[0] == 9


def varlen_covered(opts) -> bool:
    """A packed batch (flash_attn_varlen_func) the Gluon kernels take: with the gluon_varlen
    feature on, and the same cumulative lengths for queries and keys (one tensor, so every
    sequence has as many keys as queries and no row sees nothing; known without reading the
    lengths on the host)."""
    cu_q, cu_k = opts.varlen[0], opts.varlen[1]
    return configs.features["gluon_varlen"] and (
        cu_q is cu_k or (cu_q.data_ptr() == cu_k.data_ptr() and cu_q.shape == cu_k.shape))


def preferred(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts) -> bool:
    """Whether the forward takes this path: a covered call of the lengths where it measured
    faster than forward.py (MIN_SEQLEN_K), with at least one whole query block (with varlen,
    the longest sequence's lengths decide)."""
    head_dim = q.shape[-1]
    _, seqlen_q, seqlen_k = opts.problem(q, k)
    if head_dim not in CHOICE or seqlen_q < CHOICE[head_dim][1][0]:
        return False
    return seqlen_k >= MIN_SEQLEN_K[head_dim, opts.causal] and supports(q, k, v, opts)


def _launch(kernel):
    """The kernel, or its launch.Launcher with configs.features["gluon_launcher"] (this
    module's and hopper_backward.py's launches)."""
    return launcher_for(kernel) if configs.features["gluon_launcher"] else kernel


def attention_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, opts,
                      config: tuple[int, int, int, int] | None = None,
                      out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
                      ws: bool | None = None):
    """The forward of a supported call: out (B, Nq, H, D) in q's dtype and layout, lse
    (B, H, Nq) float32, natural log, as forward.attention_forward returns them (with varlen
    (1, total_q, H, D) and (1, H, total_q)).
    ws: the warp-specialized kernel or the pipelined one, CHOICE[head dim]'s by default;
    config: (BLOCK_M, BLOCK_N, STAGES, num_warps; the warp-specialized kernel runs 4 + 4 + 1
    warps whatever it says), `default_config` by default. out, lse: buffers to write (tests
    pass poisoned ones), else new; out in q's dtype or float32 (ring attention's partial
    results), with q's shape."""
    nheads, head_dim, nheads_k = q.shape[2], q.shape[3], k.shape[2]
    if out is not None and (out.dtype not in (q.dtype, torch.float32) or out.shape != q.shape
                            or out.stride(-1) != 1):
        raise ValueError(f"out must have q's shape {tuple(q.shape)}, a unit last stride and "
                         f"q's dtype or float32; got {tuple(out.shape)}, {out.dtype}")
    batch, seqlen_q, seqlen_k = opts.problem(q, k)  # with varlen: entries, longest lengths
    ws = CHOICE[head_dim][0] if ws is None else ws
    block_m, block_n, stages, warps = config or default_config(head_dim, ws)
    out = torch.empty_like(q) if out is None else out
    if lse is None:  # (B, H, Nq); with varlen (1, H, total_q)
        lse = torch.empty(q.shape[0], nheads, q.shape[1], device=q.device, dtype=torch.float32)
    cu_q, cu_k = opts.cu_seqlens(lse)
    triton.set_allocator(configs._tma_allocator)  # for the descriptors made in the kernel
    grid = (triton.cdiv(seqlen_q, block_m), nheads, batch)
    _launch(_attn_fwd_hopper_ws if ws else _attn_fwd_hopper)[grid](
        q, k, v, out, lse, cu_q, cu_k,
        *opts.strides(q)[:3], *opts.strides(k)[:3], *opts.strides(v)[:3],
        *opts.strides(out)[:3], opts.strides(lse)[0], lse.stride(1),
        nheads // nheads_k, seqlen_q, seqlen_k, opts.diag_offset,
        opts.softmax_scale * LOG2E,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
        CAUSAL=opts.causal, VARLEN=opts.varlen is not None, OUT_F32=out.dtype == torch.float32,
        num_warps=4 if ws else warps,
    )
    return out, lse
