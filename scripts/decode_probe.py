"""Where a decoding step's time goes: the whole flash_attn_with_kvcache call against the kernel
launch alone, host time per call, and a profile of the host side.

Usage: python scripts/decode_probe.py [batch] [cache_len]   (default 1 16384; GQA 32:4, D 128)
"""

import cProfile
import pstats
import sys
import time

import torch
import triton

import flashtile
from flashtile.interface import _auto_splits, _decode_programs, _options
from flashtile.kernels.forward import attention_forward

B, L = (int(x) for x in (sys.argv[1:] or ["1", "16384"]))
H, HK, D = 32, 4, 128
q = torch.randn(B, 1, H, D, device="cuda", dtype=torch.bfloat16)
k_cache, v_cache = (torch.randn(B, L, HK, D, device="cuda", dtype=torch.bfloat16)
                    for _ in range(2))
seqlens = torch.full((B,), L, dtype=torch.int32, device="cuda")


def call():
    return flashtile.flash_attn_with_kvcache(q, k_cache, v_cache, cache_seqlens=seqlens)


batch_idx = torch.arange(B, dtype=torch.int32, device="cuda")
opts = _options(B, H, D, q.device, softmax_scale=None, causal=False, window_size=(-1, -1),
                softcap=0.0, alibi_slopes=None, kvcache=(seqlens, batch_idx, None, 0))
splits = _auto_splits(_decode_programs(B, H, HK, 1), L, q.device)


def kernel_only():
    return attention_forward(q, k_cache, v_cache, opts, num_splits=splits)


call()
kernel_only()
torch.cuda.synchronize()
for name, fn in (("whole call", call), ("attention_forward", kernel_only)):
    ms = triton.testing.do_bench(fn, warmup=25, rep=200)
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(200):
        fn()
    torch.cuda.synchronize()
    host = (time.perf_counter() - t0) / 200 * 1e6
    print(f"B={B} L={L} splits={splits} {name}: do_bench {ms * 1e3:.1f} us, "
          f"back-to-back {host:.1f} us per call", flush=True)
prof = cProfile.Profile()
prof.enable()
for _ in range(200):
    call()
prof.disable()
torch.cuda.synchronize()
pstats.Stats(prof).sort_stats("tottime").print_stats(14)
