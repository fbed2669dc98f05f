"""What a benchmark run leaves behind: markdown tables, bench.md, bench.json and bench.png.

Everything here reads a list of `Result`s and the run's metadata (a JSON-ready dict: GPU,
versions, commit, date, ceilings, timing settings) and touches no GPU, so it is tested on the
CPU from made-up results.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

from flashtile.bench import tables
from flashtile.bench.measure import MODES, Result, Shape

RATIO_TO = "flashtile"  # the ratio columns divide this provider's TFLOP/s by each other one's


def _number(x: float) -> str:
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}"


def _tflops_cell(r: Result | None) -> str:
    if r is None:
        return "-"
    return _number(r.tflops) if r.status == "ok" else tables.MARK[r.status]


def _ratio_cell(ours: Result | None, theirs: Result | None) -> str:
    if ours is None or theirs is None or ours.status != "ok" or theirs.status != "ok":
        return "-"
    return f"{ours.tflops / theirs.tflops:.2f}"


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    """A markdown table, right-aligned and padded so that it also reads as plain text."""
    widths = [max(3, len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(header)]
    lines = ["| " + " | ".join(h.rjust(w) for h, w in zip(header, widths)) + " |",
             "|" + "|".join("-" * (w + 1) + ":" for w in widths) + "|"]
    lines += ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in rows]
    return "\n".join(lines)


def _shape_columns(shape: Shape) -> list[str]:
    return [str(shape.head_dim), str(int(shape.causal)), str(shape.seqlen), str(shape.batch),
            str(shape.heads)]


def tflops_table(results: list[Result]) -> str:
    """One row per shape × mode: each provider's TFLOP/s, then flashtile's ratio to each other
    provider (> 1: flashtile is faster). "-" not run here, "FAIL" wrong output, "err" raised."""
    providers = tables.providers(results)
    others = [p for p in providers if p != RATIO_TO] if RATIO_TO in providers else []
    by_row: dict[tuple[Shape, str], dict[str, Result]] = {}
    for r in results:
        by_row.setdefault((r.shape, r.mode), {})[r.provider] = r
    header = ["D", "causal", "N", "B", "H", "mode", *providers, *(f"÷ {p}" for p in others)]
    rows = []
    for (shape, mode), by in by_row.items():
        rows.append(_shape_columns(shape) + [mode]
                    + [_tflops_cell(by.get(p)) for p in providers]
                    + [_ratio_cell(by.get(RATIO_TO), by.get(p)) for p in others])
    return _markdown(header, rows)


def memory_table(results: list[Result]) -> str:
    """One row per shape: each provider's peak MiB over one forward + backward."""
    providers = tables.providers(results)
    by_shape: dict[Shape, dict[str, float]] = {}
    for r in results:
        peaks = by_shape.setdefault(r.shape, {})
        if r.peak_mib is not None:
            peaks[r.provider] = r.peak_mib
    rows = [_shape_columns(shape) + [f"{peaks[p]:.0f}" if p in peaks else "-" for p in providers]
            for shape, peaks in by_shape.items()]
    return _markdown(["D", "causal", "N", "B", "H", *providers], rows)


def notes(results: list[Result]) -> list[str]:
    """One line per provider, outcome and reason that is not a measurement, with where."""
    every = len({r.shape for r in results})
    groups: dict[tuple[str, str, str], list[str]] = {}
    for r in results:
        if r.status == "ok":
            continue
        where = r.shape.label() + (f" {r.mode}" if r.status == "error" else "")
        places = groups.setdefault((r.provider, r.status, r.note), [])
        if where not in places:
            places.append(where)
    lines = []
    for (provider, status, note), places in groups.items():
        at = "every shape" if len(places) == every and every > 1 else "; ".join(places)
        lines.append(f"- {provider} {status} at {at}: {note}")
    return lines


