"""Pieces shared by the forward and backward kernels: tile loads and the visibility mask.

`visible` is the single definition of which (query, key) pairs take part; the forward and both
backward passes call it, so the three cannot disagree. It mirrors `reference.keep_mask`:
query row i sees key column j when i < seqlen_q, j < seqlen_k and, if causal,
j <= i + diag_offset. Its index arguments come already broadcast ((M, 1) and (1, N), or the
transpose), so the same function serves the forward's qk tile and the backward's qkᵀ tile.
"""

import triton
import triton.language as tl


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
def visible(offs_m, offs_n, seqlen_q, seqlen_k, diag_offset, IS_CAUSAL: tl.constexpr):
    """Bool tile, broadcast of offs_m and offs_n: query offs_m may attend to key offs_n."""
    keep = (offs_m < seqlen_q) & (offs_n < seqlen_k)
    if IS_CAUSAL:
        keep = keep & (offs_n <= offs_m + diag_offset)
    return keep


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
def query_block_start(BLOCK_M: tl.constexpr, IS_CAUSAL: tl.constexpr):
    """First query row of this program. Causal grids run the query blocks with the most keys to
    see first (the last ones), which shortens the tail of the launch."""
    if IS_CAUSAL:
        start_m = (tl.num_programs(0) - 1 - tl.program_id(0)) * BLOCK_M
    else:
        start_m = tl.program_id(0) * BLOCK_M
    return start_m


@triton.jit
def key_ranges(start_m, seqlen_k, diag_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
               IS_CAUSAL: tl.constexpr):
    """For the query block at start_m, the key blocks [0, n_full_end) that need no mask and
    [n_full_end, hi) that do (the causal diagonal and the ragged end); keys from hi on are seen by
    no row of the block and are skipped."""
    n_even_end = (seqlen_k // BLOCK_N) * BLOCK_N
    if IS_CAUSAL:
        # keys j <= start_m + diag_offset are seen by every row of the block
        n_full_end = tl.minimum(
            n_even_end, (tl.maximum(start_m + diag_offset + 1, 0) // BLOCK_N) * BLOCK_N)
        hi = tl.minimum(seqlen_k, tl.maximum(start_m + BLOCK_M + diag_offset, 0))
    else:
        n_full_end = n_even_end
        hi = seqlen_k
    return n_full_end, hi


@triton.jit
def query_ranges(start_n, seqlen_q, diag_offset, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 IS_CAUSAL: tl.constexpr):
    """For the key block at start_n, the query blocks: masked [lo, m_mid) on the causal diagonal,
    unmasked [m_mid, m_even_end), masked [m_even_end, seqlen_q) at the ragged end. Rows before lo
    see none of the block's keys and are skipped."""
    m_even_end = (seqlen_q // BLOCK_M) * BLOCK_M
    if IS_CAUSAL:
        # first row that sees key start_n; first block whose every row sees the whole key block
        lo = (tl.maximum(start_n - diag_offset, 0) // BLOCK_M) * BLOCK_M
        m_full = tl.cdiv(tl.maximum(start_n + BLOCK_N - 1 - diag_offset, 0), BLOCK_M) * BLOCK_M
        m_mid = tl.minimum(tl.maximum(m_full, lo), m_even_end)
    else:
        lo = 0
        m_mid = 0
    return lo, m_mid, m_even_end
