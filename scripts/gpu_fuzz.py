"""The long GPU fuzz run: 1,000 random cases (tests/test_fuzz.py's draw_case, with longer
sequences and bfloat16, float16 and float32), forward and backward against the float64
reference by FlashAttention's rule (flashtile/testing.py).

Usage: python scripts/gpu_fuzz.py [--cases 1000] [--seed 0] [--max-len 512] [--templates 40]
                                  [--json results/gpu_fuzz.json] [--max-seconds S] [--workers N]

Every case runs (a failure does not stop the run). A case fails when a non-finite value differs
from the reference's, or when an error exceeds the rule's tolerance; its ratio is the largest
error / tolerance over its fields (<= 1 passes). Prints the cases, the failures and the worst
ratio, and writes a JSON with every failing case (Case fields: tests/test_fuzz.py's
run_case(Case(**fields), "cuda") replays one), the 20 worst, and the device, versions and
commit. Configs are fixed (FLASHTILE_AUTOTUNE=0): random shapes would each autotune. Exits 1 if
any case failed.

The 16-bit backward has a known limit against the rule (tests/test_fuzz.py's xfails: Delta taken
from the rounded O), so until it is fixed expect a few 16-bit cases in a thousand over 1;
16-bit dropout and 16-bit head dims under 8 are left out of the draws for that reason.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import random
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))

import torch  # noqa: E402
import triton  # noqa: E402
from test_fuzz import HEAD_DIMS, Case, draw_case, run_case  # noqa: E402

from flashtile.testing import assert_close, tolerance  # noqa: E402

GPU_HEAD_DIMS = HEAD_DIMS + (192, 256)


def worst_ratio(case: Case, comparisons) -> tuple[float, str]:
    """Largest error / tolerance over every compared field, and where; inf for a non-finite
    mismatch."""
    dtype = getattr(torch, case.dtype)
    worst, where = 0.0, ""
    for name, got, ref, base, fields in comparisons:
        for field in fields:
            actual = got[field] if isinstance(got, dict) else getattr(got, field)
            want, baseline = getattr(ref, field), getattr(base, field)
            try:
                assert_close(f"{name} {field}", actual, want, float("inf"))
            except AssertionError as e:  # a NaN or inf where the reference has none
                return float("inf"), str(e)
            atol = tolerance(want, baseline, dtype)
            finite = torch.isfinite(want)
            err = ((actual.detach().double() - want.double()).abs()[finite].max().item()
                   if bool(finite.any()) else 0.0)
            ratio = err / atol if atol > 0 else (0.0 if err == 0 else float("inf"))
            if ratio > worst:
                worst, where = ratio, f"{name} {field}: error {err:.3e}, tolerance {atol:.3e}"
    return worst, where


def commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT,
                              capture_output=True, text=True).stdout.strip()
    except OSError:
        return ""


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="the draws' random.Random seed")
    parser.add_argument("--max-len", type=int, default=512,
                        help="longest sequence drawn (default 512)")
    parser.add_argument("--dtypes", nargs="+", default=["bfloat16", "float16", "float32"])
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "gpu_fuzz.json")
    parser.add_argument("--max-seconds", type=float, help="stop drawing new cases after this")
    parser.add_argument("--templates", type=int, default=40,
                        help="distinct cases drawn (shapes, dtypes, flags), each then rerun with "
                             "fresh random data; 0: every case drawn anew. Each new shape and "
                             "flag set compiles its kernels (seconds each on the H100), so 1,000 "
                             "fully new cases take hours; 40 templates take minutes")
    parser.add_argument("--workers", type=int, default=1,
                        help="processes side by side, each with its share of the cases and "
                             "templates and its own seed: Triton compiles one kernel at a time "
                             "per process, so a fuzz run is bound by the host's compiles")
    args = parser.parse_args(argv)
    # set here, not at import: tests import this module for its report merging
    os.environ.setdefault("FLASHTILE_AUTOTUNE", "0")
    if not torch.cuda.is_available():
        sys.exit("gpu_fuzz.py needs a CUDA GPU")
    if args.workers > 1:
        return run_workers(args)
    rng = random.Random(args.seed)
    start = time.time()
    results = []
    for index in range(args.cases):
        if args.max_seconds and time.time() - start > args.max_seconds:
            print(f"time limit reached after {index} cases")
            break
        if args.templates and index >= args.templates:
            # a drawn case again, with new data: the compiled kernels are reused
            template = results[rng.randrange(args.templates)]["case"]
            case = dataclasses.replace(Case(**template), torch_seed=rng.randrange(2**31))
        else:
            case = draw_case(rng, tuple(args.dtypes), max_len=args.max_len,
                             head_dims=GPU_HEAD_DIMS)
        t0 = time.time()
        try:
            ratio, where = worst_ratio(case, run_case(case, "cuda"))
            error = ""
        except Exception:  # a crash is a failure of the case, reported, not the end of the run
            ratio, where, error = float("inf"), "exception", traceback.format_exc(limit=3)
        results.append(dict(index=index, case=dataclasses.asdict(case), ratio=ratio,
                            where=where, error=error, seconds=round(time.time() - t0, 3)))
        if ratio > 1:
            print(f"case {index} FAILED (ratio {ratio:.2f}, {where}): {case}", flush=True)
            if error:
                print(error, flush=True)
        elif index % 50 == 0:
            print(f"case {index}: ok ({time.time() - start:.0f} s)", flush=True)
        torch.cuda.empty_cache()

    by_kind: dict[str, dict[str, int]] = {}
    for r in results:
        key = f"{r['case']['kind']}/{r['case']['dtype']}"
        entry = by_kind.setdefault(key, dict(cases=0, failures=0))
        entry["cases"] += 1
        entry["failures"] += r["ratio"] > 1
    return report(args, start, len(results), [r for r in results if r["ratio"] > 1], results,
                  by_kind)


def report(args, start: float, cases: int, failures: list, candidates: list, by_kind) -> int:
    """Print the summary and write the JSON: failures, the 20 worst of `candidates`."""
    worst = sorted(candidates, key=lambda r: r["ratio"], reverse=True)[:20]
    print(f"\ncases {cases}, failures {len(failures)}, worst ratio "
          f"{worst[0]['ratio'] if worst else 0:.3f} ({worst[0]['where'] if worst else ''})")
    for key, entry in sorted(by_kind.items()):
        print(f"  {key:<18} {entry['cases']:5d} cases {entry['failures']:4d} failures")
    summary = dict(
        cases=cases, failures=len(failures),
        worst_ratio=worst[0]["ratio"] if worst else 0.0, by_kind=by_kind,
        failed_cases=failures, worst_cases=worst, seed=args.seed, max_len=args.max_len,
        templates=args.templates, workers=args.workers,
        device=torch.cuda.get_device_name(), torch=torch.__version__,
        triton=triton.__version__, commit=commit(), seconds=round(time.time() - start, 1))
    args.json.parent.mkdir(parents=True, exist_ok=True)
    # inf is not JSON: written as a string
    args.json.write_text(json.dumps(summary, indent=1, default=str).replace("Infinity",
                                                                            '"inf"'))
    print(f"wrote {args.json}")
    return 1 if failures else 0


def run_workers(args) -> int:
    """args.workers copies of this script, worker i with seed args.seed · 1000 + i and an equal
    share of the cases and templates; their JSONs merged into one report."""
    start = time.time()
    # the workers' own reports and logs are scratch: the merged JSON keeps every failure
    out_dir = Path(tempfile.mkdtemp(prefix="gpu_fuzz_workers_"))
    print(f"{args.workers} workers, their logs in {out_dir}", flush=True)
    procs = []
    for i in range(args.workers):
        share = args.cases // args.workers + (i < args.cases % args.workers)
        cmd = [sys.executable, __file__, "--cases", str(share), "--seed",
               str(args.seed * 1000 + i), "--max-len", str(args.max_len), "--dtypes",
               *args.dtypes, "--templates", str(-(-args.templates // args.workers)),
               "--json", str(out_dir / f"worker_{i}.json")]
        if args.max_seconds:
            cmd += ["--max-seconds", str(args.max_seconds)]
        log = open(out_dir / f"worker_{i}.log", "w")
        procs.append((subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT), log))
    for proc, log in procs:
        proc.wait()
        log.close()
    merged = merge([out_dir / f"worker_{i}" for i in range(args.workers)])
    return report(args, start, *merged)


def merge(workers: list[Path]) -> tuple[int, list, list, dict]:
    """cases, failures, worst-case candidates and per-kind counts of the workers' reports
    (WORKER.json, or WORKER.log's tail as a failure when a worker wrote none)."""
    cases, failures, candidates, by_kind = 0, [], [], {}
    for worker in workers:
        path = worker.with_suffix(".json")
        if not path.exists():  # a worker that died is a failure, named
            log = worker.with_suffix(".log")
            failures.append(dict(worker=worker.name, ratio=float("inf"), where="no report",
                                 error=log.read_text()[-2000:] if log.exists() else ""))
            continue
        part = json.loads(path.read_text().replace('"inf"', "Infinity"))
        cases += part["cases"]
        failures += part["failed_cases"]
        candidates += part["worst_cases"]
        for key, entry in part["by_kind"].items():
            merged = by_kind.setdefault(key, dict(cases=0, failures=0))
            merged["cases"] += entry["cases"]
            merged["failures"] += entry["failures"]
    return cases, failures, candidates, by_kind


if __name__ == "__main__":
    sys.exit(main())
