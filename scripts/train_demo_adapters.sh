#!/usr/bin/env bash
# Regenerates the three demo adapters (pirate, French, JSON) on SmolLM2-135M-Instruct, on the CPU.
# Each takes about 3 minutes on 2 cores. The data comes from scripts/make_demo_data.py.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/python scripts/make_demo_data.py
for name in pirate french json; do
  .venv/bin/jlora train --data "adapters/demo_data/$name.jsonl" --output "adapters/demo/$name" \
    --rank 8 --steps 60 --lr 3e-3 --warmup-steps 5 --batch-size 4 --seq-len 80 --save-dtype bfloat16
done
