#!/usr/bin/env bash
# Set-up + tests in one command (README): installs the pinned dependencies, then runs the suite.
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements-dev.txt
python -m pytest -q "$@"
