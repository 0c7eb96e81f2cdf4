"""Turns a scheduled batch into padded device arrays and runs the jitted paged step with on-device sampling.

Shapes are padded to buckets (sequences and chunk lengths to powers of two, page-table widths too), so the set of
compiled programs depends only on the buckets and the prefill/decode mode, never on adapters or request mix.
"""

from __future__ import annotations

import dataclasses
import functools
import threading

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig
from jlora.engine.scheduler import ScheduledBatch
from jlora.model.kv_cache import KVCache
from jlora.model.llama import forward
from jlora.sampling import sample

_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"
_compiles = 0
_lock = threading.Lock()


def _count_compile(event, duration, **kwargs):
    global _compiles
    if event == _COMPILE_EVENT:
        with _lock:
            _compiles += 1


jax.monitoring.register_event_duration_secs_listener(_count_compile)


def compile_count() -> int:
    """XLA compilations in this process so far (every jitted program, not only the model step)."""
    return _compiles


def bucket(n: int, minimum: int = 1, maximum: int | None = None) -> int:
    b = max(minimum, 1 << (max(n, 1) - 1).bit_length())
    return min(b, maximum) if maximum else b


def _ladder(lo: int, hi: int) -> list[int]:
    """Powers of two from lo to hi (both powers of two)."""
    out = [lo]
    while out[-1] < hi:
        out.append(out[-1] * 2)
    return out


@dataclasses.dataclass
class StepOutput:
    """Host results of one step, in the order of the batch's sequences."""

    tokens: np.ndarray  # [n] sampled ids (meaningless where the chunk did not reach the end)
    logprobs: np.ndarray  # [n] log-probability of the sampled token
    top_ids: np.ndarray  # [n, num_logprobs]
    top_logprobs: np.ndarray  # [n, num_logprobs]


@functools.partial(jax.jit, static_argnames=("config", "backend", "num_logprobs"), donate_argnames=("cache",))
def _paged_step(params, bank, cache, tokens, positions, lora_ids, page_table, logit_index, temperature, top_k,
                top_p, keys, *, config, backend, num_logprobs):
    logits, cache = forward(params, bank, tokens, positions, lora_ids, cache, config=config, logit_index=logit_index,
                            lora_backend=backend, page_table=page_table)
    token = sample(logits, temperature, top_k, top_p, keys)
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, num_logprobs)
    return (token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], top_ids, top_lp), cache


class ModelRunner:
    """Owns the paged KV cache and runs steps.

    Args:
      config, params: the base model.
      num_pages, page_size: the KV page pool.
      max_model_len: longest sequence; bounds the page-table width.
      max_num_seqs: the largest sequence bucket.
    """

    def __init__(self, config: ModelConfig, params, *, num_pages: int, page_size: int, max_model_len: int,
                 max_num_seqs: int, dtype=jnp.float32, lora_backend: str | None = None, num_logprobs: int = 5):
        self.config, self.params = config, params
        self.page_size, self.max_num_seqs = page_size, max_num_seqs
        self.max_pages = -(-max_model_len // page_size)
        self.cache = KVCache.pages(config, num_pages, page_size, dtype)
        self.backend, self.num_logprobs = lora_backend, num_logprobs
        self.shapes_run: set[tuple] = set()

    # Small batches and short page tables share one bucket: fewer programs, at no cost worth counting.
    def _seq_range(self):
        return min(8, bucket(self.max_num_seqs)), bucket(self.max_num_seqs)

    def _page_range(self):
        return min(8, bucket(self.max_pages)), bucket(self.max_pages)

    def bucket_shapes(self, max_prefill_chunk: int) -> list[tuple[str, int, int, int]]:
        """Every (mode, sequences, tokens per row, page-table width) a step can have."""
        seq_b = _ladder(*self._seq_range())
        tok_b = _ladder(16, bucket(max_prefill_chunk, 16))
        page_b = _ladder(*self._page_range())
        return [(m, B, T, P) for B in seq_b for P in page_b for m, T in [("decode", 1)] + [("prefill", t) for t in tok_b]]

    def warmup(self, bank, max_prefill_chunk: int) -> int:
        """Compiles every bucket shape with all-padding batches (nothing is written); returns how many."""
        shapes = self.bucket_shapes(max_prefill_chunk)
        for mode, B, T, P in shapes:
            zeros = np.zeros((B,), np.int32)
            keys = jax.vmap(jax.random.key)(jnp.zeros((B,), jnp.uint32))
            out, self.cache = _paged_step(self.params, bank, self.cache, np.zeros((B, T), np.int32),
                                          np.full((B, T), -1, np.int32), np.full((B, T), -1, np.int32),
                                          np.zeros((B, P), np.int32), zeros, np.zeros((B,), np.float32), zeros,
                                          np.ones((B,), np.float32), keys, config=self.config, backend=self.backend,
                                          num_logprobs=self.num_logprobs)
            self.shapes_run.add((mode, B, T, P))
        jax.block_until_ready(out)
        return len(shapes)

    def execute(self, batch: ScheduledBatch, slots: dict[str, int], bank) -> StepOutput:
        """Runs one step. Rows go in adapter-slot order, so each adapter is one contiguous kernel segment."""
        seqs, chunks = batch.seqs, batch.chunks
        n = len(seqs)
        slot_of = [-1 if s.adapter is None else slots[s.adapter] for s in seqs]
        order = sorted(range(n), key=lambda i: slot_of[i])
        B = bucket(n, *self._seq_range())
        T = 1 if batch.mode == "decode" else bucket(max(chunks), 16)
        widest = max(-(-(s.num_computed + c) // self.page_size) for s, c in zip(seqs, chunks))
        P = bucket(widest, *self._page_range())
        tokens = np.zeros((B, T), np.int32)
        positions = np.full((B, T), -1, np.int32)
        lora = np.full((B, T), -1, np.int32)
        pages = np.zeros((B, P), np.int32)
        last = np.zeros((B,), np.int32)
        temp, top_k, top_p = np.zeros((B,), np.float32), np.zeros((B,), np.int32), np.ones((B,), np.float32)
        seeds, steps = np.zeros((B,), np.uint32), np.zeros((B,), np.int32)
        for row, i in enumerate(order):
            s, c = seqs[i], chunks[i]
            start = s.num_computed
            tokens[row, :c] = s.token_ids[start:start + c]
            positions[row, :c] = np.arange(start, start + c)
            lora[row, :c] = slot_of[i]
            pages[row, :len(s.pages)] = s.pages[:P]
            last[row] = c - 1
            sp = s.sampling
            temp[row], top_k[row], top_p[row] = sp.temperature, sp.top_k, sp.top_p
            seeds[row], steps[row] = s.sampling_seed, len(s.output_ids)
        keys = jax.vmap(lambda sd, st: jax.random.fold_in(jax.random.key(sd), st))(jnp.asarray(seeds),
                                                                                   jnp.asarray(steps))
        self.shapes_run.add((batch.mode, B, T, P))
        out, self.cache = _paged_step(self.params, bank, self.cache, tokens, positions, lora, pages, last, temp,
                                      top_k, top_p, keys, config=self.config, backend=self.backend,
                                      num_logprobs=self.num_logprobs)
        token, logp, top_ids, top_lp = jax.device_get(out)  # the step's one device-to-host transfer
        inv = np.empty(n, np.int64)
        inv[order] = np.arange(n)
        return StepOutput(token[inv], logp[inv], top_ids[inv], top_lp[inv])
