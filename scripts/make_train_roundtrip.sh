#!/usr/bin/env bash
# Rebuilds tests/fixtures/train_roundtrip: a tiny random Llama (with a character tokenizer), two adapters
# trained on it by `jlora train`, fixed input ids, and the logits Hugging Face transformers + PEFT compute
# with each adapter (scripts/check_peft_roundtrip.py, in .golden-venv from scripts/golden_env.sh).
set -euo pipefail
cd "$(dirname "$0")/.."
FIX=tests/fixtures/train_roundtrip
export JAX_PLATFORMS=${JAX_PLATFORMS:-cpu}
rm -rf "$FIX" && mkdir -p "$FIX/adapters"
.venv/bin/python - "$FIX" <<'PY'
import json, sys
import numpy as np
sys.path.insert(0, "tests")
from helpers import TINY, write_model
from train.tiny import write_tiny_data, write_tiny_tokenizer
fix = sys.argv[1]
write_tiny_tokenizer(write_model(f"{fix}/base", TINY, seed=7))
write_tiny_data(f"{fix}/data.jsonl", n=32)
ids = np.random.default_rng(0).integers(0, TINY.vocab_size, (2, 13)).tolist()
json.dump(ids, open(f"{fix}/input_ids.json", "w"))
PY
common=(--model "$FIX/base" --data "$FIX/data.jsonl" --steps 20 --lr 1e-2 --batch-size 8 --seq-len 48 --quiet)
.venv/bin/jlora train "${common[@]}" --output "$FIX/adapters/all_linear_r4" --rank 4 --alpha 8
.venv/bin/jlora train "${common[@]}" --output "$FIX/adapters/qv_down_r6_rslora" --rank 6 --alpha 4 --rslora \
  --target-modules q,v,down --seed 1
.golden-venv/bin/python scripts/check_peft_roundtrip.py "$FIX"
