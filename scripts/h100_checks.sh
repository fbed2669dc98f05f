#!/usr/bin/env bash
# Issue 8's GPU checks (sanitizers, determinism under memory pressure, the 1,000-case fuzz), in one
# device call of at most 10 minutes; the compiled test suite is its own call (README):
#   bash scripts/h100_checks.sh [OUT]      (OUT: where logs and JSON go; default $OUT or results)
# Files: sanitize.{log,json}, sanitize_{memcheck,racecheck}.log, determinism.{log,json},
# gpu_fuzz.{log,json}: eight files.
# Each step has its own time limit, so that a slow one cannot hide the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
out=${1:-${OUT:-results}}
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH=src
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2
  shift 2
  timeout "$limit" "$@" > "$out/$name.log" 2>&1
  echo "$name: exit $? (limit ${limit} s)"
}
# issue 8: compute-sanitizer, memcheck and racecheck side by side (about a minute with the
# parallel warm-up on 16 host cores)
step sanitize 200 python3 scripts/sanitize.py --tools memcheck racecheck \
  --json "$out/sanitize.json" --logs "$out"
# fixed configs: the three cases would otherwise autotune for a minute before the 100 passes
step determinism 90 env FLASHTILE_AUTOTUNE=0 python3 scripts/determinism.py --passes 100 \
  --json "$out/determinism.json"
# 8 processes: the fuzz is bound by Triton's compiles of new shapes, one at a time per process
step gpu_fuzz 240 python3 scripts/gpu_fuzz.py --cases 1000 --templates 40 --workers 8 \
  --max-seconds 220 --json "$out/gpu_fuzz.json"
for name in sanitize determinism gpu_fuzz; do tail -4 "$out/$name.log"; done
