#!/usr/bin/env bash
# The one-call GPU check (README "Speed"): training and scoring images/s, bf16 vs fp32 loss curves and the
# tiny pipeline on CUDA, in one run (< 8 min on one H200). `--dry-run`: the same sections on CPU at toy sizes.
# What each section measures: tools/gpu_check.py.
set -euo pipefail
cd "$(dirname "$0")/.."
exec python tools/gpu_check.py "$@"
