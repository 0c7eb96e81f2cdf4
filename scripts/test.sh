#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite on the CPU, one pytest worker per core (at most 2).
# Each test file stays on one worker (--dist loadfile), so module fixtures are built once.
# XLA's CPU backend compiles at optimization level 0: the suite compiles far more than it runs.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
export XLA_FLAGS="${XLA_FLAGS:-} --xla_backend_optimization_level=0"
workers=$(.venv/bin/python -c 'import os; print(max(1, min(2, len(os.sched_getaffinity(0)))))')
exec .venv/bin/python -m pytest -n "$workers" --dist loadfile "$@"
