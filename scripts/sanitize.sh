#!/usr/bin/env bash
# compute-sanitizer memcheck and racecheck over flashtile's kernels (scripts/sanitize.py).
# Usage: scripts/sanitize.sh [sanitize.py options]; PYTHON picks the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
exec "${PYTHON:-python}" scripts/sanitize.py --json results/sanitize.json "$@"
