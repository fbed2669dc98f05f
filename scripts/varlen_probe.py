"""Where the varlen shortfall is (docs/performance.md, v5 outcome): the kernel or the schedule.

Times, forward and forward+backward, bf16, 16 heads, D 128 (`flashtile bench --varlen`'s batch):
  1. one sequence of the batch's longest length through flash_attn_varlen_func and through
     flash_attn_func: the same work, so a gap is the varlen kernel's own cost per step;
  2. the batch packed in its drawn order and sorted longest first: the longest sequences' blocks
     then start first (grid axis 2 is the sequence), so a gap is the schedule's tail;
  3. the batch as padded dense flash_attn_func, the yardstick of the target, with random values
     in the padding and with zeros there (as the bench pads): the same work, so a gap is the
     data's own effect on the GPU's speed; and zero-padded in the bench's (B, H, N, D) layout
     (its padded fwd + bwd read 35.9 ms against this probe's 27.4 in session 23's runs);
  4. the longest sequence followed by empty ones, one per other sequence of the batch: the same
     work as in 1 with the batch's grid, whose programs past their sequence's end exit at once,
     so a gap is the cost of those idle programs;
  5. the batch's tokens as equal sequences of 4,096, varlen and dense: no padding anywhere, so a
     gap is varlen's own cost at a fixed length.
Each row reports ms and TFLOP/s over the real (query, key) pairs. With --configs, also the
forward of the one longest sequence, varlen against dense, with each of the first forward
candidates forced in both (and the first with TMA off): equal configs, so a gap is the varlen
path's own (docs/performance.md v5.6). Needs a CUDA GPU.

Packed rows run with the gluon_varlen feature off (the Triton kernels). With --gluon-varlen,
the first two rows again with it on (kernels/hopper.py and hopper_backward.py's VARLEN variants,
docs/performance.md v7), so that varlen and padded dense both run the Gluon kernels.

Usage: python scripts/varlen_probe.py [--causal] [--configs] [--gluon-varlen]
"""

from __future__ import annotations

import argparse
import itertools

import torch
import triton

import flashtile
from flashtile.bench.varlen import HEAD_DIM, HEADS, draw_lengths
from flashtile.kernels import configs


def pairs(lengths, causal: bool) -> int:
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def timed(fn, backward: bool) -> float:
    """Median ms of fn() (with backward: fn() then its gradients)."""
    def step():
        out = fn()
        if backward:
            out.backward(grad)
    out = fn()
    grad = torch.randn_like(out) * getattr(fn, "keep", 1)
    return triton.testing.do_bench(step, warmup=50, rep=300)