def header(meta: dict) -> str:
    """The run's circumstances, one fact a line."""
    ceilings = meta.get("ceilings") or {}
    gpu = meta.get("gpu", "unknown GPU")
    if meta.get("driver"):
        gpu += f", driver {meta['driver']}"
    lines = [
        f"- GPU: {gpu}",
        f"- torch {meta.get('torch')} (CUDA {meta.get('cuda')}), triton {meta.get('triton')}, "
        f"cuDNN {meta.get('cudnn')}, flashtile {meta.get('flashtile')} "
        f"(commit {meta.get('commit') or 'unknown'})",
        f"- date: {meta.get('date')}; command: `{meta.get('command')}`",
        f"- dtype {meta.get('dtype')}; time: median of triton.testing.do_bench "
        f"(warmup {meta.get('warmup_ms')} ms, rep {meta.get('rep_ms')} ms), gradients reset "
        "between calls",
    ]
    if ceilings:
        lines.append(f"- ceilings in this run: bf16 matmul 8192³ "
                     f"{ceilings['matmul_bf16_tflops']:.0f} TFLOP/s; device copy "
                     f"{ceilings['copy_gbps']:.0f} GB/s (read + write)")
    lines.append("- TFLOP/s = 4·B·H·N²·D (×0.5 when causal) / time; bwd counts 2.5× that, "
                 "fwdbwd 3.5×; fwd runs with the inputs requiring grad, bwd times "
                 "`out.backward(dout)` alone")
    return "\n".join(lines)


def markdown_report(results: list[Result], meta: dict) -> str:
    """bench.md: the header, the TFLOP/s table, the memory table and the notes."""
    parts = ["# flashtile benchmark", header(meta), "## TFLOP/s",
             "Ratio columns: flashtile's TFLOP/s divided by that provider's, in this run.",
             tflops_table(results), "## Peak memory of one forward + backward (MiB)",
             memory_table(results)]
    lines = notes(results)
    if lines:
        parts += ["## Not measured", "\n".join(lines)]
    return "\n\n".join(parts) + "\n"


def write_json(path: Path, results: list[Result], meta: dict) -> None:
    data = {"metadata": meta, "results": [asdict(r) for r in results]}
    path.write_text(json.dumps(data, indent=1) + "\n")


def _seqlen_label(n: int) -> str:
    return f"{n // 1024}k" if n >= 1024 and n % 1024 == 0 else str(n)


def write_plot(path: Path, results: list[Result]) -> None:
    """TFLOP/s against seqlen (log2 axis), one line per provider; one panel per mode (rows)
    and head dim × causal (columns)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in results if r.status == "ok"]
    providers = list(dict.fromkeys(r.provider for r in ok))
    color = {p: f"C{i}" for i, p in enumerate(providers)}
    columns = sorted({(r.shape.head_dim, r.shape.causal) for r in ok})
    modes = [m for m in MODES if any(r.mode == m for r in ok)]
    fig, axes = plt.subplots(max(1, len(modes)), max(1, len(columns)), squeeze=False,
                             figsize=(4.5 * max(1, len(columns)), 3.4 * max(1, len(modes))))
    if not ok:
        axes[0][0].text(0.5, 0.5, "nothing was measured", ha="center", va="center")
    for i, mode in enumerate(modes):
        for j, (head_dim, causal) in enumerate(columns):
            ax = axes[i][j]
            panel = [r for r in ok
                     if r.mode == mode and (r.shape.head_dim, r.shape.causal) == (head_dim, causal)]
            for p in providers:
                points = sorted((r.shape.seqlen, r.tflops) for r in panel if r.provider == p)
                if points:
                    xs, ys = zip(*points)
                    ax.plot(xs, ys, marker="o", color=color[p], label=p)
            seqlens = sorted({r.shape.seqlen for r in panel})
            ax.set_xscale("log", base=2)
            ax.set_xticks(seqlens, [_seqlen_label(n) for n in seqlens])
            ax.minorticks_off()
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
            ax.set_title(f"D={head_dim}, {'causal' if causal else 'non-causal'}, {mode}")
            if i == len(modes) - 1:
                ax.set_xlabel("seqlen")
            if j == 0:
                ax.set_ylabel("TFLOP/s")
    handles = [plt.Line2D([], [], color=color[p], marker="o", label=p) for p in providers]
    if handles:
        fig.legend(handles=handles, loc="upper center", ncol=len(handles),
                   bbox_to_anchor=(0.5, 1.0))
    fig.tight_layout(rect=(0, 0, 1, 0.94))
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_reports(out_dir: Path, results: list[Result], meta: dict, plot: bool = True) -> None:
    """bench.md and bench.json, and bench.png when `plot` (drawn once, at the end of a run)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "bench.md").write_text(markdown_report(results, meta))
    write_json(out_dir / "bench.json", results, meta)
    if plot:
        write_plot(out_dir / "bench.png", results)
