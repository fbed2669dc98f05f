"""The driver that scripts/sanitize.py runs under compute-sanitizer: forward and backward (forward
only for the KV cache) of every feature flag, at ragged shapes, one case after another.

Usage: python scripts/sanitize_cases.py [--list] [CASE ...]     (default: every case)

Each case prints "@@ case NAME start" and, after torch.cuda.synchronize() (so that the
sanitizer's reports of its kernels come before the next marker), "@@ case NAME done"; sanitize.py
attributes reports to cases by these markers. Lengths are not multiples of any block size, and
seqlen_q != seqlen_k both ways, so every kernel runs its masked edge tiles. It also runs on the
CPU, through the Triton interpreter (without a sanitizer), as a quick check of the cases (the
gluon_* cases there run the Triton kernels, slowly).
"""

from __future__ import annotations

import argparse
import sys

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl

import flashtile
from flashtile import masks
from flashtile.kernels import configs
from flashtile.testing import device

DEV = device()
HALF = torch.bfloat16 if DEV.type == "cuda" else torch.float16  # interpreter: no bf16 dot


def _qkv(batch, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype=HALF):
    q = torch.randn(batch, seqlen_q, nheads, head_dim, device=DEV, dtype=dtype,
                    requires_grad=True)
    k, v = (torch.randn(batch, seqlen_k, nheads_k, head_dim, device=DEV, dtype=dtype,
                        requires_grad=True) for _ in range(2))
    return q, k, v


def _backward(out, inputs):
    torch.autograd.grad(out, inputs, torch.randn_like(out))


def dense(head_dim=64, dtype=HALF, seqlen_q=77, seqlen_k=131, nheads=4, nheads_k=2, **kw):
    def run():
        q, k, v = _qkv(2, seqlen_q, seqlen_k, nheads, nheads_k, head_dim, dtype)
        opts = dict(kw)
        if opts.pop("alibi", False):
            opts["alibi_slopes"] = torch.rand(2, nheads, device=DEV) * 0.3
        out = flashtile.flash_attn_func(q, k, v, **opts)
        _backward(out, (q, k, v))
    return run


def probs():
    q, k, v = _qkv(1, 45, 70, 2, 1, 32)
    flashtile.flash_attn_func(q, k, v, causal=True, dropout_p=0.2, return_attn_probs=True)


def document_mask():
    seqlen = 150
    ids = torch.repeat_interleave(torch.arange(4, device=DEV),
                                  torch.tensor([37, 1, 70, 42], device=DEV))
    q, k, v = _qkv(2, seqlen, seqlen, 4, 2, 64)
    out = flashtile.flash_attn_func(q, k, v, causal=True, mask_mod=masks.document(ids))
    _backward(out, (q, k, v))


def varlen(dropout_p=0.0):
    def run():
        lens_q, lens_k = [77, 0, 1, 130, 5], [131, 3, 0, 64, 5]
        cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32,
                                   device=DEV) for n in (lens_q, lens_k))
        q = torch.randn(sum(lens_q), 4, 64, device=DEV, dtype=HALF, requires_grad=True)
        k, v = (torch.randn(sum(lens_k), 2, 64, device=DEV, dtype=HALF, requires_grad=True)
                for _ in range(2))
        out = flashtile.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                               causal=True, window_size=(40, -1),
                                               dropout_p=dropout_p)
        _backward(out, (q, k, v))
    return run


def gluon_varlen():
    """A packed batch through the Gluon kernels' VARLEN variants on Hopper (the gluon_varlen
    feature on for this case; one cu_seqlens for queries and keys), long enough for every
    Gluon pass at D 128."""
    lengths = [700, 0, 130, 1, 4200]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32,
                      device=DEV)
    q = torch.randn(sum(lengths), 4, 128, device=DEV, dtype=HALF, requires_grad=True)
    k, v = (torch.randn(sum(lengths), 2, 128, device=DEV, dtype=HALF, requires_grad=True)
            for _ in range(2))
    was, configs.features["gluon_varlen"] = configs.features["gluon_varlen"], True
    try:
        out = flashtile.flash_attn_varlen_func(q, k, v, cu, cu, max(lengths), max(lengths),
                                               causal=True)
        _backward(out, (q, k, v))
    finally:
        configs.features["gluon_varlen"] = was


def kvcache(paged: bool, num_splits: int, page: int = 32):
    """Pages of 32 rows take the gather path (the fixed config's key block is 64); pages of 128
    the TMA path (a block lies in one page), switched on here (configs.features)."""
    def run():
        configs.features["tma_paged"] = page % 64 == 0
        batch, nheads, nheads_k, head_dim = 3, 8, 2, 128
        if paged:
            k_cache, v_cache = (torch.randn(13, page, nheads_k, head_dim, device=DEV,
                                            dtype=HALF) for _ in range(2))
            table = torch.randperm(13, device=DEV)[:12].view(batch, 4).to(torch.int32)
            extra = dict(block_table=table)
        else:
            k_cache, v_cache = (torch.randn(4, 128, nheads_k, head_dim, device=DEV, dtype=HALF)
                                for _ in range(2))
            extra = dict(cache_batch_idx=torch.tensor([3, 0, 1], dtype=torch.int32,
                                                      device=DEV))
        q = torch.randn(batch, 3, nheads, head_dim, device=DEV, dtype=HALF)
        k_new, v_new = (torch.randn(batch, 2, nheads_k, head_dim, device=DEV, dtype=HALF)
                        for _ in range(2))
        lengths = torch.tensor([0, 31, 117], dtype=torch.int32, device=DEV)
        flashtile.flash_attn_with_kvcache(q, k_cache, v_cache, k_new, v_new,
                                          cache_seqlens=lengths, causal=True,
                                          num_splits=num_splits, **extra)
    return run


