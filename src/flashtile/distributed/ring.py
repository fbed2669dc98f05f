"""Context parallelism: exact attention over a sequence sharded across the ranks of a process
group, with flashtile's kernels for every block.

Ring (Liu et al., "Ring Attention", 2023; the zig-zag layout of zhuzilin/ring-flash-attention).
With W ranks, rank r holds its queries Q_r and, at step t = 0 .. W-1, the keys and values
KV_s of rank s = (r - t) mod W. While the kernel works on KV_s, KV_s travels on to rank r + 1 and
KV_{s-1} arrives from rank r - 1 (torch.distributed.batch_isend_irecv; on NCCL the transfer runs
on NCCL's stream, beside the kernel). Each block's partial (O_s, LSE_s) is merged into the
running (O, LSE) by blocks.merge_, exactly (docs/derivation.md §16).

Backward: the same ring again. At step t rank r has KV_s and the dK_s, dV_s accumulated by the
ranks KV_s has visited so far (float32; they arrive from rank r - 1 during step t's kernel). It
adds its block's terms, computed from the global O and LSE (blocks.backward_block), and sends the
accumulator on; after W steps every accumulator is back with its owner. dQ stays where it is.
The summation order is the ring's, fixed: repeated backward passes are bitwise equal.

All-gather (allgather.py): every rank gathers the whole K and V once and runs one call per query
run; the backward reduce-scatters dK and dV. It sends the same bytes but not overlapped with the
kernels, in 1 collective instead of W - 1 exchanges: faster when the blocks are so small that the
ring's per-step latency dominates (docs/distributed.md §4).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashtile.distributed import allgather
from flashtile.distributed.blocks import (
    LAYOUTS,
    Sharding,
    backward_block,
    forward_block,
    plan,
)
from flashtile.interface import _check_qkv, _check_tensors, _softmax_scale, _window

KV_EXCHANGES = ("auto", "ring", "allgather")

# "auto" gathers K and V when one rank's K and V shard is at most this many bytes: a ring step
# then costs its fixed latency (kernel launches, the exchange, the merge; about 25 µs assumed)
# more than its transfer (1 MiB at InfiniBand's 50 GB/s is 21 µs), so W - 1 steps lose to one
# collective. docs/distributed.md derives it; a multi-GPU run should calibrate it.
ALLGATHER_MAX_SHARD_BYTES = 1 << 20

_TAG_KV, _TAG_DKV = 0, 1  # distinct tags: K/V and dK/dV messages between two ranks never mix


class _Exchange:
    """One ring hop in flight: `send` posted to the next rank and a buffer like it posted to
    receive from the previous one. Holds both tensors until wait(), which returns the received
    one (on NCCL the current stream then waits for the transfer)."""

    def __init__(self, send: torch.Tensor, sharding: Sharding, tag: int):
        self.send, self.recv = send, torch.empty_like(send)
        self.works = dist.batch_isend_irecv([
            dist.P2POp(dist.isend, self.send, sharding.next_rank, sharding.group, tag),
            dist.P2POp(dist.irecv, self.recv, sharding.prev_rank, sharding.group, tag),
        ])

    def wait(self) -> torch.Tensor:
        for work in self.works:
            work.wait()
        return self.recv


def ring_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 sharding: Sharding) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, N, H, D) in q's dtype and lse (B, H, N) float32 of this rank's queries against
    the whole sequence, K/V blocks passed around the ring."""
    batch, shard_len, nheads, head_dim = q.shape
    out = torch.zeros(batch, shard_len, nheads, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.full((batch, nheads, shard_len), float("-inf"), device=q.device)
    if q.numel() == 0:
        return out.to(q.dtype), lse
    options = sharding.options_for(q)
    q_runs = sharding.runs(sharding.rank, shard_len)
    kv = torch.stack((k, v))  # (2, B, N, H_k, D): one message per step
    for step in range(sharding.world_size):
        # the next block travels while this one is computed; the last needs no successor
        last = step == sharding.world_size - 1
        hop = None if last else _Exchange(kv, sharding, _TAG_KV)
        source = (sharding.rank - step) % sharding.world_size
        calls = plan(q_runs, sharding.runs(source, shard_len), sharding.window)
        forward_block(q, kv, calls, options, out, lse)
        if hop is not None:
            kv = hop.wait()
    return out.to(q.dtype), lse


def ring_backward(dout, q, k, v, out, lse, sharding: Sharding):
    """dq, dk, dv of this rank's shard; dK/dV accumulators travel with their K/V blocks."""
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    shard_len = q.shape[1]
    options = sharding.options_for(q)
    q_runs = sharding.runs(sharding.rank, shard_len)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    kv = torch.stack((k, v))
    dkv_hop = None
    for step in range(sharding.world_size):
        last = step == sharding.world_size - 1
        kv_hop = None if last else _Exchange(kv, sharding, _TAG_KV)
        source = (sharding.rank - step) % sharding.world_size
        calls = plan(q_runs, sharding.runs(source, shard_len), sharding.window)
        dkv = torch.zeros(kv.shape, device=q.device, dtype=torch.float32)  # (2, B, N, H_k, D)
        backward_block(dout, q, kv, out, lse, calls, options, dq, dkv)
        if dkv_hop is not None:  # what the ranks before this one added to block `source`
            dkv += dkv_hop.wait()
        if sharding.world_size > 1:  # on to the next rank; after the last step, to the owner
            dkv_hop = _Exchange(dkv, sharding, _TAG_DKV)
        if kv_hop is not None:
            kv = kv_hop.wait()
    if dkv_hop is not None:
        dkv = dkv_hop.wait()
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)


