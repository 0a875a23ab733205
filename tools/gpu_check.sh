#!/usr/bin/env bash
# The one-call GPU check (docs/speed.md): loader, training and scoring images/s with profiles, bf16 vs fp32 loss
# curves, a torchrun step and the tiny pipeline on CUDA, in one run (about 7 min on one H200). `--dry_run`: the
# same sections on CPU at toy sizes. What each section measures: tools/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=$(command -v python || command -v python3)
exec "$PY" tools/gpu_check.py "$@"
