"""The all-gather exchange: every rank gathers the whole K and V, in sequence order, and attends
its queries to them in one kernel call per query run (one for the contiguous layout, two for
zig-zag: each chunk's diagonal is where the chunk lies). The backward gathers K and V again
(rather than keeping W shards' worth between the passes), runs the same calls, and
reduce-scatters dK and dV, summed in float32, to their owners.

Same bytes as the ring, sent in one collective instead of W - 1 exchanges, but before the kernel
rather than beside it; and the gathered K and V take W times a shard's memory. For short shards
(ring.ALLGATHER_MAX_SHARD_BYTES).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from flashtile.distributed.blocks import (
    Segment,
    Sharding,
    backward_block,
    forward_block,
    plan,
    shard_sequence,
    unshard_sequence,
)


def _gather_kv(k: torch.Tensor, v: torch.Tensor, sharding: Sharding) -> torch.Tensor:
    """(2, B, N, H_k, D): K then V of the whole sequence, in sequence order."""
    kv = torch.stack((k, v))  # (2, B, N / W, H_k, D)
    if sharding.world_size == 1:  # the shard is the sequence, in order under both layouts
        return kv
    shards = [torch.empty_like(kv) for _ in range(sharding.world_size)]
    dist.all_gather(shards, kv, group=sharding.group)
    return unshard_sequence(shards, sharding.layout, dim=2)


def _calls(q: torch.Tensor, sharding: Sharding):
    seqlen = q.shape[1] * sharding.world_size
    return plan(sharding.runs(sharding.rank, q.shape[1]), (Segment(0, 0, seqlen),),
                sharding.window)


def allgather_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      sharding: Sharding) -> tuple[torch.Tensor, torch.Tensor]:
    """out (B, N, H, D) in q's dtype, lse (B, H, N) float32, as ring.ring_forward."""
    batch, shard_len, nheads, head_dim = q.shape
    out = torch.zeros(batch, shard_len, nheads, head_dim, device=q.device, dtype=torch.float32)
    lse = torch.full((batch, nheads, shard_len), float("-inf"), device=q.device)
    if q.numel() == 0:
        return out.to(q.dtype), lse
    kv = _gather_kv(k, v, sharding)
    forward_block(q, kv, _calls(q, sharding), sharding.options_for(q), out, lse)
    return out.to(q.dtype), lse


def allgather_backward(dout, q, k, v, out, lse, sharding: Sharding):
    """dq, dk, dv of this rank's shard."""
    if q.numel() == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    kv = _gather_kv(k, v, sharding)
    dq = torch.zeros(q.shape, device=q.device, dtype=torch.float32)
    dkv_seq = torch.zeros(kv.shape, device=q.device, dtype=torch.float32)  # (2, B, N, H_k, D)
    backward_block(dout, q, kv, out, lse, _calls(q, sharding), sharding.options_for(q), dq,
                   dkv_seq)
    dkv = dkv_seq
    if sharding.world_size > 1:
        parts = [shard_sequence(dkv_seq, sharding.world_size, rank, sharding.layout, dim=2)
                 for rank in range(sharding.world_size)]
        dkv = torch.empty_like(parts[sharding.rank])
        dist.reduce_scatter(dkv, parts, group=sharding.group)
    return dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype)
