"""Decoding one token against a full KV cache: the time for each forced split count, and the
torch profiler's split of the automatic choice into the forward kernel and the combine.

bf16, GQA 32:4, D 128, a contiguous cache; times are CUDA-graph replays (do_bench flushes L2
before each), as `flashtile bench --decode` takes them; % of the copy bandwidth uses
--copy-gbps (the device copy bandwidth that bench measured, 2,990 GB/s on the H100).
docs/performance.md (decode B 1 × 16k) quotes it.

Usage: python scripts/decode_splits.py [--cases 1x16384,1x131072,8x16384] [--copy-gbps 2990]
                                       [--paged] [--splits 0,4,8,16,32,64,128]
(--paged: pages of 256 tokens under a shuffled block_table, as the bench's paged provider)
"""

from __future__ import annotations

import argparse

import torch
from torch.profiler import ProfilerActivity, profile
from triton.testing import do_bench

import flashtile
from flashtile.bench.decode import shuffled_block_table

HEADS, KV_HEADS, HEAD_DIM = 32, 4, 128
SPLITS = "0,4,8,16,32,64,128"  # 0: the automatic choice
PAGE = 256


def decode_call(batch: int, cache_len: int, num_splits: int, paged: bool = False):
    q = torch.randn(batch, 1, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
    seqlens = torch.full((batch,), cache_len, dtype=torch.int32, device="cuda")
    block_table = None
    if paged:
        pages = -(-cache_len // PAGE)
        block_table = shuffled_block_table(batch, pages, device="cuda")
        shape = (batch * pages, PAGE, KV_HEADS, HEAD_DIM)
    else:
        shape = (batch, cache_len, KV_HEADS, HEAD_DIM)
    k_cache, v_cache = (torch.randn(shape, device="cuda", dtype=torch.bfloat16)
                        for _ in range(2))
    return lambda: flashtile.flash_attn_with_kvcache(q, k_cache, v_cache,
                                                     cache_seqlens=seqlens,
                                                     block_table=block_table,
                                                     num_splits=num_splits)


def graph_time_us(fn) -> float:
    fn()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    return do_bench(graph.replay, warmup=50, rep=300) * 1e3


def kernel_times_us(fn, calls: int = 20) -> dict[str, float]:
    """Mean GPU time per call of each kernel, L2 flushed before every call."""
    flush = torch.empty(256 * 2**20, dtype=torch.int8, device="cuda")
    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(calls):
            flush.zero_()
            fn()
        torch.cuda.synchronize()
    return {e.key: e.device_time_total / calls for e in prof.key_averages()
            if e.key.startswith(("_attn_fwd", "_combine_splits"))}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="1x16384,1x131072,8x16384",
                        help="batch x cache length, comma separated")
    parser.add_argument("--copy-gbps", type=float, default=2990.0)
    parser.add_argument("--paged", action="store_true")
    parser.add_argument("--splits", default=SPLITS, help="split counts, 0 for automatic")
    args = parser.parse_args(argv)
    for case in args.cases.split(","):
        batch, cache_len = (int(x) for x in case.split("x"))
        nbytes = batch * cache_len * KV_HEADS * HEAD_DIM * 2 * 2  # K and V, bf16
        for splits in (int(x) for x in args.splits.split(",")):
            if batch * splits > 65535 or (splits and cache_len // splits < 64):
                continue
            us = graph_time_us(decode_call(batch, cache_len, splits, args.paged))
            gbps = nbytes / us / 1e3
            kind = " paged" if args.paged else ""
            print(f"B {batch} cache {cache_len}{kind} splits {splits or 'auto':>4}: {us:7.1f} us "
                  f"{gbps:6.0f} GB/s {gbps / args.copy_gbps:4.0%} of copy", flush=True)
        kernels = kernel_times_us(decode_call(batch, cache_len, 0, args.paged))
        print(f"B {batch} cache {cache_len} automatic, per kernel (eager, profiler): "
              + ", ".join(f"{name} {us:.1f} us" for name, us in kernels.items()), flush=True)
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
