#!/usr/bin/env bash
# The H100 checks still open (issues 6 and 8), in one device call of at most 10 minutes:
#   bash scripts/h100_checks.sh [OUT]      (OUT: where logs and JSON go; default $OUT or results)
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
# issue 6 (compiled on the GPU) and issue 8's GPU tests, failures named as they happen
step gpu_tests 200 python3 -m pytest tests/test_ops.py tests/test_transformers.py \
  tests/test_cuda_graphs.py tests/test_large.py tests/test_bad_input.py tests/test_extreme.py \
  -v -n 8 -p no:cacheprovider -p no:benchmark -rfE
grep -E "FAILED|ERROR" "$out/gpu_tests.log" | head -20
# issue 8: compute-sanitizer, memcheck first (racecheck takes longer)
step memcheck 150 python3 scripts/sanitize.py --tools memcheck --json "$out/memcheck.json" \
  --logs /tmp/sanitize_logs
step determinism 60 python3 scripts/determinism.py --passes 100 --json "$out/determinism.json"
step gpu_fuzz 150 python3 scripts/gpu_fuzz.py --cases 1000 --templates 40 --max-seconds 140 \
  --json "$out/gpu_fuzz.json"
for name in memcheck determinism gpu_fuzz; do tail -4 "$out/$name.log"; done