class _RingFlashAttnFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, sharding: Sharding, exchange: str):
        attend = allgather.allgather_forward if exchange == "allgather" else ring_forward
        out, lse = attend(q, k, v, sharding)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.sharding, ctx.exchange = sharding, exchange
        ctx.mark_non_differentiable(lse)
        return out, lse

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        grads = (allgather.allgather_backward if ctx.exchange == "allgather" else ring_backward)
        dq, dk, dv = grads(dout, q, k, v, out, lse, ctx.sharding)
        return dq, dk, dv, None, None


# ---------------------------------------------------------------------------------------------
# Validation


def choose_kv_exchange(k: torch.Tensor, world_size: int) -> str:
    """What kv_exchange="auto" picks: "allgather" when this rank's K and V shard together hold
    at most ALLGATHER_MAX_SHARD_BYTES (and there is more than one rank), else "ring"."""
    shard_bytes = 2 * k.numel() * k.element_size()
    return "allgather" if world_size > 1 and shard_bytes <= ALLGATHER_MAX_SHARD_BYTES else "ring"


def make_sharding(group, layout: str, window: tuple[int, int],
                  softmax_scale: float | None) -> Sharding:
    """This rank's Sharding in `group` (initialized, this rank a member): its ring neighbours'
    global ranks, the layout, the global window (causal as right = 0) and the scale."""
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    return Sharding(group=group, rank=rank, world_size=world_size,
                    next_rank=dist.get_global_rank(group, (rank + 1) % world_size),
                    prev_rank=dist.get_global_rank(group, (rank - 1) % world_size),
                    layout=layout, window=window, softmax_scale=softmax_scale)


def _group_of(group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("ring_flash_attn_func needs torch.distributed: call "
                           "torch.distributed.init_process_group on every rank first")
    group = dist.group.WORLD if group is None else group
    if not isinstance(group, dist.ProcessGroup):
        raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got "
                        f"{type(group).__name__}")
    if dist.get_rank(group) < 0:
        raise ValueError("this rank is not a member of group; every rank of the group calls "
                         "ring_flash_attn_func, and only they")
    return group


_AGREED: set = set()  # call signatures every rank of a group has been seen to agree on


def _check_ranks_agree(group, q: torch.Tensor, signature: tuple) -> None:
    """Every rank must call with the same shapes, dtype and arguments, or the exchanges would
    hang or mix up blocks. Checked once per group and signature: one small all_gather and a host
    synchronization, then remembered."""
    world_size = dist.get_world_size(group)
    key = (id(group), world_size, signature)
    if world_size == 1 or key in _AGREED:
        return
    where = q.device if "nccl" in dist.get_backend(group) else torch.device("cpu")
    mine = torch.tensor(signature, dtype=torch.float64, device=where)
    every = [torch.empty_like(mine) for _ in range(world_size)]
    dist.all_gather(every, mine, group)
    names = ("batch", "seqlen", "nheads", "nheads_k", "headdim", "dtype (0 float16, 1 bfloat16, "
             "2 float32)", "causal", "window left", "window right", f"layout (index in {LAYOUTS})",
             f"kv_exchange (index in {KV_EXCHANGES})", "softmax_scale")
    for rank, theirs in enumerate(every):
        for name, a, b in zip(names, signature, theirs.tolist()):
            if a != b:
                raise ValueError(
                    f"ranks disagree on {name}: {a} on rank {dist.get_rank(group)}, {b} on rank "
                    f"{rank}; every rank must pass shards of the same shape and dtype (seqlen / "
                    f"world_size tokens each) and the same causal, window_size, layout, "
                    f"kv_exchange and softmax_scale")
    _AGREED.add(key)


_DTYPE_CODES = {torch.float16: 0, torch.bfloat16: 1, torch.float32: 2}


