"""Ring attention across the GPUs of one host (issue 9), beside one GPU and beside the cost model.

    torchrun --nproc-per-node 2 scripts/ring_run.py [--out DIR] [--totals 32768,131072,524288]
    torchrun --nproc-per-node 2 scripts/ring_run.py --cpu     # gloo + Triton's interpreter

One process per GPU, NCCL (with --cpu: gloo, float32, tiny shapes, to check this script on any
machine). NVLink multicast stays off: NCCL_NVLS_ENABLE=0, TORCH_SYMM_MEM_DISABLE_MULTICAST=1 and
NVSHMEM_DISABLE_NVLS=1 are set here before the process group starts. Three parts, every rank
taking part, rank 0 writing ring_run.json and ring_run.md to --out and a short table last:

1. correctness: ring_flash_attn_func's forward and backward, unsharded, against flash_attn_func
   on the whole sequence on one device and against the float64 reference, by FlashAttention's
   rule (flashtile.testing.tolerance: 2 × PyTorch's error in the same dtype + a floor); each
   entry is max |error| ÷ that bound, so ≤ 1 passes;
2. throughput: TFLOP/s per GPU of the ring (forward; forward + backward) at each total length,
   causal (zig-zag layout) and not, and one GPU on the same whole sequence where it fits;
3. the ring step (docs/distributed.md §6): the time of one step (the ring's time ÷ W), of one
   block's kernel alone, and of one hop's transfer alone (batch_isend_irecv to the next rank:
   K and V; in the backward also the float32 dK, dV), the overlap achieved
   ((kernel + transfer − step) ÷ the shorter of the two, clipped to [0, 1]: 1 fully hidden, 0
   one after the other; none where the shorter is under 5% of the step), the step's time beyond
   its kernel's, the link's GB/s, and the cost model's figures for the same step
   (scripts/cost_model.py: its assumed kernel rate, link and per-step latency); and the step's
   fixed cost, from a ring of tiny blocks.

Times are wall-clock medians between barriers, the slowest rank's (a ring step lasts as long as
its slowest rank).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

for name, value in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"),
                    ("NVSHMEM_DISABLE_NVLS", "1")):
    os.environ[name] = value

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cost_model  # noqa: E402

import flashtile  # noqa: E402
import flashtile.distributed as fd  # noqa: E402
from flashtile.bench.measure import Shape, attention_flops  # noqa: E402
from flashtile.distributed.blocks import backward_block, forward_block, plan  # noqa: E402
from flashtile.distributed.ring import (  # noqa: E402
    _TAG_DKV,
    _TAG_KV,
    Sharding,
    _Exchange,
    make_sharding,
    ring_backward,
    ring_forward,
)
from flashtile.testing import reference_attention, run_flashtile, tolerance  # noqa: E402

FIELDS = ("out", "dq", "dk", "dv")


def sync(dev: torch.device) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)


def slowest(seconds: float, dev: torch.device) -> float:
    """The largest of every rank's `seconds`."""
    t = torch.tensor([seconds], dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t.item()


def timed(fn, reps: int, dev: torch.device) -> float:
    """Median seconds of fn() over `reps` calls after one warm-up call, each started together on
    every rank; the slowest rank's."""
    fn()
    times = []
    for _ in range(reps):
        dist.barrier()
        sync(dev)
        start = time.perf_counter()
        fn()
        sync(dev)
        times.append(time.perf_counter() - start)
    return slowest(statistics.median(times), dev)


def inputs(total: int, args, dev, dtype, seed: int, requires_grad: bool = False):
    """q, k, v, dout of the whole sequence, the same on every rank (one seed, drawn on the
    device: at 512k tokens drawing them on the host would take minutes)."""
    g = torch.Generator(device=dev).manual_seed(seed)
    shapes = [(1, total, args.nheads, args.head_dim), (1, total, args.nheads_k, args.head_dim),
              (1, total, args.nheads_k, args.head_dim), (1, total, args.nheads, args.head_dim)]
    return [torch.randn(s, generator=g, device=dev, dtype=dtype)
            .requires_grad_(requires_grad and i < 3) for i, s in enumerate(shapes)]


def shards(tensors, world: int, rank: int, layout: str, requires_grad: bool = False):
    return [fd.shard_sequence(t.detach(), world, rank, layout).contiguous()
            .requires_grad_(requires_grad and i < 3) for i, t in enumerate(tensors)]


def gathered(shard: torch.Tensor, world: int, layout: str) -> torch.Tensor:
    """Every rank's `shard`, as the whole sequence."""
    parts = [torch.empty_like(shard) for _ in range(world)]
    dist.all_gather(parts, shard.contiguous())
    return fd.unshard_sequence(parts, layout)


def check(args, dev, dtype, world, rank) -> list[dict]:
    """Part 1: per case, max |error| ÷ the rule's bound of the ring against the float64
    reference and against flash_attn_func on the whole sequence, per output."""
    results = []
    cases = [(False, "contiguous", "ring"), (True, "zigzag", "ring"),
             (True, "contiguous", "ring"), (True, "zigzag", "allgather")]
    for i, (causal, layout, exchange) in enumerate(cases):
        whole = inputs(args.check_len, args, dev, dtype, seed=100 + i, requires_grad=True)
        q, k, v, dout = shards(whole, world, rank, layout, requires_grad=True)
        out = fd.ring_flash_attn_func(q, k, v, causal=causal, layout=layout,
                                      kv_exchange=exchange)
        out.backward(dout)
        ring = {name: gathered(t, world, layout)
                for name, t in zip(FIELDS, (out.detach(), q.grad, k.grad, v.grad))}
        row = dict(causal=causal, layout=layout, kv_exchange=exchange, tokens=args.check_len)
        if rank == 0:
            qw, kw, vw, dw = whole
            single = run_flashtile(qw, kw, vw, dw, causal=causal)
            reference = reference_attention(qw, kw, vw, dw, causal=causal, dtype=torch.float64)
            baseline = reference_attention(qw, kw, vw, dw, causal=causal)
            for name in FIELDS:
                ref, base = getattr(reference, name), getattr(baseline, name)
                bound = tolerance(ref, base, dtype)
                err = (ring[name].double() - ref.double()).abs().max().item()
                peer = (ring[name].double() - single[name].double()).abs().max().item()
                row[name] = dict(vs_reference=err / bound, vs_one_device=peer / bound)
            row["passed"] = all(row[n]["vs_reference"] <= 1 and row[n]["vs_one_device"] <= 1
                                for n in FIELDS)
        results.append(row)
        dist.barrier()
    return results


def reps_for(total: int, args) -> int:
    """Timed calls per figure: --reps, but one past 128k tokens, where one GPU's forward and
    backward of the whole sequence take tens of seconds each (a run of one world size must fit
    in the device's 10 minutes a call)."""
    return args.reps if total <= 131072 else 1


def flops(total: int, args, causal: bool, backward: bool) -> float:
    """The bench's count (bench/measure.attention_flops) of one forward, or forward and
    backward, over the whole sequence."""
    shape = Shape(head_dim=args.head_dim, causal=causal, seqlen=total, batch=1,
                  heads=args.nheads)
    return attention_flops(shape, "fwdbwd" if backward else "fwd")


def sharding_of(layout: str, causal: bool, head_dim: int) -> Sharding:
    return make_sharding(dist.group.WORLD, layout, (-1, 0 if causal else -1), head_dim ** -0.5)


def ring_step(args, dev, dtype, world, rank, total: int, causal: bool) -> dict:
    """Part 3 at one total length: a step of the ring against its kernel and its transfer."""
    layout = "zigzag" if causal else "contiguous"
    sharding = sharding_of(layout, causal, args.head_dim)
    q, k, v, dout = shards(inputs(total, args, dev, dtype, seed=7), world, rank, layout)
    n = q.shape[1]
    kv = torch.stack((k, v))
    options = sharding.options_for(q)
    # a step past the first: the block of the previous rank (half of it kept when causal)
    calls = plan(sharding.runs(rank, n), sharding.runs((rank - 1) % world, n), sharding.window)
    out, lse = ring_forward(q, k, v, sharding)
    acc_out = torch.zeros(q.shape, device=dev, dtype=torch.float32)
    acc_lse = torch.full(lse.shape, float("-inf"), device=dev)
    dq = torch.zeros(q.shape, device=dev, dtype=torch.float32)
    dkv = torch.zeros(kv.shape, device=dev, dtype=torch.float32)
    reps = reps_for(total, args)
    row = dict(tokens=total, per_gpu=n, causal=causal)
    measured = {
        "fwd": dict(
            step=timed(lambda: ring_forward(q, k, v, sharding), reps, dev) / world,
            kernel=timed(lambda: forward_block(q, kv, calls, options, acc_out, acc_lse), reps,
                         dev),
            transfer=timed(lambda: _Exchange(kv, sharding, _TAG_KV).wait(), reps, dev),
            bytes=kv.numel() * kv.element_size()),
        "bwd": dict(
            step=timed(lambda: ring_backward(dout, q, k, v, out, lse, sharding), reps, dev)
            / world,
            kernel=timed(lambda: backward_block(dout, q, kv, out, lse, calls, options, dq, dkv),
                         reps, dev),
            transfer=timed(lambda: [hop.wait() for hop in (_Exchange(kv, sharding, _TAG_KV),
                                                           _Exchange(dkv, sharding, _TAG_DKV))],
                           reps, dev),
            bytes=kv.numel() * kv.element_size() + dkv.numel() * dkv.element_size()),
    }
    shape = cost_model.Shape(batch=1, nheads=args.nheads, nheads_k=args.nheads_k,
                             head_dim=args.head_dim)
    for mode, m in measured.items():
        backward = mode == "bwd"
        shorter = min(m["kernel"], m["transfer"])
        # not meaningful when the shorter part is within the timing's noise of the step
        m["overlap"] = (None if shorter < 0.05 * m["step"] else
                        min(1.0, max(0.0, (m["kernel"] + m["transfer"] - m["step"]) / shorter)))
        m["exposed"] = m["step"] - m["kernel"]  # a step's time beyond its kernel's
        m["link_GBps"] = m["bytes"] / m["transfer"] / 1e9
        m["kernel_TFLOPs"] = (cost_model.step_flops(shape, n, backward, causal)
                              / m["kernel"] / 1e12)
        rate = (cost_model.BWD_TFLOPS if backward else cost_model.FWD_TFLOPS)[1]
        kernel, transfer = cost_model.step_times(shape, n, world, backward, causal, rate,
                                                 cost_model.STEP_LATENCY_US)
        m["model"] = dict(kernel=kernel, transfer=transfer, step=max(kernel, transfer))
        row[mode] = m
    return row


def throughput(args, dev, dtype, world, rank, total: int, causal: bool) -> dict:
    """Part 2 at one total length: TFLOP/s per GPU of the ring, and of one GPU on it all."""
    layout = "zigzag" if causal else "contiguous"
    whole = inputs(total, args, dev, dtype, seed=11)
    q, k, v, dout = shards(whole, world, rank, layout, requires_grad=True)

    def ring_fwd():
        with torch.no_grad():
            fd.ring_flash_attn_func(q, k, v, causal=causal, layout=layout, kv_exchange="ring")

    def ring_fwd_bwd():
        fd.ring_flash_attn_func(q, k, v, causal=causal, layout=layout,
                                kv_exchange="ring").backward(dout)

    row = dict(tokens=total, causal=causal)
    reps = reps_for(total, args)
    for mode, fn in (("fwd", ring_fwd), ("fwd_bwd", ring_fwd_bwd)):
        row[f"ring_{mode}_TFLOPs_per_gpu"] = (flops(total, args, causal, mode == "fwd_bwd")
                                              / world / timed(fn, reps, dev) / 1e12)
    single = {"fwd": None, "fwd_bwd": None}
    if rank == 0:  # one device on the whole sequence, while the others wait
        qw, kw, vw, dw = (t.requires_grad_(i < 3) for i, t in enumerate(whole))
        try:
            for mode in single:
                def fn(mode=mode):
                    if mode == "fwd":
                        with torch.no_grad():
                            flashtile.flash_attn_func(qw, kw, vw, causal=causal)
                    else:
                        flashtile.flash_attn_func(qw, kw, vw, causal=causal).backward(dw)
                fn()
                times = []
                for _ in range(reps):
                    sync(dev)
                    start = time.perf_counter()
                    fn()
                    sync(dev)
                    times.append(time.perf_counter() - start)
                single[mode] = (flops(total, args, causal, mode == "fwd_bwd")
                                / statistics.median(times) / 1e12)
        except torch.OutOfMemoryError:
            pass  # does not fit on one device: the ring's reason to exist
    dist.barrier()
    for mode, rate in single.items():
        row[f"one_gpu_{mode}_TFLOPs"] = rate
        ring = row[f"ring_{mode}_TFLOPs_per_gpu"]
        row[f"ring_over_one_gpu_{mode}"] = ring / rate if rate else None
    return row


def step_latency(args, dev, dtype, world, rank) -> float:
    """Seconds a ring step costs beyond its work: a forward ring of 64-token blocks ÷ W, the
    median of at least 50 calls (each takes well under a millisecond; 3 are too few to trust)."""
    sharding = sharding_of("contiguous", False, args.head_dim)
    q, k, v, _ = shards(inputs(64 * world, args, dev, dtype, seed=3), world, rank, "contiguous")
    return timed(lambda: ring_forward(q, k, v, sharding), max(args.reps, 50), dev) / world


def markdown(report: dict) -> str:
    us = 1e6
    lines = [f"# Ring attention on {report['world_size']} × {report['device']}",
             "", f"{report['setup']}", "", "## Correctness (max |error| ÷ the rule's bound; ≤ 1 "
             "passes)", "", "| causal | layout | exchange | " + " | ".join(
                 f"{n} vs ref / vs one device" for n in FIELDS) + " | passed |",
             "|---" * (4 + len(FIELDS)) + "|"]
    for r in report["correctness"]:
        cells = " | ".join(f"{r[n]['vs_reference']:.2f} / {r[n]['vs_one_device']:.2f}"
                           for n in FIELDS)
        lines.append(f"| {r['causal']} | {r['layout']} | {r['kv_exchange']} | {cells} | "
                     f"{r['passed']} |")
    lines += ["", "## Throughput (TFLOP/s per GPU)", "",
              "| tokens | causal | ring fwd | one GPU fwd | ring fwd+bwd | one GPU fwd+bwd |",
              "|---|---|---|---|---|---|"]

    def f(x):
        return "—" if x is None else f"{x:.0f}" if x >= 10 else f"{x:.3g}"

    for r in report["throughput"]:
        lines.append(f"| {r['tokens']} | {r['causal']} | {f(r['ring_fwd_TFLOPs_per_gpu'])} | "
                     f"{f(r['one_gpu_fwd_TFLOPs'])} | {f(r['ring_fwd_bwd_TFLOPs_per_gpu'])} | "
                     f"{f(r['one_gpu_fwd_bwd_TFLOPs'])} |")
    lines += ["", "## One ring step (µs), measured against the cost model", "",
              "| tokens | per GPU | causal | mode | step | kernel | transfer | overlap | "
              "step − kernel | link GB/s | model step | model kernel | model transfer |",
              "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in report["steps"]:
        for mode in ("fwd", "bwd"):
            m = r[mode]
            lines.append(
                f"| {r['tokens']} | {r['per_gpu']} | {r['causal']} | {mode} | "
                f"{m['step'] * us:.0f} | {m['kernel'] * us:.0f} | {m['transfer'] * us:.0f} | "
                f"{f(m['overlap'])} | {m['exposed'] * us:.0f} | {m['link_GBps']:.3g} | "
                f"{m['model']['step'] * us:.0f} | "
                f"{m['model']['kernel'] * us:.0f} | {m['model']['transfer'] * us:.0f} |")
    lines += ["", f"Fixed cost of a ring step (64-token blocks): "
              f"{report['step_latency_s'] * us:.0f} µs; the model assumes "
              f"{cost_model.STEP_LATENCY_US:.0f}.", ""]
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cpu", action="store_true",
                        help="gloo on the CPU, float32, tiny shapes (checks the script)")
    parser.add_argument("--out", default=os.environ.get("OUT", "."))
    parser.add_argument("--totals", default=None,
                        help="comma-separated total tokens (default 32768,131072,524288; "
                             "with --cpu 96)")
    parser.add_argument("--nheads", type=int, default=None, help="default 32 (--cpu 2)")
    parser.add_argument("--nheads-k", type=int, default=None, help="default 8 (--cpu 1)")
    parser.add_argument("--head-dim", type=int, default=None, help="default 128 (--cpu 16)")
    parser.add_argument("--check-len", type=int, default=None,
                        help="tokens of the correctness cases (default 4096; --cpu 48)")
    parser.add_argument("--reps", type=int, default=None,
                        help="default 3 (--cpu 1); 1 past 128k tokens")
    args = parser.parse_args(argv)
    cpu = args.cpu
    for name, gpu_default, cpu_default in (("nheads", 32, 2), ("nheads_k", 8, 1),
                                           ("head_dim", 128, 16), ("check_len", 4096, 48),
                                           ("reps", 3, 1)):
        if getattr(args, name) is None:
            setattr(args, name, cpu_default if cpu else gpu_default)
    totals = [int(x) for x in (args.totals or ("96" if cpu else "32768,131072,524288"))
              .split(",")]

    dist.init_process_group("gloo" if cpu else "nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    if cpu:
        dev, dtype = torch.device("cpu"), torch.float32
    else:
        dev, dtype = torch.device("cuda", int(os.environ["LOCAL_RANK"])), torch.bfloat16
        torch.cuda.set_device(dev)
    report = dict(
        world_size=world,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "CPU (gloo)",
        setup=(f"{dist.get_backend()}, {dtype}, batch 1, {args.nheads} query heads, "
               f"{args.nheads_k} K/V heads, head dim {args.head_dim}; torch "
               f"{torch.__version__}, flashtile {flashtile.__version__}; NCCL_NVLS_ENABLE="
               f"{os.environ['NCCL_NVLS_ENABLE']}"),
        correctness=check(args, dev, dtype, world, rank))
    report["throughput"] = [throughput(args, dev, dtype, world, rank, total, causal)
                            for total in totals for causal in (False, True)]
    report["steps"] = [ring_step(args, dev, dtype, world, rank, total, causal)
                       for total in totals for causal in (False, True)]
    report["step_latency_s"] = step_latency(args, dev, dtype, world, rank)
    if rank == 0:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "ring_run.json").write_text(json.dumps(report, indent=1))
        text = markdown(report)
        (out / "ring_run.md").write_text(text)
        print(text)
    dist.destroy_process_group()
    return 0 if rank != 0 or all(r["passed"] for r in report["correctness"]) else 1


if __name__ == "__main__":
    raise SystemExit(main())
