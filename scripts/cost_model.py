"""Ring attention cost model (docs/distributed.md): at every ring step, the kernel time of one
block against the time to pass a K/V shard (and, in the backward, the dK/dV accumulators) to the
next GPU; from that, the sequence length per GPU above which the ring hides its communication,
for 8 to 1024 H100s.

Usage: python scripts/cost_model.py [--plot docs/img/distributed_cost.png]

Every input is a constant below. The kernel rates are flashtile's, measured on one H100 (bf16,
head dim 128, non-causal, 16k tokens; docs/bench/). The bandwidths and the per-step latency are
ASSUMPTIONS, not measurements: a multi-GPU run should measure them and replace them here.
"""

from __future__ import annotations

import argparse
import itertools
import math
from dataclasses import dataclass

# Kernel rates, TFLOP/s, (low, high): flashtile on one H100, bf16, D = 128, 16k tokens.
FWD_TFLOPS = (450.0, 560.0)
BWD_TFLOPS = (360.0, 420.0)

# Link bandwidth per GPU and direction, GB/s, and where it applies. ASSUMED.
NVLINK = 350.0  # NVLink 4: 450 GB/s nominal per direction; ~350 achieved by point-to-point
INFINIBAND = 50.0  # NDR 400 Gb/s, one NIC per GPU
GPUS_PER_NODE = 8  # a ring of more GPUs crosses nodes, and its slowest hop sets every step

# Fixed cost of one ring step, µs: kernel launches from Python, the exchange's set-up, the
# merge. ASSUMED; it decides the all-gather / ring choice (ring.ALLGATHER_MAX_SHARD_BYTES).
STEP_LATENCY_US = 25.0

ELEMENT_BYTES = 2  # bf16 Q, K, V
ACCUMULATOR_BYTES = 4  # the dK/dV accumulators travel in float32
WORLD_SIZES = [8, 16, 32, 64, 128, 256, 512, 1024]


@dataclass(frozen=True)
class Shape:
    """What one GPU holds: batch, query heads, K/V heads, head dim (the sequence is n per GPU)."""

    batch: int = 1
    nheads: int = 32
    nheads_k: int = 8
    head_dim: int = 128

    @property
    def group(self) -> int:
        return self.nheads // self.nheads_k


def link(world_size: int) -> float:
    """GB/s of a ring step's slowest hop."""
    return NVLINK if world_size <= GPUS_PER_NODE else INFINIBAND


def step_flops(shape: Shape, n: float, backward: bool, causal: bool) -> float:
    """One ring step: n queries against a block of n keys, 4·B·H·n²·D; the backward 2.5×. With
    the zig-zag layout every causal step keeps half of the block (docs/distributed.md)."""
    flops = 4 * shape.batch * shape.nheads * n * n * shape.head_dim
    return flops * (2.5 if backward else 1.0) * (0.5 if causal else 1.0)


def step_bytes(shape: Shape, n: float, backward: bool) -> float:
    """Bytes each GPU sends (and receives) per step: K and V; the backward also dK and dV."""
    per_element = ELEMENT_BYTES + (ACCUMULATOR_BYTES if backward else 0)
    return 2 * shape.batch * n * shape.nheads_k * shape.head_dim * per_element


def step_times(shape: Shape, n: float, world_size: int, backward: bool, causal: bool,
               tflops: float, latency_us: float = 0.0) -> tuple[float, float]:
    """(kernel, transfer) seconds of one ring step."""
    compute = step_flops(shape, n, backward, causal) / (tflops * 1e12)
    transfer = latency_us * 1e-6 + step_bytes(shape, n, backward) / (link(world_size) * 1e9)
    return compute, transfer


def hiding_length(group: int, world_size: int, backward: bool, causal: bool,
                  tflops: float) -> float:
    """Tokens per GPU above which a step's kernel outlasts its transfer (no latency term):

        forward:  n* = b·F / (2·g·β),      backward: n* = (b + 4)·F / (5·g·β),

    doubled when causal; b bytes per element, F the kernel rate, g = H / H_k, β the link. It
    depends on neither batch nor head dim nor heads, only on their ratio g."""
    beta = link(world_size) * 1e9
    f = tflops * 1e12
    if backward:
        n = (ELEMENT_BYTES + ACCUMULATOR_BYTES) * f / (5 * group * beta)
    else:
        n = ELEMENT_BYTES * f / (2 * group * beta)
    return n * (2 if causal else 1)


def hiding_length_with_latency(shape: Shape, world_size: int, backward: bool, causal: bool,
                               tflops: float) -> float:
    """The same with STEP_LATENCY_US added to the transfer: the root of a·n² = b·n + α."""
    a = step_flops(shape, 1.0, backward, causal) / (tflops * 1e12)
    b = step_bytes(shape, 1.0, backward) / (link(world_size) * 1e9)
    alpha = STEP_LATENCY_US * 1e-6
    return (b + math.sqrt(b * b + 4 * a * alpha)) / (2 * a)


def allgather_length(shape: Shape, world_size: int) -> float:
    """Tokens per GPU below which one all-gather beats W - 1 ring steps: a step's transfer
    (K and V of n tokens) shorter than its fixed latency."""
    per_token = 2 * shape.batch * shape.nheads_k * shape.head_dim * ELEMENT_BYTES
    return STEP_LATENCY_US * 1e-6 * link(world_size) * 1e9 / per_token


