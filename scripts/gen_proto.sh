#!/usr/bin/env bash
# Regenerates the gRPC stubs of jlora/serve/proto/jlora.proto with the pinned grpcio-tools.
# Usage: scripts/gen_proto.sh [OUT_ROOT]   (default: the repository root, i.e. next to the .proto)
# The proto is compiled from the repository root, so the stubs import each other as jlora.serve.proto.*.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${1:-.}
PY=${PYTHON:-.venv/bin/python}
mkdir -p "$OUT/jlora/serve/proto"
"$PY" -m grpc_tools.protoc -I . --python_out="$OUT" --pyi_out="$OUT" --grpc_python_out="$OUT" \
  jlora/serve/proto/jlora.proto
