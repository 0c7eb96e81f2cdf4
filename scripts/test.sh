#!/usr/bin/env bash
# Sets up (scripts/setup.sh) and runs the whole test suite on the CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=cpu
# One persistent compilation cache for the whole run, empty at its start: tests and the servers and scripts they
# start compile many of the same small programs. Compile counts include cache loads (jlora.engine.compiles).
JAX_COMPILATION_CACHE_DIR=$(mktemp -d -t jlora-test-xla-XXXXXX)
export JAX_COMPILATION_CACHE_DIR JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0 JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=-1
trap 'rm -rf "$JAX_COMPILATION_CACHE_DIR"' EXIT
.venv/bin/python -m pytest "$@"