def packed(lengths, causal: bool):
    total = sum(lengths)
    q, k, v = (torch.randn(total, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32, device="cuda")
    longest = max(lengths)
    return lambda: flashtile.flash_attn_varlen_func(q, k, v, cu, cu, longest, longest,
                                                    causal=causal)


def dense(batch: int, seqlen: int, causal: bool, lengths=None, heads_first: bool = False):
    """flash_attn_func on random (batch, seqlen) inputs; with `lengths`, entry b's rows past
    lengths[b] are zeros in q, k, v and the output gradient, as in `flashtile bench --varlen`'s
    padded batch. heads_first: the tensors laid out (batch, heads, seqlen, D), as the bench's
    padded batch is (SDPA's layout), and passed as (batch, seqlen, heads, D) views."""
    shape = (batch, HEADS, seqlen, HEAD_DIM) if heads_first else (batch, seqlen, HEADS, HEAD_DIM)
    q, k, v = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    keep = None
    if lengths is not None:
        rows = torch.arange(seqlen, device="cuda")
        keep = (rows[None, :] < torch.tensor(lengths, device="cuda")[:, None])[..., None, None]
        if heads_first:
            keep = keep.transpose(1, 2)
        q, k, v = (t * keep for t in (q, k, v))
    q, k, v = (t.requires_grad_() for t in (q, k, v))

    def fn():
        if heads_first:
            return flashtile.flash_attn_func(*(t.transpose(1, 2) for t in (q, k, v)),
                                             causal=causal).transpose(1, 2)
        return flashtile.flash_attn_func(q, k, v, causal=causal)
    fn.keep = 1 if keep is None else keep
    return fn


def forced_configs(seqlen: int, causal: bool, count: int = 3) -> None:
    """The forward of one sequence, varlen against dense, each with the same forced config."""
    q, k, v = (torch.randn(1, seqlen, HEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16)
               for _ in range(3))
    cu = torch.tensor([0, seqlen], dtype=torch.int32, device="cuda")
    runs = {"dense": lambda: flashtile.flash_attn_func(q, k, v, causal=causal),
            "varlen": lambda: flashtile.flash_attn_varlen_func(
                q[0], k[0], v[0], cu, cu, seqlen, seqlen, causal=causal).unsqueeze(0)}
    tma = configs.features["tma_forward"]
    first = configs.candidates("fwd", HEAD_DIM, "tf32")[:count]
    try:
        for use_tma, config in [(True, c) for c in first] + [(False, first[0])]:
            configs.features["tma_forward"] = use_tma
            configs.set_override("fwd", configs.KernelConfig(*config))
            us = {name: triton.testing.do_bench(fn, warmup=25, rep=150) * 1e3
                  for name, fn in runs.items()}
            same = torch.equal(runs["dense"](), runs["varlen"]())
            print(f"config {config} tma={use_tma:d}: dense {us['dense']:7.1f} us, varlen "
                  f"{us['varlen']:7.1f} us, varlen / dense {us['varlen'] / us['dense']:.2f}, "
                  f"outputs bitwise equal: {same}", flush=True)
    finally:
        configs.features["tma_forward"] = tma
        configs.set_override("fwd", None)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--configs", action="store_true",
                        help="also time varlen against dense with the same forced configs")
    parser.add_argument("--gluon-varlen", action="store_true",
                        help="also time the packed rows with the gluon_varlen feature on")
    args = parser.parse_args(argv)
    lengths = draw_lengths()
    longest = max(lengths)
    rows = [
        ("one sequence, varlen", packed([longest], args.causal), [longest]),
        ("one sequence, dense", dense(1, longest, args.causal), [longest]),
        ("batch, drawn order", packed(lengths, args.causal), lengths),
        ("batch, longest first", packed(sorted(lengths, reverse=True), args.causal), lengths),
        ("batch, padded dense", dense(len(lengths), longest, args.causal), lengths),
        ("same, zero padding", dense(len(lengths), longest, args.causal, lengths), lengths),
        ("same, (B, H, N, D) layout", dense(len(lengths), longest, args.causal, lengths, True),
         lengths),
        ("longest + empty ones", packed([longest] + [0] * (len(lengths) - 1), args.causal),
         [longest]),
        ("equal 4096s, varlen", packed([4096] * (sum(lengths) // 4096), args.causal),
         [4096] * (sum(lengths) // 4096)),
        ("equal 4096s, dense", dense(sum(lengths) // 4096, 4096, args.causal),
         [4096] * (sum(lengths) // 4096)),
    ]
    if args.gluon_varlen:
        rows += [("one sequence, Gluon", packed([longest], args.causal), [longest], True),
                 ("batch, drawn, Gluon", packed(lengths, args.causal), lengths, True)]
    print(f"{len(lengths)} sequences of {min(lengths)}-{longest} tokens, {sum(lengths)} in all; "
          f"causal={args.causal}; TFLOP/s over the real pairs (bwd counts 2.5x the fwd)")
    print(f"{'case':<24} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>11} {'TFLOP/s':>8}")
    default = configs.features["gluon_varlen"]
    for name, fn, real, *gluon_varlen in rows:
        flops = 4 * HEADS * HEAD_DIM * pairs(real, args.causal)
        configs.features["gluon_varlen"] = bool(gluon_varlen)
        fwd, both = timed(fn, False), timed(fn, True)
        configs.features["gluon_varlen"] = default
        print(f"{name:<24} {fwd:8.3f} {flops / fwd / 1e9:8.0f} {both:11.3f} "
              f"{3.5 * flops / both / 1e9:8.0f}", flush=True)
        torch.cuda.empty_cache()
    if args.configs:
        forced_configs(longest, args.causal)


if __name__ == "__main__":
    main()
