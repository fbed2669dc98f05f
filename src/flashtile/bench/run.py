"""`flashtile bench`: flashtile beside torch's attention backends and FlexAttention (and
FlashAttention-4 where it is installed), on one GPU, in one run.

    flashtile bench [--quick | --long | --features | --decode | --varlen]
                    [--providers flashtile,sdpa-cudnn] [--batches 1,8,64]
                    [--dims 64,128] [--seqlens 1k,4k,16k] [--modes fwd,bwd,fwdbwd]
                    [--dtype bfloat16] [--out DIR]

The default grid is the one shared/anchors-h100.md was measured on: head dim D in {64, 128},
causal and not, seqlen N from 512 to 16k, batch = 16384 / N and heads = 2048 / D, so that every
problem holds 16384 tokens of width 2048. --quick is a subset that takes a few minutes; --long
is long-context: batch 1, 16 heads, D = 128, N in {32k, 64k, 128k}. --dims, --seqlens, --modes
and --providers override what the preset chose. Each provider is checked against the float64
reference before it is timed. Writes bench.md, bench.json (with the configs flashtile's
autotuners chose, metadata "tuned") and bench.png to --out (default: $OUT if set, else
results/). --features measures issue 4's feature cases instead (sliding
window, GQA and document mask beside full attention, flashtile and FlexAttention:
bench/features.py) and writes features.md and features.json. --decode measures issue 5's
decoding step (one query token against a KV cache of 1k to 128k tokens, batch 1 to 64, GQA 8:1:
flashtile's contiguous and paged caches beside SDPA; --seqlens are cache lengths, --batches the
batch sizes: bench/decode.py) and writes decode.md and decode.json. --varlen measures issue 5's
packed training batch (log-uniform lengths 64 to 8192, 32k tokens, or --seqlens totals:
flash_attn_varlen_func beside the zero-padded dense batch in flashtile and SDPA:
bench/varlen.py) and writes varlen.md and varlen.json. Exit status: 0, or 1 when flashtile
failed its check, or 2 when there is no CUDA GPU.
"""

from __future__ import annotations

import argparse
import datetime
import functools
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import triton
from tqdm import tqdm

import flashtile
from flashtile.bench import decode, varlen
from flashtile.bench.measure import MODES, Result, Shape, ceilings, measure_provider
from flashtile.bench.providers import PROVIDERS
from flashtile.bench.report import notes, tflops_table, write_reports
from flashtile.kernels import configs

TOKENS = 16384  # batch · seqlen of every grid problem
WIDTH = 2048  # heads · head_dim


