"""Context parallelism: attention over a sequence sharded across the ranks of a
torch.distributed process group (NCCL on GPUs, gloo on the CPU), with flashtile's kernels for
every block. See docs/distributed.md.

    import flashtile.distributed as fd
    q_r, k_r, v_r = (fd.shard_sequence(t, world_size, rank, "zigzag") for t in (q, k, v))
    out_r = fd.ring_flash_attn_func(q_r, k_r, v_r, causal=True)   # this rank's rows
"""

from flashtile.distributed.blocks import LAYOUTS, shard_sequence, unshard_sequence
from flashtile.distributed.ring import (
    ALLGATHER_MAX_SHARD_BYTES,
    KV_EXCHANGES,
    choose_kv_exchange,
    ring_flash_attn_func,
)

__all__ = ["ALLGATHER_MAX_SHARD_BYTES", "KV_EXCHANGES", "LAYOUTS", "choose_kv_exchange",
           "ring_flash_attn_func", "shard_sequence", "unshard_sequence"]
