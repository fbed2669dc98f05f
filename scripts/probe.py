"""Quick speed probe on a GPU: flashtile beside SDPA's flash and cuDNN backends, same run.

Usage: python scripts/probe.py [D,causal,N ...]   (default: a few anchor-grid shapes)
Prints TFLOP/s (forward; backward = out.backward alone) and flashtile's ratio to each.
"""

import sys

import torch
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

import flashtile


def bench(fn):
    return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")


def providers(q, k, v, causal):
    def ft():
        return flashtile.flash_attn_func(q.transpose(1, 2), k.transpose(1, 2),
                                         v.transpose(1, 2), causal=causal).transpose(1, 2)

    def forced(be):
        def f():
            with sdpa_kernel([be]):
                return sdpa(q, k, v, is_causal=causal)
        return f
    return {"flashtile": ft, "flash": forced(SDPBackend.FLASH_ATTENTION),
            "cudnn": forced(SDPBackend.CUDNN_ATTENTION)}


shapes = [tuple(int(x) for x in s.split(",")) for s in sys.argv[1:]] or [
    (64, 0, 4096), (64, 1, 4096), (128, 0, 1024), (128, 0, 4096), (128, 1, 4096),
    (128, 0, 16384), (128, 1, 16384)]
print(f"{'D':>4} {'c':>2} {'N':>6} | " + " | ".join(
    f"{p:>9} f/b" for p in ("flashtile", "flash", "cudnn")) + " | ratio f/b vs flash, cudnn")
for D, causal, N in shapes:
    B, H = 16384 // N, 2048 // D
    q, k, v = (torch.randn(B, H, N, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    flops = 4 * B * H * N * N * D * (0.5 if causal else 1)
    res = {}
    for name, fn in providers(q, k, v, bool(causal)).items():
        o = fn()
        do = torch.randn_like(o)
        tf = bench(fn)
        tb = bench(lambda o=o, do=do: o.backward(do, retain_graph=True))
        res[name] = (flops / tf / 1e9, 2.5 * flops / tb / 1e9)
        q.grad = k.grad = v.grad = None
    ft = res["flashtile"]
    print(f"{D:>4} {causal:>2} {N:>6} | " + " | ".join(
        f"{a:6.0f}/{b:4.0f}" for a, b in res.values()) + " | " + "  ".join(
        f"{ft[0] / res[p][0]:.2f}/{ft[1] / res[p][1]:.2f}" for p in ("flash", "cudnn")), flush=True)

from flashtile.kernels import backward, forward  # noqa: E402

for tunable in (forward._attn_fwd_tunable, backward._attn_bwd_dkdv_tunable,
                 backward._attn_bwd_dq_tunable):
    for key, cfg in tunable.tuned.cache.items():
        print(f"tuned {tunable.name} {key[:5]}: {cfg}")
