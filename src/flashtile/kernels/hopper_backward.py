"""The backward's two passes on Hopper, written in Gluon: backward.py's _attn_bwd_dkdv and
_attn_bwd_dq with the overlap that Triton 3.6 does not generate (docs/performance.md, v7).

Same equations as backward.py (docs/derivation.md §5). The dK/dV pass, transposed so that its
program's keys are the rows:

    sT  = k qᵀ,  dpT = v dOᵀ                 both issued; wait for sT only
    pT  = exp2(sT · qk_scale − LSE · log2 e)   while dpT runs on the tensor cores
    dV += pT dO                                issued; wait for dpT
    dsT = pT ∘ (dpT − Delta)
    dK += dsT q                                wait for both, release the slot
    dK  = scale · dK at the end

Warp-specialized, as the forward's `_attn_fwd_hopper_ws` (kernels/hopper.py): a 1-warp load
partition streams q and dO blocks of BLOCK_M rows through TMA into a STAGES-deep ring (one
"ready" mbarrier per slot, one "empty" mbarrier that both compute warpgroups arrive on), and
two 4-warp compute warpgroups each own BLOCK_N / 2 = 64 keys, with their dK and dV in
registers. With grouped-query attention a program walks every query head of its key/value
head's group in turn and sums their gradients, as backward.py does; it is the sole writer of
its dK, dV rows, so there are no atomics and repeated runs are bitwise equal.

Coverage is the Gluon forward's (`hopper.supports`): dense (B, N, H, D) float16/bfloat16 with
D in {64, 128}, causal or not, no window, softcap, ALiBi, dropout, mask predicate or KV cache;
packed batches (VARLEN) only as the forward takes them (`hopper.varlen_covered`).
It does not run in Triton's interpreter: backward.py is the reference it is tested
against, on the GPU (tests/test_hopper_backward.py).

The dQ pass is the same machine turned around: a load warp streams k and v blocks, and each
compute warpgroup owns 64 query rows (q, dO, LSE and Delta loaded once):

    s   = q kᵀ,  dp = dO vᵀ                  both issued; wait for s only
    p   = exp2(s · qk_scale − LSE · log2 e)    while dp runs
    ds  = p ∘ (dp − Delta)
    dQ += ds k                                 wait, release the slot
    dQ  = scale · dQ at the end

Grids: dK/dV (cdiv(seqlen_k, BLOCK_N), nheads_k, batch); dQ (cdiv(seqlen_q, BLOCK_M), nheads,
batch), causal query blocks heaviest first; with varlen the longest sequence's lengths, and
programs past their own sequence's end exit.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia import hopper as gh
from triton.experimental.gluon.language.nvidia.hopper import mbarrier, tma

from flashtile.kernels import configs, hopper
from flashtile.kernels.hopper import (
    _launch,
    _program_ids,
    _program_rows,
    _row_descriptor,
    _sequence,
)
from flashtile.kernels.params import LOG2E

# (BLOCK_M, BLOCK_N, STAGES) per head dim, measured fastest on an H200 (docs/performance.md
# v7). dK/dV: BLOCK_N is two warpgroups of 64 keys (a wgmma's rows), BLOCK_M the query rows of
# a step. dQ: BLOCK_M is two warpgroups of 64 query rows, BLOCK_N the keys of a step.
CONFIG = {64: (64, 128, 2), 128: (64, 128, 2)}
CONFIG_DQ = {64: (128, 128, 2), 128: (128, 128, 2)}
# Per pass and (head dim, causal), the shortest key length from which the pass beat
# backward.py's in the same run; None where it never did. Below it backward.py's pass runs
# (`preferred`). dK/dV at D 64 non-causal: 0.97-1.07x at 4096 keys, 1.11x at 16384; dQ at D 64:
# 0.87-0.89x at 4096; at D 128 dK/dV 1.04-1.07x from 512 keys, dQ 0.85-0.95x at 512 and
# 1.01x at 1024 (v7.2; nothing shorter measured).
MIN_SEQLEN_K = {
    "dkdv": {(64, False): 8192, (64, True): 4096, (128, False): 512, (128, True): 512},
    "dq": {(64, False): None, (64, True): None, (128, False): 1024, (128, True): 1024},
}
LOG2E_C = gl.constexpr(LOG2E)


@gluon.jit
def _dkdv_load(Q, dO, stride_qm, stride_qh, stride_dom, stride_doh, off_h0, group, seqlen_q,
               k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, kv_ready, ready, empty,
               start_n, m_lo, n_mblocks,
               BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
               STAGES: gl.constexpr):
    """The load warp: this program's keys and values once, then q and dO of every query block
    of every query head of the group, each into the next ring slot once both warpgroups have
    released it."""
    HALF: gl.constexpr = BLOCK_N // 2
    mbarrier.expect(kv_ready, 2 * BLOCK_N * HEAD_DIM * 2)  # k and v, 16-bit elements
    for h in gl.static_range(2):
        tma.async_copy_global_to_shared(k_desc, [start_n + h * HALF, 0], kv_ready,
                                        k_smem.index(h))
        tma.async_copy_global_to_shared(v_desc, [start_n + h * HALF, 0], kv_ready,
                                        v_smem.index(h))
    nbytes: gl.constexpr = 2 * BLOCK_M * HEAD_DIM * 2  # q and dO, 16-bit elements
    layout: gl.constexpr = q_smem.type.layout
    it = 0
    for g in range(group):
        off_h = off_h0 + g
        q_desc = _row_descriptor(Q + off_h * stride_qh, seqlen_q, stride_qm, BLOCK_M, HEAD_DIM,
                                 layout)
        do_desc = _row_descriptor(dO + off_h * stride_doh, seqlen_q, stride_dom, BLOCK_M,
                                  HEAD_DIM, layout)
        for i in range(n_mblocks):
            slot = it % STAGES
            # the slot's previous use (STAGES steps ago) released by both warpgroups
            mbarrier.wait(empty.index(slot), ((it // STAGES) & 1) ^ 1, pred=it >= STAGES)
            mbarrier.expect(ready.index(slot), nbytes)
            start_m = m_lo + i * BLOCK_M
            tma.async_copy_global_to_shared(q_desc, [start_m, 0], ready.index(slot),
                                            q_smem.index(slot))
            tma.async_copy_global_to_shared(do_desc, [start_m, 0], ready.index(slot),
                                            do_smem.index(slot))
            it += 1


@gluon.jit
def _dkdv_compute(h: gl.constexpr, dk_desc, dv_desc, LSE, Delta, stride_lh, off_h0, group,
                  q_smem, do_smem, k_smem, v_smem, kv_ready, ready, empty,
                  start_n, m_lo, n_mblocks, seqlen_q, diag_offset, qk_scale, softmax_scale,
                  BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                  STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """Compute warpgroup h: dK and dV of keys start_n + h·64 ... + 63 (module docstring)."""
    HALF: gl.constexpr = BLOCK_N // 2
    dtype: gl.constexpr = q_smem.dtype
    st_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_M, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    cols: gl.constexpr = gl.SliceLayout(0, st_layout)  # along the query rows
    rows: gl.constexpr = gl.SliceLayout(1, st_layout)  # along this warpgroup's keys
    k_s = k_smem.index(h)
    v_s = v_smem.index(h)
    my_n = start_n + h * HALF
    offs_n = my_n + gl.arange(0, HALF, layout=rows)
    zero_st = gl.zeros([HALF, BLOCK_M], gl.float32, layout=st_layout)
    dk = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_layout)
    dv = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_layout)
    mbarrier.wait(kv_ready, 0)
    it = 0
    for g in range(group):
        LSE_h = LSE + (off_h0 + g) * stride_lh
        Delta_h = Delta + (off_h0 + g) * stride_lh
        for i in range(n_mblocks):
            slot = it % STAGES
            start_m = m_lo + i * BLOCK_M
            offs_m = start_m + gl.arange(0, BLOCK_M, layout=cols)
            # LSE in log2 units; rows that saw nothing (-inf) and rows past the end get +inf,
            # so that their p is exactly 0 (backward.py's _load_lse2)
            lse = gl.load(LSE_h + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
            lse2 = gl.where(lse == float("-inf"), float("inf"), lse * LOG2E_C)
            if CAUSAL:
                delta = gl.load(Delta_h + offs_m, mask=offs_m < seqlen_q, other=0.0)
            mbarrier.wait(ready.index(slot), (it // STAGES) & 1)
            q_s = q_smem.index(slot)
            do_s = do_smem.index(slot)
            sT = gh.warpgroup_mma(k_s, q_s.permute((1, 0)), zero_st, use_acc=False,
                                  is_async=True)
            dpT = gh.warpgroup_mma(v_s, do_s.permute((1, 0)), zero_st, use_acc=False,
                                   is_async=True)
            sT = gh.warpgroup_mma_wait(num_outstanding=1, deps=[sT])
            pT = gl.exp2(sT * qk_scale - gl.expand_dims(lse2, 0))
            if CAUSAL:
                # masked only where the block's first row misses the warpgroup's last key
                if start_m + diag_offset < my_n + HALF - 1:
                    keep = gl.expand_dims(offs_n, 1) <= gl.expand_dims(offs_m + diag_offset, 0)
                    pT = gl.where(keep, pT, 0.0)
            p_op = gl.convert_layout(pT.to(dtype), op_layout)
            dv = gh.warpgroup_mma(p_op, do_s, dv, is_async=True)
            if not CAUSAL:
                # Delta loaded here, under the dV matmul: fewer live registers across the sT
                # wait (ptxas spills at D 128 140 -> 128 bytes) and 2-7% faster without the
                # mask; with it, 2-8% slower than the early load above (performance.md, v7.2)
                delta = gl.load(Delta_h + offs_m, mask=offs_m < seqlen_q, other=0.0)
            dpT = gh.warpgroup_mma_wait(num_outstanding=1, deps=[dpT])
            dsT = pT * (dpT - gl.expand_dims(delta, 0))
            ds_op = gl.convert_layout(dsT.to(dtype), op_layout)
            dk = gh.warpgroup_mma(ds_op, q_s, dk, is_async=True)
            dv, dk, p_op, ds_op = gh.warpgroup_mma_wait(num_outstanding=0,
                                                        deps=[dv, dk, p_op, ds_op])
            mbarrier.arrive(empty.index(slot), count=1)
            it += 1
    dk = dk * softmax_scale
    # out through this warpgroup's own k and v buffers: every read of them is done. Keys past
    # seqlen_k (zero-filled on load) are dropped by the store
    k_s.store(dk.to(dtype))
    v_s.store(dv.to(dtype))
    gh.fence_async_shared()
    tma.async_copy_shared_to_global(dk_desc, [my_n, 0], k_s)
    tma.async_copy_shared_to_global(dv_desc, [my_n, 0], v_s)
    tma.store_wait(pendings=0)


@gluon.jit
def _attn_bwd_dkdv_hopper(
    Q, K, V, dO, LSE, Delta, dK, dV, CuSeqQ, CuSeqK,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dkb, stride_dkn, stride_dkh,
    stride_dvb, stride_dvn, stride_dvh,
    stride_lb, stride_lh,
    group, seqlen_q, seqlen_k, diag_offset, qk_scale, softmax_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    HALF: gl.constexpr = BLOCK_N // 2
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                rank=2)
    start_n = gl.program_id(0) * BLOCK_N
    off_hk = gl.program_id(1).to(gl.int64)
    off_h0 = off_hk * group  # the group's first query head
    off_b = gl.program_id(2).to(gl.int64)
    q_start, k_start, seqlen_q, seqlen_k, diag_offset = _sequence(
        CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN)
    if VARLEN:  # the grid covers the longest sequence: past this one's end, nothing to do
        if start_n >= seqlen_k:
            return
    k_desc = _row_descriptor(K + off_b * stride_kb + k_start * stride_kn + off_hk * stride_kh,
                             seqlen_k, stride_kn, HALF, HEAD_DIM, layout)
    v_desc = _row_descriptor(V + off_b * stride_vb + k_start * stride_vn + off_hk * stride_vh,
                             seqlen_k, stride_vn, HALF, HEAD_DIM, layout)
    dk_desc = _row_descriptor(
        dK + off_b * stride_dkb + k_start * stride_dkn + off_hk * stride_dkh, seqlen_k,
        stride_dkn, HALF, HEAD_DIM, layout)
    dv_desc = _row_descriptor(
        dV + off_b * stride_dvb + k_start * stride_dvn + off_hk * stride_dvh, seqlen_k,
        stride_dvn, HALF, HEAD_DIM, layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_M, HEAD_DIM], layout)
    k_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], layout)
    v_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], layout)
    kv_ready = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_ready, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=2)  # one arrival per compute warpgroup
    gh.fence_async_shared()

    m_lo = 0
    if CAUSAL:  # the first query block with a row that sees this program's first key
        m_lo = gl.maximum(start_n - diag_offset, 0) // BLOCK_M * BLOCK_M
    n_mblocks = gl.cdiv(seqlen_q - m_lo, BLOCK_M)
    LSE_b = LSE + off_b * stride_lb + q_start
    Delta_b = Delta + off_b * stride_lb + q_start
    gl.warp_specialize([
        (_dkdv_compute, (0, dk_desc, dv_desc, LSE_b, Delta_b, stride_lh, off_h0, group,
                         q_smem, do_smem, k_smem, v_smem, kv_ready, ready, empty, start_n, m_lo,
                         n_mblocks, seqlen_q, diag_offset, qk_scale, softmax_scale,
                         BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL)),
        (_dkdv_compute, (1, dk_desc, dv_desc, LSE_b, Delta_b, stride_lh, off_h0, group,
                         q_smem, do_smem, k_smem, v_smem, kv_ready, ready, empty, start_n, m_lo,
                         n_mblocks, seqlen_q, diag_offset, qk_scale, softmax_scale,
                         BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL)),
        (_dkdv_load, (Q + off_b * stride_qb + q_start * stride_qm,
                      dO + off_b * stride_dob + q_start * stride_dom, stride_qm, stride_qh,
                      stride_dom, stride_doh, off_h0, group, seqlen_q, k_desc, v_desc, q_smem,
                      do_smem, k_smem, v_smem, kv_ready, ready, empty, start_n, m_lo,
                      n_mblocks, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES)),
    ], [4, 1], [240, 24])


@gluon.jit
def _dq_load(q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_ready,
             kv_ready, kv_empty, start_m, n_blocks,
             BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
             STAGES: gl.constexpr):
    """The load warp: each warpgroup's half of q and dO once, then k_j and v_j into slot
    j % STAGES once both warpgroups have released the block that held it."""
    HALF: gl.constexpr = BLOCK_M // 2
    for h in gl.static_range(2):
        mbarrier.expect(q_ready.index(h), 2 * HALF * HEAD_DIM * 2)
        tma.async_copy_global_to_shared(q_desc, [start_m + h * HALF, 0], q_ready.index(h),
                                        q_smem.index(h))
        tma.async_copy_global_to_shared(do_desc, [start_m + h * HALF, 0], q_ready.index(h),
                                        do_smem.index(h))
    for j in range(n_blocks):
        slot = j % STAGES
        mbarrier.wait(kv_empty.index(slot), ((j // STAGES) & 1) ^ 1, pred=j >= STAGES)
        mbarrier.expect(kv_ready.index(slot), 2 * BLOCK_N * HEAD_DIM * 2)
        tma.async_copy_global_to_shared(k_desc, [j * BLOCK_N, 0], kv_ready.index(slot),
                                        k_smem.index(slot))
        tma.async_copy_global_to_shared(v_desc, [j * BLOCK_N, 0], kv_ready.index(slot),
                                        v_smem.index(slot))


@gluon.jit
def _dq_compute(h: gl.constexpr, dq_desc, LSE, Delta, q_smem, do_smem, k_smem, v_smem,
                q_ready, kv_ready, kv_empty, start_m, n_blocks, seqlen_q, diag_offset,
                qk_scale, softmax_scale,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HEAD_DIM: gl.constexpr,
                STAGES: gl.constexpr, CAUSAL: gl.constexpr):
    """Compute warpgroup h: dQ of rows start_m + h·64 ... + 63 over the key blocks they see.
    Keys past seqlen_k need no mask: their k and v rows load as zeros, so they add ds · 0."""
    HALF: gl.constexpr = BLOCK_M // 2
    dtype: gl.constexpr = q_smem.dtype
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, BLOCK_N, 16])
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, HEAD_DIM, 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=acc_layout, k_width=2)
    rows: gl.constexpr = gl.SliceLayout(1, s_layout)  # along this warpgroup's query rows
    cols: gl.constexpr = gl.SliceLayout(0, s_layout)  # along the keys
    q_s = q_smem.index(h)
    do_s = do_smem.index(h)
    my_m = start_m + h * HALF
    offs_m = my_m + gl.arange(0, HALF, layout=rows)
    lse = gl.load(LSE + offs_m, mask=offs_m < seqlen_q, other=float("inf"))
    lse2 = gl.expand_dims(gl.where(lse == float("-inf"), float("inf"), lse * LOG2E_C), 1)
    delta = gl.expand_dims(gl.load(Delta + offs_m, mask=offs_m < seqlen_q, other=0.0), 1)
    zero_s = gl.zeros([HALF, BLOCK_N], gl.float32, layout=s_layout)
    dq = gl.zeros([HALF, HEAD_DIM], gl.float32, layout=acc_layout)
    mbarrier.wait(q_ready.index(h), 0)
    for j in range(n_blocks):
        slot = j % STAGES
        start_n = j * BLOCK_N
        mbarrier.wait(kv_ready.index(slot), (j // STAGES) & 1)
        k_s = k_smem.index(slot)
        s = gh.warpgroup_mma(q_s, k_s.permute((1, 0)), zero_s, use_acc=False, is_async=True)
        dp = gh.warpgroup_mma(do_s, v_smem.index(slot).permute((1, 0)), zero_s, use_acc=False,
                              is_async=True)
        s = gh.warpgroup_mma_wait(num_outstanding=1, deps=[s])
        p = gl.exp2(s * qk_scale - lse2)
        if CAUSAL:
            # masked only where the block's last key lies right of the first row's diagonal
            if start_n + BLOCK_N - 1 > my_m + diag_offset:
                offs_n = start_n + gl.arange(0, BLOCK_N, layout=cols)
                keep = gl.expand_dims(offs_n, 0) <= gl.expand_dims(offs_m + diag_offset, 1)
                p = gl.where(keep, p, 0.0)
        dp = gh.warpgroup_mma_wait(num_outstanding=0, deps=[dp])
        ds = p * (dp - delta)
        ds_op = gl.convert_layout(ds.to(dtype), op_layout)
        dq = gh.warpgroup_mma(ds_op, k_s, dq, is_async=True)
        dq, ds_op = gh.warpgroup_mma_wait(num_outstanding=0, deps=[dq, ds_op])
        mbarrier.arrive(kv_empty.index(slot), count=1)
    dq = dq * softmax_scale
    # out through this warpgroup's own q buffer: every read of it is done
    q_s.store(dq.to(dtype))
    gh.fence_async_shared()
    tma.async_copy_shared_to_global(dq_desc, [my_m, 0], q_s)
    tma.store_wait(pendings=0)


@gluon.jit
def _attn_bwd_dq_hopper(
    Q, K, V, dO, LSE, Delta, dQ, CuSeqQ, CuSeqK,
    stride_qb, stride_qm, stride_qh,
    stride_kb, stride_kn, stride_kh,
    stride_vb, stride_vn, stride_vh,
    stride_dob, stride_dom, stride_doh,
    stride_dqb, stride_dqm, stride_dqh,
    stride_lb, stride_lh,
    group, seqlen_q, seqlen_k, diag_offset, qk_scale, softmax_scale,
    HEAD_DIM: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
    STAGES: gl.constexpr, CAUSAL: gl.constexpr, VARLEN: gl.constexpr,
):
    dtype: gl.constexpr = Q.dtype.element_ty
    HALF: gl.constexpr = BLOCK_M // 2
    layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16,
                                                rank=2)
    # query blocks with the most keys first (causal); q, dO and dQ copied HALF rows at a time
    start_m, off_h, off_b = _program_ids(BLOCK_M, CAUSAL)
    q_start, k_start, seqlen_q, seqlen_k, diag_offset = _sequence(
        CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN)
    if VARLEN:  # the grid covers the longest sequence: past this one's end, nothing to do
        if start_m >= seqlen_q:
            return
    q_desc, dq_desc, k_desc, v_desc = _program_rows(
        Q, K, V, dQ, stride_qb, stride_qm, stride_qh, stride_kb, stride_kn, stride_kh,
        stride_vb, stride_vn, stride_vh, stride_dqb, stride_dqm, stride_dqh,
        off_b, off_h, q_start, k_start, group, seqlen_q, seqlen_k, HALF, BLOCK_N, HEAD_DIM,
        False, layout)
    do_desc = _row_descriptor(
        dO + off_b * stride_dob + q_start * stride_dom + off_h * stride_doh, seqlen_q,
        stride_dom, HALF, HEAD_DIM, layout)
    q_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], layout)
    do_smem = gl.allocate_shared_memory(dtype, [2, HALF, HEAD_DIM], layout)
    k_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], layout)
    v_smem = gl.allocate_shared_memory(dtype, [STAGES, BLOCK_N, HEAD_DIM], layout)
    q_ready = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    kv_ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    kv_empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for h in gl.static_range(2):
        mbarrier.init(q_ready.index(h), count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(kv_ready.index(i), count=1)
        mbarrier.init(kv_empty.index(i), count=2)  # one arrival per compute warpgroup
    gh.fence_async_shared()

    hi = seqlen_k  # causal: key blocks up to this query block's last diagonal
    if CAUSAL:
        hi = gl.minimum(seqlen_k, start_m + BLOCK_M + diag_offset)
    n_blocks = gl.cdiv(hi, BLOCK_N)
    LSE_bh = LSE + off_b * stride_lb + off_h * stride_lh + q_start
    Delta_bh = Delta + off_b * stride_lb + off_h * stride_lh + q_start
    gl.warp_specialize([
        (_dq_compute, (0, dq_desc, LSE_bh, Delta_bh, q_smem, do_smem, k_smem, v_smem, q_ready,
                       kv_ready, kv_empty, start_m, n_blocks, seqlen_q, diag_offset, qk_scale,
                       softmax_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL)),
        (_dq_compute, (1, dq_desc, LSE_bh, Delta_bh, q_smem, do_smem, k_smem, v_smem, q_ready,
                       kv_ready, kv_empty, start_m, n_blocks, seqlen_q, diag_offset, qk_scale,
                       softmax_scale, BLOCK_M, BLOCK_N, HEAD_DIM, STAGES, CAUSAL)),
        (_dq_load, (q_desc, do_desc, k_desc, v_desc, q_smem, do_smem, k_smem, v_smem, q_ready,
                    kv_ready, kv_empty, start_m, n_blocks, BLOCK_M, BLOCK_N, HEAD_DIM,
                    STAGES)),
    ], [4, 1], [240, 24])


def _tma_ready(t: torch.Tensor) -> bool:
    return t.stride(-1) == 1 and t.data_ptr() % 16 == 0 and not any(
        s * t.element_size() % 16 for s in t.stride()[:-1])


def preferred(pass_name: str, q, k, v, do, grads, opts) -> bool:
    """Whether backward.py hands pass `pass_name` ("dkdv" or "dq", writing the tensors
    `grads`) to this module: a call the Gluon forward covers (hopper.supports), with dO and
    the gradients TMA-ready as well, at key lengths where the pass measured faster
    (MIN_SEQLEN_K)."""
    head_dim = q.shape[-1]
    threshold = MIN_SEQLEN_K[pass_name].get((head_dim, opts.causal))
    if threshold is None or opts.problem(q, k)[2] < threshold:  # varlen: the longest keys
        return False
    return hopper.supports(q, k, v, opts) and all(_tma_ready(t) for t in (do, *grads))


def dkdv(q, k, v, do, lse, delta, dk, dv, opts, config: tuple[int, int, int] | None = None):
    """Write dK, dV of a call that `hopper.supports` covers into dk, dv (k's and v's shapes):
    q, k, v, do (B, N, H, D); lse, delta (B, H, Nq) float32 with rows at unit stride, lse in
    natural log as the forward returns it, delta = rowsum(dO ∘ O) (with varlen (1, total, H, D)
    and (1, H, total_q)). config: (BLOCK_M, BLOCK_N, STAGES), CONFIG[head dim] by default."""
    nheads, head_dim, nheads_k = q.shape[2], q.shape[3], k.shape[2]
    batch, seqlen_q, seqlen_k = opts.problem(q, k)  # with varlen: entries, longest lengths
    block_m, block_n, stages = config or CONFIG[head_dim]
    cu_q, cu_k = opts.cu_seqlens(lse)
    triton.set_allocator(configs._tma_allocator)  # for the descriptors made in the kernel
    grid = (triton.cdiv(seqlen_k, block_n), nheads_k, batch)
    _launch(_attn_bwd_dkdv_hopper)[grid](
        q, k, v, do, lse, delta, dk, dv, cu_q, cu_k,
        *opts.strides(q)[:3], *opts.strides(k)[:3], *opts.strides(v)[:3],
        *opts.strides(do)[:3], *opts.strides(dk)[:3], *opts.strides(dv)[:3],
        opts.strides(lse)[0], lse.stride(1),
        nheads // nheads_k, seqlen_q, seqlen_k, opts.diag_offset, opts.softmax_scale * LOG2E,
        opts.softmax_scale,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
        CAUSAL=opts.causal, VARLEN=opts.varlen is not None, num_warps=4,
    )
    return dk, dv


def dq(q, k, v, do, lse, delta, dq, opts, config: tuple[int, int, int] | None = None):
    """Write dQ of a call that `hopper.supports` covers into dq (q's shape); arguments as
    `dkdv`. config: (BLOCK_M, BLOCK_N, STAGES), CONFIG_DQ[head dim] by default."""
    nheads, head_dim, nheads_k = q.shape[2], q.shape[3], k.shape[2]
    batch, seqlen_q, seqlen_k = opts.problem(q, k)
    block_m, block_n, stages = config or CONFIG_DQ[head_dim]
    cu_q, cu_k = opts.cu_seqlens(lse)
    triton.set_allocator(configs._tma_allocator)
    grid = (triton.cdiv(seqlen_q, block_m), nheads, batch)
    _launch(_attn_bwd_dq_hopper)[grid](
        q, k, v, do, lse, delta, dq, cu_q, cu_k,
        *opts.strides(q)[:3], *opts.strides(k)[:3], *opts.strides(v)[:3],
        *opts.strides(do)[:3], *opts.strides(dq)[:3], opts.strides(lse)[0], lse.stride(1),
        nheads // nheads_k, seqlen_q, seqlen_k, opts.diag_offset, opts.softmax_scale * LOG2E,
        opts.softmax_scale,
        HEAD_DIM=head_dim, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages,
        CAUSAL=opts.causal, VARLEN=opts.varlen is not None, num_warps=4,
    )
    return dq
