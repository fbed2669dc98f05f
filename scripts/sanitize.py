"""compute-sanitizer over flashtile's kernels: memcheck and racecheck (by default) over the
forward and backward of every feature flag at ragged shapes (scripts/sanitize_cases.py).

Usage:
    python scripts/sanitize.py [--tools memcheck racecheck ...] [--cases NAME ...]
                               [--sanitizer PATH] [--json PATH] [--no-warm]

Each tool runs the driver once, all cases in one process, the tools side by side (Triton's cache
is warmed first without the sanitizer, one process per case in parallel), with
  - FLASHTILE_AUTOTUNE=0: one fixed config per kernel, no autotuning sweep under the sanitizer;
  - PYTORCH_NO_CUDA_MEMORY_CACHING=1: every tensor its own cudaMalloc, so that memcheck sees an
    access past a tensor's end instead of landing in the caching allocator's larger block.
The driver prints a marker before and after each case (after a synchronize), so each sanitizer
report is attributed to the case whose kernels produced it. Prints a table of reports per case
and tool, and exits 1 on any report, any tool's nonzero ERROR SUMMARY, a case that did not
finish, or a failed run. Needs a CUDA GPU and compute-sanitizer (CUDA toolkit); memcheck takes a
few minutes, racecheck longer.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

HERE = Path(__file__).resolve().parent
DRIVER = HERE / "sanitize_cases.py"
ERROR_EXIT = 86  # --error-exitcode: the sanitizer found something
MARKER = re.compile(r"^@@ case (\S+) (start|done)$")
# the first line of one report (the lines after it, indented, are its stack)
REPORT = re.compile(r"^========= (?!\s)(?!ERROR SUMMARY)(?!RACECHECK SUMMARY)(?!COMPUTE-SANITIZER)"
                    r"(?!Target application returned)(\S.*)$")
# memcheck ends with "ERROR SUMMARY: N errors", racecheck with "RACECHECK SUMMARY: N hazards
# displayed (E errors, W warnings)"
SUMMARY = re.compile(r"^========= (?:ERROR SUMMARY: (\d+) errors?"
                     r"|RACECHECK SUMMARY: (\d+) hazards?)")


def find_sanitizer(given: str | None) -> str:
    candidates = [given, shutil.which("compute-sanitizer")]
    for root in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if root:
            candidates.append(str(Path(root) / "bin" / "compute-sanitizer"))
    for c in candidates:
        if c and Path(c).is_file() and os.access(c, os.X_OK):
            return c
    sys.exit("compute-sanitizer not found: put it on PATH, set CUDA_HOME, or pass --sanitizer")


def environment() -> dict[str, str]:
    env = dict(os.environ)
    env["FLASHTILE_AUTOTUNE"] = "0"
    env["PYTORCH_NO_CUDA_MEMORY_CACHING"] = "1"
    env["PYTHONUNBUFFERED"] = "1"
    return env


def parse(output: str, cases: list[str]) -> tuple[dict[str, list[str]], list[str], int | None,
                                                   list[str]]:
    """Reports per case (and outside any case), the cases that finished, and the ERROR
    SUMMARY count."""
    per_case: dict[str, list[str]] = {name: [] for name in cases}
    outside: list[str] = []
    finished: list[str] = []
    current = None
    summary = None
    for line in output.splitlines():
        line = line.rstrip()
        if m := MARKER.match(line):
            name, what = m.groups()
            current = name if what == "start" else None
            if what == "done":
                finished.append(name)
            continue
        if m := SUMMARY.match(line):
            summary = int(m.group(1) or m.group(2))
            continue
        if m := REPORT.match(line):
            (per_case[current] if current in per_case else outside).append(m.group(1))
    return per_case, outside, summary, finished


def run_tool(sanitizer: str, tool: str, cases: list[str], log_dir: Path) -> dict:
    # API errors are torch's own (event queries and the like) and would drown the kernels'
    # reports; a failed launch still fails the driver itself
    cmd = [sanitizer, "--tool", tool, "--error-exitcode", str(ERROR_EXIT), "--print-limit",
           "200", "--report-api-errors", "no", sys.executable, str(DRIVER), *cases]
    print(f"$ {' '.join(cmd)}", flush=True)
    start = time.time()
    proc = subprocess.run(cmd, env=environment(), stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
    elapsed = time.time() - start
    log = log_dir / f"sanitize_{tool}.log"
    log.write_text(proc.stdout)
    per_case, outside, summary, finished = parse(proc.stdout, cases)
    return dict(tool=tool, returncode=proc.returncode, seconds=round(elapsed, 1),
                error_summary=summary, per_case=per_case, outside_cases=outside,
                unfinished=[c for c in cases if c not in finished], log=str(log))


def print_table(results: list[dict], cases: list[str]) -> None:
    tools = [r["tool"] for r in results]
    width = max(len(c) for c in [*cases, "case"])
    print(f"\n{'case':<{width}} | " + " | ".join(f"{t:>10}" for t in tools))
    print("-" * (width + 13 * len(tools) + 1))
    for case in cases:
        cells = []
        for r in results:
            n = len(r["per_case"][case])
            cells.append("not run" if case in r["unfinished"] else (str(n) if n else "ok"))
        print(f"{case:<{width}} | " + " | ".join(f"{c:>10}" for c in cells))
    for r in results:
        print(f"{r['tool']}: ERROR SUMMARY {r['error_summary']}, exit code {r['returncode']}, "
              f"{len(r['outside_cases'])} reports outside any case, {r['seconds']} s, "
              f"log {r['log']}")
        for case, reports in r["per_case"].items():
            for report in reports[:3]:
                print(f"  {case}: {report}")


def failed(result: dict) -> bool:
    return (result["returncode"] != 0 or bool(result["error_summary"])
            or result["error_summary"] is None or bool(result["unfinished"])
            or bool(result["outside_cases"]) or any(result["per_case"].values()))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tools", nargs="+", default=["memcheck", "racecheck"],
                        choices=["memcheck", "racecheck", "initcheck", "synccheck"])
    parser.add_argument("--cases", nargs="+", help="driver cases (default: all of them)")
    parser.add_argument("--sanitizer", help="path to compute-sanitizer")
    parser.add_argument("--json", type=Path, help="write the results here")
    parser.add_argument("--logs", type=Path, default=Path("results"),
                        help="directory for the sanitizer logs (default: results/)")
    parser.add_argument("--no-warm", action="store_true",
                        help="skip the warm-up run that fills Triton's cache")
    args = parser.parse_args(argv)
    sanitizer = find_sanitizer(args.sanitizer)
    listed = subprocess.run([sys.executable, str(DRIVER), "--list"], capture_output=True,
                            text=True, check=True).stdout.split()
    cases = args.cases or listed
    args.logs.mkdir(parents=True, exist_ok=True)
    if not args.no_warm:
        # one process per case, side by side: Triton compiles on the host, one kernel at a time
        # per process, and its on-disk cache is shared, so the sanitized runs only load binaries
        print("warming Triton's cache (no sanitizer, one process per case) ...", flush=True)
        with ThreadPoolExecutor(max_workers=max(1, (os.cpu_count() or 2) // 2)) as pool:
            list(pool.map(lambda case: subprocess.run(
                [sys.executable, str(DRIVER), case], env=environment(), check=True,
                stdout=subprocess.DEVNULL), cases))
    # the tools side by side too: each is its own process under its own sanitizer
    with ThreadPoolExecutor(max_workers=len(args.tools)) as pool:
        results = list(pool.map(lambda tool: run_tool(sanitizer, tool, cases, args.logs),
                                args.tools))
    print_table(results, cases)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(dict(cases=cases, results=results), indent=1))
    bad = [r["tool"] for r in results if failed(r)]
    print("\nFAILED: " + ", ".join(bad) if bad else "\nno sanitizer errors")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
