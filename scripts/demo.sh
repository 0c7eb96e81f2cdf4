#!/usr/bin/env bash
# Sets up and runs the main job: the default model (SmolLM2-135M-Instruct) answering a chat prompt,
# with the shipped demo adapters when they are present.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
ARGS=()
for d in adapters/demo/*/; do
  [ -f "$d/adapter_config.json" ] && ARGS+=(--lora "$(basename "$d")=$d")
done
exec .venv/bin/jlora generate --chat "${ARGS[@]}" --all-adapters --max-tokens 64 "${@:-What is the capital of Germany?}"
