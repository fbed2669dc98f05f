"""Determinism under memory pressure: 100 backward passes are bitwise equal while another process
(spawned here) holds most of the GPU's free memory and, with --busy, keeps the GPU computing.

Usage: python scripts/determinism.py [--passes 100] [--fill 0.9] [--busy] [--json PATH]

For each case the first backward pass runs alone; then the filler process allocates --fill of
the memory left free and, once it holds it, every further pass is compared with the first bit
for bit (dq, dk, dv), allocating its outputs under that pressure. Prints one line per case and
exits 1 on any difference. Cases: causal grouped-query bfloat16 (flash_attn_func), a ragged
packed batch with dropout (flash_attn_varlen_func, the same seed each pass), a document mask
(mask_mod), and causal grouped-query at a length where Hopper runs the Gluon kernels.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

import flashtile
from flashtile import masks

DEV = "cuda"


def causal_gqa():
    q = torch.randn(2, 2048, 16, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(2, 2048, 4, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    return (q, k, v), lambda q, k, v: flashtile.flash_attn_func(q, k, v, causal=True)


def varlen_dropout():
    lens_q, lens_k = [1000, 0, 1537, 3, 511], [777, 5, 1537, 0, 2048]
    cu_q, cu_k = (torch.tensor([0, *torch.tensor(n).cumsum(0).tolist()], dtype=torch.int32,
                               device=DEV) for n in (lens_q, lens_k))
    q = torch.randn(sum(lens_q), 8, 128, device=DEV, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(sum(lens_k), 2, 128, device=DEV, dtype=torch.float16,
                        requires_grad=True) for _ in range(2))

    def call(q, k, v):
        torch.manual_seed(1234)  # the same dropout mask every pass
        return flashtile.flash_attn_varlen_func(q, k, v, cu_q, cu_k, max(lens_q), max(lens_k),
                                                causal=True, dropout_p=0.1)
    return (q, k, v), call


def document_mask():
    ids = torch.repeat_interleave(torch.arange(5, device=DEV),
                                  torch.tensor([300, 1, 900, 555, 292], device=DEV))
    mask = masks.document(ids)
    q, k, v = (torch.randn(2, 2048, 8, 64, device=DEV, dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    return (q, k, v), lambda q, k, v: flashtile.flash_attn_func(q, k, v, causal=True,
                                                                mask_mod=mask)


def gluon_causal_gqa():
    """causal_gqa with 4,224 keys: on Hopper every pass runs a Gluon kernel (the forward of
    kernels/hopper.py, both passes of kernels/hopper_backward.py)."""
    q = torch.randn(1, 4224, 16, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
    k, v = (torch.randn(1, 4224, 4, 128, device=DEV, dtype=torch.bfloat16, requires_grad=True)
            for _ in range(2))
    return (q, k, v), lambda q, k, v: flashtile.flash_attn_func(q, k, v, causal=True)


CASES = {"causal_gqa": causal_gqa, "varlen_dropout": varlen_dropout,
         "document_mask": document_mask, "gluon_causal_gqa": gluon_causal_gqa}


def filler(fraction: float, busy: bool) -> None:
    """Child process: hold `fraction` of the free memory (in 256 MiB pieces), say "ready", and
    keep it (computing matmuls with --busy) until the parent closes stdin."""
    free, _ = torch.cuda.mem_get_info()
    piece = 256 << 20
    held = [torch.empty(piece, dtype=torch.uint8, device=DEV)
            for _ in range(int(fraction * free) // piece)]
    print(f"ready {len(held) * piece}", flush=True)
    if busy:
        import select

        a = torch.randn(4096, 4096, device=DEV, dtype=torch.bfloat16)
        while not select.select([sys.stdin], [], [], 0)[0]:
            a = (a @ a).clamp_(-1, 1)
    sys.stdin.read()


def start_filler(fraction: float, busy: bool) -> tuple[subprocess.Popen, int]:
    cmd = [sys.executable, __file__, "--as-filler", str(fraction)] + (["--busy"] if busy else [])
    proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    line = proc.stdout.readline().split()
    if not line or line[0] != "ready":
        proc.kill()
        raise RuntimeError("the filler process did not start")
    return proc, int(line[1])


def stop_filler(proc: subprocess.Popen) -> None:
    proc.stdin.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()


def run_case(name: str, passes: int, fraction: float, busy: bool) -> dict:
    torch.manual_seed(0)
    inputs, call = CASES[name]()
    dout = torch.randn_like(call(*inputs))

    def grads():
        return torch.autograd.grad(call(*inputs), inputs, dout)

    first = grads()
    torch.cuda.synchronize()
    proc, held = start_filler(fraction, busy)
    mismatches = []
    try:
        free_during = torch.cuda.mem_get_info()[0]
        for attempt in range(1, passes):
            for field, a, b in zip(("dq", "dk", "dv"), first, grads()):
                if not torch.equal(a, b):
                    diff = (a.float() - b.float()).abs().max().item()
                    mismatches.append(dict(attempt=attempt, field=field, max_abs_diff=diff))
        torch.cuda.synchronize()
    finally:
        stop_filler(proc)
    return dict(case=name, passes=passes, filler_gib=round(held / 2**30, 1),
                free_gib_during=round(free_during / 2**30, 1), busy=busy,
                mismatches=mismatches)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--passes", type=int, default=100)
    parser.add_argument("--fill", type=float, default=0.9,
                        help="fraction of the free GPU memory the other process takes")
    parser.add_argument("--busy", action="store_true",
                        help="the other process also runs matmuls the whole time")
    parser.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES))
    parser.add_argument("--json", type=Path)
    parser.add_argument("--as-filler", type=float, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.as_filler is not None:
        filler(args.as_filler, args.busy)
        return 0
    if not torch.cuda.is_available():
        sys.exit("determinism.py needs a CUDA GPU")
    results = []
    for name in args.cases:
        start = time.time()
        result = run_case(name, args.passes, args.fill, args.busy)
        result["seconds"] = round(time.time() - start, 1)
        results.append(result)
        verdict = ("bitwise equal" if not result["mismatches"]
                   else f"{len(result['mismatches'])} MISMATCHES, first {result['mismatches'][0]}")
        print(f"{name:<15} {result['passes']} passes, other process holding "
              f"{result['filler_gib']} GiB ({result['free_gib_during']} GiB left free): "
              f"{verdict} ({result['seconds']} s)", flush=True)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(device=torch.cuda.get_device_name(),
                                             results=results), indent=1))
    return 1 if any(r["mismatches"] for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
