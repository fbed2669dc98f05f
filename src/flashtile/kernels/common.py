"""Pieces shared by every kernel: tile loads, the score modifications, the visibility mask,
the dropout mask, and which blocks a program visits.

Each is defined once and called by the forward, both backward passes and the probabilities
kernel, so they cannot disagree. They mirror `reference.py`: scores are
S = softcap(scale · q kᵀ) + ALiBi bias, then masked (bounds, causal/sliding window), softmax,
dropout. Index arguments come already broadcast ((M, 1) and (1, N), or the transpose), so the
same function serves the forward's qk tile and the backward's qkᵀ tile.

Every modification is behind a compile-time flag (LOCAL_LEFT, LOCAL_RIGHT, SOFTCAP, HAS_ALIBI,
DROPOUT): switched off, it is not in the compiled kernel.
"""

import triton
import triton.language as tl

# log2(e), as a constexpr: the one kind of global a compiled kernel may read.
LOG2E = tl.constexpr(1.4426950408889634)


@triton.jit
def load_tile(base, offs_r, offs_c, stride_r, stride_c, n_rows, n_cols,
              CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """Load a (len(offs_r), len(offs_c)) tile, zero-filled outside the bounds that are checked."""
    ptrs = base + offs_r[:, None] * stride_r + offs_c[None, :] * stride_c
    if CHECK_ROWS and CHECK_COLS:
        mask = (offs_r[:, None] < n_rows) & (offs_c[None, :] < n_cols)
        tile = tl.load(ptrs, mask=mask, other=0.0)
    elif CHECK_ROWS:
        tile = tl.load(ptrs, mask=offs_r[:, None] < n_rows, other=0.0)
    elif CHECK_COLS:
        tile = tl.load(ptrs, mask=offs_c[None, :] < n_cols, other=0.0)
    else:
        tile = tl.load(ptrs)
    return tile


@triton.jit
def visible(offs_m, offs_n, seqlen_q, seqlen_k, diag_offset, window_left, window_right,
            LOCAL_LEFT: tl.constexpr, LOCAL_RIGHT: tl.constexpr):
    """Bool tile, broadcast of offs_m and offs_n: query offs_m may attend to key offs_n.

    With diag = offs_m + diag_offset: keys up to diag + window_right (LOCAL_RIGHT; causal is
    window_right = 0) and from diag - window_left on (LOCAL_LEFT)."""
    keep = (offs_m < seqlen_q) & (offs_n < seqlen_k)
    if LOCAL_RIGHT:
        keep = keep & (offs_n <= offs_m + diag_offset + window_right)
    if LOCAL_LEFT:
        keep = keep & (offs_n >= offs_m + diag_offset - window_left)
    return keep


@triton.jit
def tanh(x):
    """tanh through exp2 (exact to a few float32 roundoffs; saturates to ±1 without NaN)."""
    return 1.0 - 2.0 / (tl.math.exp2(x * 2.8853900817779268) + 1.0)


@triton.jit
def scores_log2(qk, offs_m, offs_n, diag_offset, qk_scale, softcap_scale, softcap_log2, slope2,
                SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr):
    """Scores in log2 units from raw q·k tiles: s = log2(e) · (softcap(scale · qk) + bias),
    and dscale = d softcap(x) / dx at x = scale · qk (1 without a softcap), for the backward.

    softcap(x) = c · tanh(x / c): softcap_scale = scale / c, softcap_log2 = c · log2(e).
    ALiBi bias = -slope · |i + diag_offset - j|; slope2 = slope · log2(e)."""
    if SOFTCAP:
        t = tanh(qk * softcap_scale)
        s = t * softcap_log2
        dscale = 1.0 - t * t
    else:
        s = qk * qk_scale
        dscale = 1.0
    if HAS_ALIBI:
        s = s - slope2 * tl.abs(offs_m + diag_offset - offs_n).to(tl.float32)
    return s, dscale


@triton.jit
def dropout_keep(seed, rng_base, offs_m, offs_n, seqlen_k, dropout_p):
    """Bool tile: entry (offs_m, offs_n) survives dropout. Philox counter = the entry's flat
    index in this head's (seqlen_q, seqlen_k) matrix plus rng_base (the head's start), so the
    forward, both backward passes and the probabilities kernel draw the same numbers."""
    offsets = rng_base + offs_m.to(tl.int64) * seqlen_k + offs_n
    return tl.rand(seed, offsets) >= dropout_p


@triton.jit
def row_source(base, n_rows, stride_r, HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
               BLOCK: tl.constexpr, USE_TMA: tl.constexpr):
    """What `load_rows` reads from: a TMA tensor descriptor over the (n_rows, HEAD_DIM) matrix at
    `base` when USE_TMA, else the base pointer itself."""
    if USE_TMA:
        src = tl.make_tensor_descriptor(base, shape=[n_rows, HEAD_DIM], strides=[stride_r, 1],
                                        block_shape=[BLOCK, HEAD_DIM_PAD])
    else:
        src = base
    return src


@triton.jit
def load_rows(src, start, offs_r, offs_d, stride_r, stride_d, n_rows,
              HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr,
              CHECK_ROWS: tl.constexpr, USE_TMA: tl.constexpr):
    """Rows [start, start + BLOCK) of a (n_rows, HEAD_DIM) matrix as a (BLOCK, HEAD_DIM_PAD)
    tile, zero beyond n_rows and HEAD_DIM. Through TMA the copy engine fills the zeros."""
    if USE_TMA:
        tile = src.load([start, 0])
    else:
        tile = load_tile(src, offs_r, offs_d, stride_r, stride_d, n_rows, HEAD_DIM,
                         CHECK_ROWS=CHECK_ROWS, CHECK_COLS=HEAD_DIM != HEAD_DIM_PAD)
    return tile


@triton.jit
def query_block_start(BLOCK_M: tl.constexpr, LOCAL_RIGHT: tl.constexpr):
    """First query row of this program. When later rows see more keys (causal), the grid runs
    the query blocks with the most keys first (the last ones), which shortens the launch's tail."""
    if LOCAL_RIGHT:
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    else:
        start_m = tl.program_id(0) * BLOCK_M
    return start_m


@triton.jit
def block_ranges(start, last, n_other, offset, before, after, OTHER_BLOCK: tl.constexpr,
                 LIMIT_BEFORE: tl.constexpr, LIMIT_AFTER: tl.constexpr):
    """Which blocks of the other axis the indices start .. last of a block must visit, when
    index x sees y < n_other iff y >= x + offset - before (LIMIT_BEFORE) and y <= x + offset + after
    (LIMIT_AFTER). Returns a <= b <= c <= hi, multiples of OTHER_BLOCK but hi:

        [a, b) masked  - the near edge of the window, where rows see part of a block
        [b, c) full    - every x of the block sees every y: no mask
        [c, hi) masked - the causal diagonal / far window edge and the ragged end of n_other

    Blocks outside [a, hi) are seen by nobody and skipped. Forward and dQ: x = query, y = key,
    offset = diag_offset, before = window_left, after = window_right. dK/dV: x = key,
    y = query, offset = -diag_offset, before = window_right, after = window_left."""
    even_end = (n_other // OTHER_BLOCK) * OTHER_BLOCK
    if LIMIT_BEFORE:
        lo = tl.maximum(start + offset - before, 0)
        full_lo = tl.maximum(last + offset - before, 0)
    else:
        lo = 0
        full_lo = 0
    if LIMIT_AFTER:
        hi = tl.minimum(n_other, tl.maximum(last + offset + after + 1, 0))
        full_hi = tl.minimum(even_end, tl.maximum(start + offset + after + 1, 0))
    else:
        hi = n_other
        full_hi = even_end
    a = (lo // OTHER_BLOCK) * OTHER_BLOCK
    b = tl.maximum(a, tl.minimum(tl.cdiv(full_lo, OTHER_BLOCK) * OTHER_BLOCK, hi))
    c = tl.maximum(b, (full_hi // OTHER_BLOCK) * OTHER_BLOCK)
    return a, b, c, hi


@triton.jit
def apply_mask_mod(keep, off_b, off_h, offs_m, offs_n, seqlen_q, seqlen_k, MaskData,
                   mask_data_stride, MASK_MOD: tl.constexpr, MASK_DATA: tl.constexpr):
    """keep AND the user's mask predicate (masks.py), called with broadcast index tiles. The
    indices are clamped into [0, seqlen): the predicate never sees a position past the end (the
    padding of a ragged tile, which `keep` already drops), so it may index its data freely."""
    offs_m = tl.minimum(offs_m, seqlen_q - 1)
    offs_n = tl.minimum(offs_n, seqlen_k - 1)
    if MASK_DATA:
        keep = keep & MASK_MOD(off_b, off_h, offs_m, offs_n, MaskData, mask_data_stride)
    else:
        keep = keep & MASK_MOD(off_b, off_h, offs_m, offs_n)
    return keep


@triton.jit
def block_start(j, List, BLOCK: tl.constexpr, MAP_BLOCK: tl.constexpr, SPARSE: tl.constexpr):
    """Start of the block a loop visits at step j: j itself (dense loops step over positions,
    BLOCK at a time), or with a mask's block list (SPARSE, steps of 1), sub-block
    j % (MAP_BLOCK // BLOCK) of the (j // that)-th listed map block."""
    if SPARSE:
        start = (tl.load(List + 1 + j // (MAP_BLOCK // BLOCK)) * MAP_BLOCK
                 + (j % (MAP_BLOCK // BLOCK)) * BLOCK)
    else:
        start = j
    return start


@triton.jit
def list_length(List, BLOCK: tl.constexpr, MAP_BLOCK: tl.constexpr):
    """How many BLOCK-sized blocks a mask's block list covers (its count of map blocks first)."""
    return tl.load(List) * (MAP_BLOCK // BLOCK)


@triton.jit
def loop_range(ranges, r: tl.constexpr, Lists, BLOCK: tl.constexpr, MAP_BLOCK: tl.constexpr,
               SPARSE: tl.constexpr):
    """(List, lo, hi) of range r of a kernel's block loop. With SPARSE, `ranges` are a mask's two
    block lists (full, partial) and range r is all of list r; otherwise `ranges` are
    block_ranges' bounds (a, b, c, hi) and range r is positions ranges[r] .. ranges[r + 1],
    with `Lists` passed through unread."""
    if SPARSE:
        return ranges[r], 0, list_length(ranges[r], BLOCK, MAP_BLOCK)
    else:
        return Lists, ranges[r], ranges[r + 1]


@triton.jit
def seq_bounds(CuSeqQ, CuSeqK, off_b, seqlen_q, seqlen_k, diag_offset, VARLEN: tl.constexpr):
    """Where batch entry off_b's rows start in the packed tensors and how long its sequences
    are. With VARLEN, from the cumulative lengths (int32, batch + 1 entries), and the diagonal
    is each sequence's own bottom-right one (seqlen_k - seqlen_q); otherwise rows start at 0 and
    the arguments pass through."""
    if VARLEN:
        q_start = tl.load(CuSeqQ + off_b).to(tl.int64)
        k_start = tl.load(CuSeqK + off_b).to(tl.int64)
        seqlen_q = (tl.load(CuSeqQ + off_b + 1) - q_start).to(tl.int32)
        seqlen_k = (tl.load(CuSeqK + off_b + 1) - k_start).to(tl.int32)
        diag_offset = seqlen_k - seqlen_q
    else:
        q_start = 0
        k_start = 0
    return q_start, k_start, seqlen_q, seqlen_k, diag_offset


@triton.jit
def load_kv(src, BlockTable, start, offs_r, offs_d, stride_r, stride_d, n_rows,
            HEAD_DIM: tl.constexpr, HEAD_DIM_PAD: tl.constexpr, CHECK_ROWS: tl.constexpr,
            USE_TMA: tl.constexpr, PAGED: tl.constexpr, PAGE: tl.constexpr):
    """Key or value rows [start, start + BLOCK) as load_rows does, or from a paged cache
    (PAGED): logical row r lives in physical row BlockTable[r // PAGE] · PAGE + r % PAGE of
    `src`; rows past n_rows give zeros. A paged cache through TMA (USE_TMA, which the kernel
    sets only when BLOCK divides PAGE) copies the block from its one page; otherwise each row
    is gathered by its own page."""
    if PAGED and USE_TMA:
        tile = src.load([tl.load(BlockTable + start // PAGE) * PAGE + start % PAGE, 0])
        if CHECK_ROWS:  # the rest of the last page is not this sequence's
            tile = tl.where(offs_r[:, None] < n_rows, tile, 0.0)
    elif PAGED:
        logical = tl.where(offs_r < n_rows, offs_r, 0)
        rows = tl.load(BlockTable + logical // PAGE).to(tl.int64) * PAGE + logical % PAGE
        mask = (offs_r[:, None] < n_rows) & (offs_d[None, :] < HEAD_DIM)
        tile = tl.load(src + rows[:, None] * stride_r + offs_d[None, :] * stride_d, mask=mask,
                       other=0.0)
    else:
        tile = load_rows(src, start, offs_r, offs_d, stride_r, stride_d, n_rows, HEAD_DIM,
                         HEAD_DIM_PAD, CHECK_ROWS, USE_TMA)
    return tile
