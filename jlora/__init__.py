"""jlora: one base LLM, thousands of LoRA adapters, in JAX.

The library API, imported on first use (so `import jlora` and the command line stay light):

- `load_model(path_or_name, dtype=...)` -> (Llama, Tokenizer): a Hugging Face directory, a .gguf file, the default
  model, or an `org/name` from the local hub cache;
- `LoraBank.from_peft(config, {name: dir})` -> (bank, {name: slot id}): PEFT directories in a device bank;
- `forward(params, bank, tokens, positions, lora_ids, cache, config=...)`: the model as a pure function, with one
  adapter id per row `[B]` or per token `[B, T]`; `KVCache` and `RuntimeConfig` go with it;
- `LLM(model, adapters)`: the engine, with `generate`, `chat`, `score`, `close` (and `with`), and `SamplingParams`
  (with `StructuredOutput`: a JSON schema, any JSON object, a regex or a grammar the output must follow).
"""

from __future__ import annotations

import importlib

_EXPORTS = {
    "load_model": "jlora.checkpoint.resolve",
    "LoraBank": "jlora.lora.bank",
    "forward": "jlora.model.llama",
    "KVCache": "jlora.model.kv_cache",
    "RuntimeConfig": "jlora.config",
    "LLM": "jlora.generate",
    "SamplingParams": "jlora.sampling",
    "StructuredOutput": "jlora.structured",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'jlora' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