def sdpa():
    query, key, value = (torch.randn(2, 4, n, 64, device=DEV, dtype=HALF, requires_grad=True)
                         for n in (99, 61, 61))
    out = flashtile.scaled_dot_product_attention(query, key, value, is_causal=True)
    _backward(out, (query, key, value))


@gluon.jit
def _ws_row(Out, row: gl.constexpr, N: gl.constexpr, WARPS: gl.constexpr,
            BARRIER: gl.constexpr):
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [WARPS], [0])
    offs = gl.arange(0, N, layout=layout)
    if BARRIER:  # a barrier of this partition's warps alone (bar.sync ID, 32·WARPS)
        gl.thread_barrier()
    gl.store(Out + (gl.program_id(0) * 3 + row) * N + offs, offs.to(gl.float32) + row)


@gluon.jit
def _ws_only(Out, N: gl.constexpr, BARRIER: gl.constexpr):
    gl.warp_specialize([(_ws_row, (Out, 0, N, 4, BARRIER)), (_ws_row, (Out, 1, N, 4, BARRIER)),
                        (_ws_row, (Out, 2, N, 1, False))], [4, 1], [240, 24])


def warp_specialize_only(barrier: bool):
    """A control for racecheck: gl.warp_specialize in the Gluon kernels' shape (a default
    partition of 4 warps, workers of 4 and 1, registers [240, 24]) with partitions that touch
    no shared memory of their own, each writing its own global row; with `barrier`, the two
    4-warp partitions also pass a barrier of their own warps, as the Gluon kernels' compute
    partitions do (bar.sync 0 and 2 of 128 threads beside the CTA-wide bar.sync 1 of the
    lowering). A hazard reported here is the lowering's (or racecheck's), not the library's.
    At `242b1a7` racecheck reported the plain case clean. Hopper only; elsewhere it says so."""
    def run():
        if DEV.type != "cuda" or torch.cuda.get_device_capability(DEV)[0] != 9:
            print("warp_specialize_only: needs a Hopper GPU, skipped", flush=True)
            return
        out = torch.full((8, 3, 128), float("nan"), device=DEV)
        _ws_only[(8,)](out, 128, barrier, num_warps=4)
        expected = torch.arange(128, device=DEV).float() + torch.arange(3, device=DEV)[:, None]
        if not torch.equal(out, expected.expand(8, -1, -1)):
            raise RuntimeError("warp_specialize_only: a partition's row is wrong")
    return run


CASES = {
    "plain": dense(),
    "causal": dense(causal=True),
    "causal_q_longer": dense(causal=True, seqlen_q=131, seqlen_k=77),
    "window": dense(window_size=(33, 7)),
    "window_causal": dense(window_size=(20, -1), causal=True, seqlen_q=131, seqlen_k=77),
    "softcap_alibi": dense(softcap=20.0, alibi=True, causal=True),
    "dropout": dense(dropout_p=0.2, causal=True),
    "dropout_probs": probs,
    "mqa": dense(nheads=6, nheads_k=1, causal=True),
    "head_dim_40": dense(head_dim=40, causal=True),
    "head_dim_128": dense(head_dim=128, causal=True),
    "head_dim_256": dense(head_dim=256, causal=True, seqlen_q=45, seqlen_k=70),
    "float16": dense(dtype=torch.float16, causal=True),
    "float32": dense(dtype=torch.float32, causal=True),
    "document_mask": document_mask,
    "varlen_ragged_empty": varlen(),
    "varlen_dropout": varlen(dropout_p=0.2),
    "kvcache_paged_split": kvcache(paged=True, num_splits=3),
    "kvcache_paged": kvcache(paged=True, num_splits=1),
    "kvcache_paged_tma_split": kvcache(paged=True, num_splits=3, page=128),
    "kvcache_contiguous_split": kvcache(paged=False, num_splits=2),
    "sdpa": sdpa,
    # long enough for the Gluon kernels on Hopper (hopper.MIN_SEQLEN_K,
    # hopper_backward.MIN_SEQLEN_K): the warp-specialized forward and both Gluon backward passes
    # at D 128, the pipelined forward and the Gluon dK/dV at D 64
    "gluon_d128_causal": dense(head_dim=128, causal=True, seqlen_q=1100, seqlen_k=4200),
    "gluon_d128": dense(head_dim=128, seqlen_q=1100, seqlen_k=4200),
    "gluon_d64": dense(head_dim=64, seqlen_q=300, seqlen_k=8300),
    "gluon_varlen": gluon_varlen,
    "warp_specialize_only": warp_specialize_only(barrier=False),
    "warp_specialize_barriers": warp_specialize_only(barrier=True),
}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("cases", nargs="*", help="cases to run (default: all)")
    parser.add_argument("--list", action="store_true", help="print the case names and exit")
    args = parser.parse_args(argv)
    if args.list:
        print("\n".join(CASES))
        return 0
    unknown = [c for c in args.cases if c not in CASES]
    if unknown:
        parser.error(f"unknown cases {unknown}; --list shows them")
    torch.manual_seed(0)
    for name in args.cases or CASES:
        print(f"@@ case {name} start", flush=True)
        CASES[name]()
        if DEV.type == "cuda":
            torch.cuda.synchronize()
        print(f"@@ case {name} done", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