def shape_grid(dims: list[int], seqlens: list[int], batch: int | None = None,
               heads: int | None = None) -> list[Shape]:
    """Every (D, causal, N) in that order, causal off then on. Unless given, batch is
    TOKENS // N and heads WIDTH // D (each at least 1), the anchors' constant-work grid."""
    return [Shape(head_dim=d, causal=causal, seqlen=n,
                  batch=batch or max(1, TOKENS // n), heads=heads or max(1, WIDTH // d))
            for d in dims for causal in (False, True) for n in seqlens]


@dataclass(frozen=True)
class Preset:
    """What a run measures unless the command line says otherwise."""

    dims: tuple[int, ...]
    seqlens: tuple[int, ...]
    modes: tuple[str, ...]
    providers: tuple[str, ...]
    warmup_ms: int
    rep_ms: int
    batch: int | None = None
    heads: int | None = None


PRESETS = {
    "full": Preset(dims=(64, 128), seqlens=tuple(2**i for i in range(9, 15)), modes=MODES,
                   providers=tuple(PROVIDERS), warmup_ms=50, rep_ms=200),
    "quick": Preset(dims=(128,), seqlens=(1024, 8192), modes=("fwd", "bwd"),
                    providers=("flashtile", "sdpa-flash", "sdpa-cudnn", "flex"),
                    warmup_ms=25, rep_ms=100),
    # One call takes up to ~1 s here: a longer rep keeps several samples under the median.
    "long": Preset(dims=(128,), seqlens=(32768, 65536, 131072), modes=MODES,
                   providers=tuple(p for p in PROVIDERS if p != "naive"),
                   warmup_ms=100, rep_ms=1000, batch=1, heads=16),
    # Issue 4's feature cases (bench/features.py): one 16k sequence of 16 heads, D = 128.
    "features": Preset(dims=(128,), seqlens=(16384,), modes=MODES, providers=("flashtile", "flex"),
                       warmup_ms=50, rep_ms=300, batch=1, heads=16),
    # Issue 5's decoding step (bench/decode.py): seqlens are cache lengths, batches
    # decode.BATCHES unless --batches; 32 query heads over 4 kv heads; forward only.
    "decode": Preset(dims=(128,), seqlens=decode.CACHE_LENS, modes=("fwd",),
                     providers=decode.PROVIDERS, warmup_ms=25, rep_ms=200, heads=decode.HEADS),
    # Issue 5's packed batch (bench/varlen.py): seqlens are the batch's total tokens.
    "varlen": Preset(dims=(128,), seqlens=(varlen.TOTAL_TOKENS,), modes=MODES,
                     providers=varlen.PROVIDERS, warmup_ms=50, rep_ms=300, heads=varlen.HEADS),
}
# What --providers accepts: the grid's providers and those of --decode and --varlen.
ALL_PROVIDERS = tuple(dict.fromkeys([*PROVIDERS, *decode.PROVIDERS, *varlen.PROVIDERS]))


def _ints(text: str) -> list[int]:
    """"512,1k,16k" -> [512, 1024, 16384]."""
    try:
        values = [int(s[:-1]) * 1024 if s.lower().endswith("k") else int(s)
                  for s in (s.strip() for s in text.split(","))]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected positive integers like 512,1k: {text!r}") from None
    if not values or min(values) < 1:
        raise argparse.ArgumentTypeError(f"expected positive integers like 512,1k: {text!r}")
    return values


def _names(choices: tuple[str, ...]) -> Callable[[str], list[str]]:
    """An argparse type for a comma-separated list drawn from `choices`."""

    def parse(text: str) -> list[str]:
        names = [s.strip() for s in text.split(",") if s.strip()]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'}; choose from {', '.join(choices)}")
        return names

    return parse


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="flashtile bench", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    preset = parser.add_mutually_exclusive_group()
    preset.add_argument("--quick", action="store_true",
                        help="D=128, N in {1k, 8k}, fwd and bwd, flashtile / sdpa-flash / "
                        "sdpa-cudnn / flex: a few minutes")
    preset.add_argument("--long", action="store_true",
                        help="long context: batch 1, 16 heads, D=128, N in {32k, 64k, 128k}")
    preset.add_argument("--features", action="store_true",
                        help="issue 4's feature cases at N=16k, D=128, 16 heads: full attention, "
                        "sliding window 1024, GQA 8:1, 8 documents; flashtile and flex; writes "
                        "features.md/json")
    preset.add_argument("--decode", action="store_true",
                        help="issue 5's decoding step: 1 query token, KV cache of 1k/16k/128k "
                        "(--seqlens), batch 1/8/64 (--batches), 32 q heads over 4 kv heads, "
                        f"D=128; {', '.join(decode.PROVIDERS)}; writes decode.md/json")
    preset.add_argument("--varlen", action="store_true",
                        help="issue 5's packed batch: lengths log-uniform 64..8192, 32k tokens "
                        "(--seqlens: totals), 16 heads, D=128, non-causal and causal; "
                        f"{', '.join(varlen.PROVIDERS)}; writes varlen.md/json")
    parser.add_argument("--providers", type=_names(ALL_PROVIDERS),
                        help=f"comma-separated: for the grid from {', '.join(PROVIDERS)}; "
                        f"--decode from {', '.join(decode.PROVIDERS)}; --varlen from "
                        f"{', '.join(varlen.PROVIDERS)}")
    parser.add_argument("--batches", type=_ints, help="--decode's batch sizes, e.g. 1,8,64")
    parser.add_argument("--dims", type=_ints, help="head dims, e.g. 64,128")
    parser.add_argument("--seqlens", type=_ints, help="sequence lengths, e.g. 512,1k,16k")
    parser.add_argument("--modes", type=_names(MODES), help="from fwd, bwd, fwdbwd")
    parser.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                        default="bfloat16")
    parser.add_argument("--out", help="folder for bench.md/json/png (default: $OUT or results/)")
    return parser.parse_args(argv)


def _command_output(cmd: list[str], cwd: Path | None = None) -> str | None:
    try:
        done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=10,
                              check=True)
    except (OSError, subprocess.SubprocessError):
        return None
    return done.stdout.strip()


def _git_commit() -> str | None:
    """FLASHTILE_COMMIT if set (a copied tree, whose .git may be missing or lag behind the files
    it holds); else the short commit of the checkout flashtile is imported from, "-dirty" if
    tracked files changed since; else None."""
    if os.environ.get("FLASHTILE_COMMIT"):
        return os.environ["FLASHTILE_COMMIT"]
    here = Path(__file__).resolve().parent
    commit = _command_output(["git", "rev-parse", "--short", "HEAD"], here)
    if not commit:
        return None
    changed = _command_output(["git", "status", "--porcelain", "--untracked-files=no"], here)
    return commit + ("-dirty" if changed else "")


def metadata(argv: list[str], dtype: str, preset: Preset) -> dict:
    """GPU, driver, versions, commit and date: what a reader needs to compare two runs."""
    driver = _command_output(["nvidia-smi", "--query-gpu=driver_version",
                              "--format=csv,noheader"])
    return {
        "gpu": torch.cuda.get_device_name(),
        "driver": driver.splitlines()[0] if driver else None,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "triton": triton.__version__,
        "cudnn": torch.backends.cudnn.version(),
        "flashtile": flashtile.__version__,
        "commit": _git_commit(),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": " ".join(["flashtile bench", *argv]),
        "dtype": dtype,
        "warmup_ms": preset.warmup_ms,
        "rep_ms": preset.rep_ms,
    }