def ring_flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    group: dist.ProcessGroup | None = None,
    causal: bool = False,
    softmax_scale: float | None = None,
    window_size: tuple[int, int] = (-1, -1),
    deterministic: bool = False,
    *,
    return_lse: bool = False,
    layout: str | None = None,
    kv_exchange: str = "auto",
):
    """Exact attention over one sequence sharded across the ranks of `group` (context
    parallelism): each rank passes its shard and gets its shard of flash_attn_func's result on
    the whole sequence. Every rank of the group calls it, with shards of the same shape.

    Arguments:
        q: (batch, seqlen / world_size, nheads, headdim), this rank's queries; float16, bfloat16
            or float32, on the device the group's backend serves (CUDA for NCCL, the CPU for
            gloo, where the kernels run through the Triton interpreter).
        k, v: (batch, seqlen / world_size, nheads_k, headdim), this rank's keys and values, the
            same tokens as q; nheads % nheads_k == 0 (grouped-query attention).
        group: the process group whose ranks share the sequence; default the whole world.
        causal: causal mask over the whole sequence (token i sees tokens j <= i).
        softmax_scale: scaling of q kᵀ before the softmax. Default 1 / sqrt(headdim).
        window_size: (left, right) sliding window over the whole sequence: token i sees tokens
            i - left .. i + right; -1 leaves that side unlimited. With causal=True, right is 0.
            Blocks the window leaves empty are skipped (by the ring's plan and by the kernels).
        deterministic: accepted for compatibility; both exchanges sum in a fixed order, so
            repeated backward passes are bitwise equal.
        return_lse: also return the log-sum-exp of this rank's rows.
        layout: where each rank's tokens lie in the sequence (flashtile.distributed.
            shard_sequence cuts a whole sequence this way):
            "contiguous": rank r holds tokens r·n .. (r + 1)·n - 1, n = seqlen / world_size;
            "zigzag": the sequence in 2·world_size chunks, rank r holding chunks r and
            2·world_size - 1 - r, so that under a causal mask every rank does the same work;
            the sequence length must be divisible by 2·world_size.
            Default: "zigzag" when causal, else "contiguous".
        kv_exchange: "ring" (K/V blocks passed around the ring, overlapped with the kernels),
            "allgather" (K/V gathered once: for short shards), or "auto" (choose_kv_exchange:
            all-gather when one rank's K and V are at most ALLGATHER_MAX_SHARD_BYTES).

    Returns:
        out: (batch, seqlen / world_size, nheads, headdim), the dtype of q: this rank's rows of
            attention over the whole sequence.
        lse (with return_lse=True): (batch, nheads, seqlen / world_size) float32, natural log,
            as flash_attn_func's.
    """
    _check_tensors(("q", "k", "v"), (q, k, v), 4, "(batch, seqlen, nheads, headdim)")
    _check_qkv(q, k, v)
    if k.shape[1] != q.shape[1]:
        raise ValueError(f"k has seqlen {k.shape[1]} but q has {q.shape[1]}: each rank holds "
                         "the queries, keys and values of the same tokens of one sequence")
    group = _group_of(group)
    world_size = dist.get_world_size(group)
    if dist.get_backend(group) == "nccl" and q.device.type != "cuda":
        raise ValueError(f"group runs on NCCL, which needs CUDA tensors; q is on {q.device}")
    layout = ("zigzag" if causal else "contiguous") if layout is None else layout
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS} or None, got {layout!r}")
    if layout == "zigzag" and q.shape[1] % 2 != 0:
        raise ValueError(
            f"layout='zigzag' cuts the sequence into 2 · world_size = {2 * world_size} chunks, "
            f"two per rank: each rank's seqlen must be even, got {q.shape[1]} (a sequence of "
            f"{q.shape[1] * world_size} tokens is not divisible by {2 * world_size})")
    if kv_exchange not in KV_EXCHANGES:
        raise ValueError(f"kv_exchange must be one of {KV_EXCHANGES}, got {kv_exchange!r}")
    left, right = _window(window_size)
    window = (left, 0 if causal else right)
    scale = _softmax_scale(softmax_scale, q.shape[3])
    exchange = choose_kv_exchange(k, world_size) if kv_exchange == "auto" else kv_exchange
    batch, shard_len, nheads, head_dim = q.shape
    _check_ranks_agree(group, q, (batch, shard_len, nheads, k.shape[2], head_dim,
                                  _DTYPE_CODES[q.dtype], int(bool(causal)), *window,
                                  LAYOUTS.index(layout), KV_EXCHANGES.index(exchange), scale))
    sharding = make_sharding(group, layout, window, scale)
    out, lse = _RingFlashAttnFunction.apply(q, k, v, sharding, exchange)
    return (out, lse) if return_lse else out
