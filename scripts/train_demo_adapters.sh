#!/usr/bin/env bash
# Regenerates the demo adapters adapters/demo/{pirate,french,json} from scratch: writes the tiny chat
# datasets (scripts/make_demo_data.py), then trains one rank-8 all-linear LoRA per style on
# SmolLM2-135M-Instruct. CPU is enough: about 6 minutes per adapter on 2 cores; bf16 files of 4.9 MB.
# Usage: bash scripts/train_demo_adapters.sh [pirate] [french] [json]
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
.venv/bin/python scripts/make_demo_data.py --out adapters/demo_data --n 240 --seed 0
styles=("$@")
[ ${#styles[@]} -gt 0 ] || styles=(pirate french json)
for style in "${styles[@]}"; do
  case $style in
    pirate) seq_len=80 ;;  # the longest examples: 77 tokens with the chat template's system prompt
    *) seq_len=64 ;;
  esac
  .venv/bin/jlora train --model smollm2-135m-instruct --data "adapters/demo_data/$style.jsonl" \
    --output "adapters/demo/$style" --rank 8 --alpha 16 --target-modules all-linear \
    --steps 120 --batch-size 8 --seq-len "$seq_len" --lr 2e-3 --warmup-steps 10 --schedule cosine \
    --seed 0 --dtype float32 --save-dtype bfloat16
done