def _inputs(shape: Shape, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """q, k, v (B, H, N, D) with requires_grad, and dout: standard normal, seeded per shape."""
    torch.manual_seed(0)
    size = (shape.batch, shape.heads, shape.seqlen, shape.head_dim)
    q, k, v = (torch.randn(size, device="cuda", dtype=dtype, requires_grad=True)
               for _ in range(3))
    return q, k, v, torch.randn(size, device="cuda", dtype=dtype)


def main(argv: list[str]) -> int:
    """Run the benchmark that argv asks for; see the module docstring."""
    args = parse_args(argv)
    if not torch.cuda.is_available():
        print("flashtile bench: no CUDA GPU here (torch.cuda.is_available() is False), and "
              "timings need one. `flashtile demo` runs on the CPU through the Triton "
              "interpreter.", file=sys.stderr)
        return 2
    preset = PRESETS["quick" if args.quick else "long" if args.long
                     else "features" if args.features else "decode" if args.decode
                     else "varlen" if args.varlen else "full"]
    providers = args.providers or list(preset.providers)
    modes = args.modes or list(preset.modes)
    shapes = shape_grid(args.dims or list(preset.dims), args.seqlens or list(preset.seqlens),
                        preset.batch, preset.heads)
    out_dir = Path(args.out or os.environ.get("OUT") or "results")
    dtype = getattr(torch, args.dtype)
    log = functools.partial(print, flush=True)
    # flashtile logs each autotuning it starts: in a long run, that explains a pause.
    logging.basicConfig(stream=sys.stdout, format="%(message)s")
    logging.getLogger("flashtile").setLevel(logging.INFO)

    meta = metadata(argv, args.dtype, preset)
    log(f"flashtile bench on {meta['gpu']} (driver {meta['driver']}): torch {meta['torch']}, "
        f"triton {meta['triton']}, cuDNN {meta['cudnn']}, commit {meta['commit']}")
    meta["ceilings"] = ceilings(preset.warmup_ms, preset.rep_ms)
    log(f"ceilings: bf16 matmul 8192³ {meta['ceilings']['matmul_bf16_tflops']:.0f} TFLOP/s, "
        f"device copy {meta['ceilings']['copy_gbps']:.0f} GB/s (read + write)")
    if args.features:
        from flashtile.bench.features import run_features

        return run_features(args, meta, out_dir, dtype, preset, log)
    if args.decode:
        return decode.run_decode(args, meta, out_dir, dtype, preset, log)
    if args.varlen:
        return varlen.run_varlen(args, meta, out_dir, dtype, preset, log)
    unknown = [p for p in providers if p not in PROVIDERS]
    if unknown:
        log(f"flashtile bench: {', '.join(unknown)} not in the grid's providers; choose from "
            f"{', '.join(PROVIDERS)}")
        return 2
    log(f"{len(shapes)} shapes × {len(providers)} providers ({', '.join(providers)}), "
        f"modes {', '.join(modes)}, {args.dtype}; writing to {out_dir}/")

    start = time.perf_counter()
    results: list[Result] = []
    # a progress bar on stderr over shapes × providers; the log lines print above it
    bar = tqdm(total=len(shapes) * len(providers), desc="flashtile bench", unit="run",
               file=sys.stderr, dynamic_ncols=True)
    log = functools.partial(tqdm.write, file=sys.stdout)
    for i, shape in enumerate(shapes, 1):
        log(f"[{i}/{len(shapes)}, {time.perf_counter() - start:.0f} s] {shape.label()}")
        q, k, v, dout = _inputs(shape, dtype)
        for name in providers:
            bar.set_postfix_str(f"{shape.label()} {name}")
            results += measure_provider(name, PROVIDERS[name], shape, q, k, v, dout, modes,
                                        preset.warmup_ms, preset.rep_ms, log)
            torch.cuda.empty_cache()  # each provider starts from the same free memory
            bar.update()
        del q, k, v, dout
        meta["tuned"] = configs.tuned_choices()  # the configs behind flashtile's rows so far
        write_reports(out_dir, results, meta, plot=False)  # a cut-short run keeps its rows
    bar.close()
    log = functools.partial(print, flush=True)

    log(f"\ndone in {time.perf_counter() - start:.0f} s; TFLOP/s ({args.dtype}):\n")
    log(tflops_table(results))
    for line in notes(results):
        log(line)
    try:
        write_reports(out_dir, results, meta)
        log(f"\nwrote {out_dir}/bench.md, bench.json and bench.png")
    except ImportError as e:  # matplotlib is the `bench` extra
        log(f"\nwrote {out_dir}/bench.md and bench.json; bench.png not drawn ({e}): "
            "pip install 'flashtile[bench]' for matplotlib")
    failed = any(r.provider == "flashtile" and r.status == "failed" for r in results)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