def fmt(n: float) -> str:
    """Tokens: 305, 3.0k, 1.5M (k = 1024)."""
    if n >= 1024 * 1024:
        return f"{n / 1024 / 1024:.1f}M"
    return f"{n / 1024:.1f}k" if n >= 1024 else f"{n:.0f}"


def print_tables(shape: Shape) -> None:
    print("Tokens per GPU above which the ring hides its communication (no latency term), for "
          "the kernel rate range\n")
    print(f"| link | g = H/H_k | causal | forward (F = {FWD_TFLOPS[0]:.0f}–{FWD_TFLOPS[1]:.0f}) "
          f"| backward (F = {BWD_TFLOPS[0]:.0f}–{BWD_TFLOPS[1]:.0f}) |")
    print("|---|--:|--:|--:|--:|")
    for name, world_size in (("NVLink", 8), ("InfiniBand", 16)):
        for group in (1, 4, 8):
            for causal in (False, True):
                cells = []
                for backward, rates in ((False, FWD_TFLOPS), (True, BWD_TFLOPS)):
                    lo, hi = (hiding_length(group, world_size, backward, causal, f)
                              for f in rates)
                    cells.append(f"{fmt(lo)}–{fmt(hi)}")
                print(f"| {name} {link(world_size):.0f} GB/s | {group} | {int(causal)} | "
                      f"{cells[0]} | {cells[1]} |")
    print(f"\nBy number of GPUs, shape B={shape.batch} H={shape.nheads} H_k={shape.nheads_k} "
          f"D={shape.head_dim}, top kernel rates, {STEP_LATENCY_US:.0f} µs per step included; "
          "n* is the larger of forward and backward\n")
    print("| GPUs | link GB/s | n* per GPU | causal | sequence W·n* | causal | "
          "step at n* (µs) | causal | all-gather below (per GPU) |")
    print("|--:|--:|--:|--:|--:|--:|--:|--:|--:|")
    for world_size in WORLD_SIZES:
        lengths, steps = [], []
        for causal in (False, True):
            n = max(hiding_length_with_latency(shape, world_size, b, causal, f)
                    for b, f in ((False, FWD_TFLOPS[1]), (True, BWD_TFLOPS[1])))
            lengths.append(n)
            steps.append(max(step_times(shape, n, world_size, b, causal, f)[0]
                             for b, f in ((False, FWD_TFLOPS[1]), (True, BWD_TFLOPS[1]))))
        print(f"| {world_size} | {link(world_size):.0f} | {fmt(lengths[0])} | {fmt(lengths[1])} "
              f"| {fmt(world_size * lengths[0])} | {fmt(world_size * lengths[1])} | "
              f"{steps[0] * 1e6:.0f} | {steps[1] * 1e6:.0f} | "
              f"{fmt(allgather_length(shape, world_size))} |")


def plot(shape: Shape, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_step, ax_world) = plt.subplots(1, 2, figsize=(12, 4.6))
    ns = [2.0 ** e for e in range(7, 17)]
    for backward, f, style in ((False, FWD_TFLOPS[1], "-"), (True, BWD_TFLOPS[1], "--")):
        label = "backward" if backward else "forward"
        ax_step.plot(ns, [step_times(shape, n, 8, backward, False, f)[0] * 1e6 for n in ns],
                     "k" + style, label=f"kernel, {label}")
        for world_size, colour in ((8, "tab:blue"), (16, "tab:red")):
            ax_step.plot(ns, [step_times(shape, n, world_size, backward, False, f,
                                         STEP_LATENCY_US)[1] * 1e6 for n in ns],
                         style, color=colour,
                         label=f"transfer, {label}, {link(world_size):.0f} GB/s")
    ax_step.set(xscale="log", yscale="log", xlabel="tokens per GPU (n)",
                ylabel="µs per ring step",
                title=f"One ring step, non-causal, B={shape.batch} H={shape.nheads} "
                      f"H_k={shape.nheads_k} D={shape.head_dim}\n(transfer includes "
                      f"{STEP_LATENCY_US:.0f} µs per step)")
    ax_step.legend(fontsize=7)
    ax_step.grid(True, which="both", alpha=0.3)
    for (group, colour), (causal, style) in itertools.product(
            ((1, "tab:blue"), (4, "tab:green"), (8, "tab:purple")), ((False, "-"), (True, "--"))):
        total = [w * max(hiding_length(group, w, b, causal, f)
                         for b, f in ((False, FWD_TFLOPS[1]), (True, BWD_TFLOPS[1])))
                 for w in WORLD_SIZES]
        ax_world.plot(WORLD_SIZES, total, "o" + style, color=colour,
                      label=f"g = {group}, causal={causal}")
    ax_world.axvspan(WORLD_SIZES[0], GPUS_PER_NODE * 1.4, color="tab:blue", alpha=0.08)
    ax_world.text(8.3, 2e7, "NVLink", color="tab:blue", fontsize=8)
    ax_world.text(40, 2e7, "InfiniBand between nodes", color="tab:red", fontsize=8)
    ax_world.set(xscale="log", yscale="log", xlabel="GPUs in the ring (W)",
                 ylabel="sequence length W·n*",
                 title="Shortest sequence whose ring hides communication\n(no latency term, "
                       "forward and backward)")
    ax_world.set_xticks(WORLD_SIZES, [str(w) for w in WORLD_SIZES])
    ax_world.legend(fontsize=8)
    ax_world.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"\nsaved {path}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--plot", default="docs/img/distributed_cost.png")
    args = parser.parse_args()
    shape = Shape()
    print_tables(shape)
    plot(shape, args.plot)


if __name__ == "__main__":
    main()
