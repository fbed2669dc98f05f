"""What the ring and the all-gather variants share: where each rank's shard lies in the
sequence, which kernel calls cover one (query shard, key block) pair exactly, and the exact merge
of partial results by their log-sum-exp.

The global problem is one sequence of N tokens attending to itself: query i sees key j when

    i - left <= j <= i + right,        window_size = (left, right), -1 unlimited; causal: right = 0

(bottom-right and top-left alignment agree, Nq = Nk). A block is the keys of one shard. Its
partial result over the keys it holds is what the kernel returns for them alone (§16 of
docs/derivation.md, split-KV):

    LSE_s = log Σ_{j ∈ K_s} exp(S_ij),        O_s = Σ_{j ∈ K_s} exp(S_ij − LSE_s) V_j,

and the blocks partition the keys, so

    LSE = log Σ_s exp(LSE_s),                 O = Σ_s exp(LSE_s − LSE) O_s.

`merge_` (kernels/merge.py) applies the second line one block at a time, in one launch (the
running form of `combine_splits`).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flashtile.interface import _backward, _forward, _options
from flashtile.kernels.merge import merge_
from flashtile.kernels.params import AttnOptions

LAYOUTS = ("contiguous", "zigzag")


@dataclass(frozen=True)
class Segment:
    """A run of consecutive tokens in a shard: rows local .. local + length - 1 of the shard are
    tokens start .. start + length - 1 of the sequence."""

    local: int
    start: int
    length: int


def segments(layout: str, world_size: int, rank: int, shard_len: int) -> tuple[Segment, ...]:
    """The runs of the sequence that rank `rank` holds, in shard order.

    contiguous: rank r holds tokens r·n .. (r + 1)·n - 1 (n = shard_len).
    zigzag: the sequence is cut into 2·world_size chunks of c = n / 2; rank r holds chunks r and
        2·world_size - 1 - r, so that under a causal mask every rank has the same work (one early
        chunk, which sees few keys, and one late chunk, which sees many). For 4 ranks:
            chunks  0 1 2 3 4 5 6 7
            rank    0 1 2 3 3 2 1 0
    """
    if layout == "contiguous":
        return (Segment(0, rank * shard_len, shard_len),)
    chunk = shard_len // 2
    return (Segment(0, rank * chunk, chunk),
            Segment(chunk, (2 * world_size - 1 - rank) * chunk, chunk))


def _check_layout(layout: str, world_size: int, seqlen: int) -> None:
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    parts = world_size * (2 if layout == "zigzag" else 1)
    if seqlen % parts != 0:
        raise ValueError(f"layout={layout!r} over {world_size} ranks cuts the sequence into "
                         f"{parts} equal chunks; the sequence length {seqlen} is not divisible "
                         f"by {parts}")


def shard_sequence(x: torch.Tensor, world_size: int, rank: int, layout: str = "contiguous",
                   dim: int = 1) -> torch.Tensor:
    """Rank `rank`'s shard of a whole sequence x (tokens along `dim`), as ring_flash_attn_func
    expects it: seqlen / world_size tokens, laid out by `layout` (see `segments`)."""
    _check_layout(layout, world_size, x.shape[dim])
    shard_len = x.shape[dim] // world_size
    runs = segments(layout, world_size, rank, shard_len)
    return torch.cat([x.narrow(dim, s.start, s.length) for s in runs], dim)


def unshard_sequence(shards: Sequence[torch.Tensor], layout: str = "contiguous",
                     dim: int = 1) -> torch.Tensor:
    """The whole sequence from every rank's shard (a list in rank order): the inverse of
    shard_sequence."""
    world_size, shard_len = len(shards), shards[0].shape[dim]
    _check_layout(layout, world_size, world_size * shard_len)
    shape = list(shards[0].shape)
    shape[dim] = world_size * shard_len
    whole = shards[0].new_empty(shape)
    for rank, shard in enumerate(shards):
        for s in segments(layout, world_size, rank, shard_len):
            whole.narrow(dim, s.start, s.length).copy_(shard.narrow(dim, s.local, s.length))
    return whole


# ---------------------------------------------------------------------------------------------
# Block plans: the kernel calls that cover one (query shard, key block) pair.

NONE, PARTIAL, FULL = 0, 1, 2


def visibility(rows: int, cols: int, diag_offset: int, window: tuple[int, int]) -> int:
    """NONE, PARTIAL or FULL: how much of a rows × cols tile is kept when row i keeps column j
    for i + diag_offset - left <= j <= i + diag_offset + right (a side of -1 is unlimited).

    Every row keeps one interval that moves by one from row to row, so the tile is FULL when the
    first row's interval reaches the last column and the last row's the first column, and NONE
    when no row in [0, rows) has an interval meeting [0, cols)."""
    left, right = (math.inf if w < 0 else w for w in window)
    if rows - 1 + diag_offset - left <= 0 and cols - 1 <= diag_offset + right:
        return FULL
    if max(0, -diag_offset - right) > min(rows - 1, cols - 1 - diag_offset + left):
        return NONE
    return PARTIAL


@dataclass(frozen=True)
class BlockCall:
    """One kernel call: query rows `rows` of the shard against keys `cols` of the block, with
    the mask of AttnOptions (diag_offset and window in the call's own coordinates)."""

    rows: slice
    cols: slice
    diag_offset: int
    window: tuple[int, int]


@functools.lru_cache(maxsize=4096)
def plan(q_runs: tuple[Segment, ...], k_runs: tuple[Segment, ...],
         window: tuple[int, int]) -> tuple[BlockCall, ...]:
    """Kernel calls whose masks together are exactly the global mask between a query shard and a
    key block, each kept (query, key) pair in exactly one call; () when nothing is kept.

    Runs that keep nothing are dropped; then the fewest calls are tried first: one over all the
    remaining rows and keys, else one per query run, else one per pair of runs. A call is exact
    when every pair of runs inside it either has the call's diagonal, or is wholly kept (or
    wholly dropped) under both masks. For the zig-zag causal layout this gives one call per
    ring step: the own block is causal on the shard as it lies, an earlier block is seen whole
    by every row of the shard, and a later one whole by its second chunk.
    Remembered per (runs, runs, window): a ring step asks again on every call (~30 µs of
    Python)."""
    seen = {(a, b): visibility(a.length, b.length, a.start - b.start, window)
            for a in q_runs for b in k_runs}
    qs = [a for a in q_runs if any(seen[a, b] != NONE for b in k_runs)]
    ks = [b for b in k_runs if any(seen[a, b] != NONE for a in q_runs)]
    if not qs:
        return ()
    call = _one_call(q_runs, k_runs, qs, ks, seen, window)
    if call is not None:
        return (call,)
    calls = []
    for a in qs:
        kept = [b for b in ks if seen[a, b] != NONE]
        call = _one_call(q_runs, k_runs, [a], kept, seen, window)
        if call is not None:
            calls.append(call)
        else:
            calls += [_one_call(q_runs, k_runs, [a], [b], seen, window) for b in kept]
    return tuple(calls)


def _span(runs: Sequence[Segment], chosen: Sequence[Segment]) -> tuple[slice, list[Segment]]:
    """The rows from the first chosen run to the end of the last, and every run inside them."""
    lo = min(r.local for r in chosen)
    hi = max(r.local + r.length for r in chosen)
    return slice(lo, hi), [r for r in runs if lo <= r.local and r.local + r.length <= hi]


def _one_call(q_runs, k_runs, qs, ks, seen, window) -> BlockCall | None:
    rows, q_in = _span(q_runs, qs)
    cols, k_in = _span(k_runs, ks)
    pairs = [(a, b) for a in q_in for b in k_in]
    if all(seen[p] == FULL for p in pairs):
        return BlockCall(rows, cols, 0, (-1, -1))

    def own(a, b) -> int:  # the tile's own diagonal
        return a.start - b.start

    def at(a, b) -> int:  # where the tile sits in the call: its row minus its column offset
        return (a.local - rows.start) - (b.local - cols.start)

    exact = [p for p in pairs if seen[p] == PARTIAL] or pairs
    for diag_offset in dict.fromkeys(own(*p) - at(*p) for p in exact):
        if all(_agrees(seen[a, b], a, b, diag_offset + at(a, b), own(a, b), window)
               for a, b in pairs):
            return BlockCall(rows, cols, diag_offset, window)
    return None


def _agrees(kept: int, a: Segment, b: Segment, offset: int, true_offset: int,
            window: tuple[int, int]) -> bool:
    """Whether pair (a, b)'s tile is masked the same under the call's diagonal (offset, in the
    tile's coordinates) as under its own (true_offset)."""
    return offset == true_offset or (
        kept != PARTIAL and visibility(a.length, b.length, offset, window) == kept)


# ---------------------------------------------------------------------------------------------
# Running the calls of one block, merging their partial results.


OptionsFor = Callable[[BlockCall], AttnOptions]


def forward_block(q: torch.Tensor, kv: torch.Tensor, calls: Sequence[BlockCall],
                  options: OptionsFor, out: torch.Tensor, lse: torch.Tensor) -> None:
    """Attend the shard's queries q (B, N, H, D) to one block kv (2, B, Nk, H_k, D) (K then V),
    merging each call's partial result into out (B, N, H, D) and lse (B, H, N), float32. The
    kernel writes each partial in float32 too: only the merged out is rounded to q's dtype, as
    single-GPU flashtile rounds its one result."""
    for call in calls:
        out_s, lse_s = _forward(q[:, call.rows], kv[0, :, call.cols], kv[1, :, call.cols],
                                options(call), out_dtype=torch.float32)
        merge_(out[:, call.rows], lse[:, :, call.rows], out_s, lse_s)


def backward_block(dout: torch.Tensor, q: torch.Tensor, kv: torch.Tensor, out: torch.Tensor,
                   lse: torch.Tensor, calls: Sequence[BlockCall], options: OptionsFor,
                   dq: torch.Tensor, dkv: torch.Tensor) -> None:
    """One block's share of the gradients, added into dq (B, N, H, D) and dkv (2, B, Nk, H_k, D)
    (dK then dV), float32.

    out and lse are the merged, global ones: the kernels recompute P = exp(S − LSE) from the
    row's global LSE and use Delta = rowsum(dO ∘ O) of its global O, so that a block's call
    returns exactly that block's terms of dQ = Σ_j dS_ij K_j, and its dK, dV whole."""
    for call in calls:
        r, c = call.rows, call.cols
        dq_s, dk_s, dv_s = _backward(dout[:, r], q[:, r], kv[0, :, c], kv[1, :, c], out[:, r],
                                     lse[:, :, r], options(call))
        dq[:, r] += dq_s
        dkv[0, :, c] += dk_s
        dkv[1, :, c] += dv_s


@dataclass(frozen=True)
class Sharding:
    """One ring attention call's setting: the process group, this rank's place in it, how the
    sequence is laid out over the ranks, and the mask and scale of the whole problem.

    window is the global (left, right), causal folded in as right = 0; next_rank and prev_rank
    are the global ranks of the ring neighbours (this rank sends to next and receives from
    prev)."""

    group: object
    rank: int
    world_size: int
    next_rank: int
    prev_rank: int
    layout: str
    window: tuple[int, int]
    softmax_scale: float | None

    def runs(self, rank: int, shard_len: int) -> tuple[Segment, ...]:
        return segments(self.layout, self.world_size, rank, shard_len)

    def options_for(self, q: torch.Tensor) -> OptionsFor:
        """AttnOptions of a call on q's shard (validated by interface._options once per mask:
        the ring asks for them at every step)."""
        batch, _, nheads, head_dim = q.shape
        made: dict[tuple, AttnOptions] = {}

        def options(call: BlockCall) -> AttnOptions:
            key = (call.diag_offset, call.window)
            if key not in made:
                made[key] = _options(batch, nheads, head_dim, q.device,
                                     softmax_scale=self.softmax_scale, causal=False,
                                     window_size=call.window, softcap=0.0, alibi_slopes=None,
                                     diag_offset=call.diag_offset)
            return made[key]

        return options
