"""Turns a scheduled batch into padded device arrays and runs the jitted paged step with on-device sampling.

Shapes are padded to buckets (sequences and chunk lengths to powers of two, page-table widths too), so the set of
compiled programs depends only on the buckets and the prefill/decode mode, never on adapters or request mix.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig, RuntimeConfig
from jlora.engine import compiles
from jlora.engine.memory import page_bytes
from jlora.engine.scheduler import ScheduledBatch
from jlora.errors import DeviceMemoryError
from jlora.model import attention
from jlora.model.kv_cache import KVCache
from jlora.model.llama import forward, split_layers, split_layers_enabled
from jlora.sampling import sample

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
    """Host results of one step, in the order of the batch's sequences: k samples each (several for a multi-step
    decode, see `decode_loop`), of which the first `num_steps[i]` are real for sequence i."""

    tokens: np.ndarray  # [n, k] sampled ids (meaningless where the chunk did not reach the end)
    logprobs: np.ndarray  # [n, k] log-probability of the sampled token
    top_ids: np.ndarray  # [n, k, num_logprobs]
    top_logprobs: np.ndarray  # [n, k, num_logprobs]
    num_steps: np.ndarray  # [n] samples drawn for each sequence


@functools.partial(jax.jit, static_argnames=("config", "runtime", "num_logprobs"), donate_argnames=("cache",))
def _paged_step(params, bank, cache, tokens, positions, lora_ids, page_table, logit_index, temperature, top_k,
                top_p, seeds, steps, *, config, runtime, num_logprobs):
    logits, cache = forward(params, bank, tokens, positions, lora_ids, cache, config=config, logit_index=logit_index,
                            runtime=runtime, page_table=page_table)
    return sample_outputs(logits, temperature, top_k, top_p, seeds, steps, num_logprobs), cache


@functools.partial(jax.jit, static_argnames=("config", "runtime", "num_logprobs", "max_steps", "greedy"),
                   donate_argnames=("cache",))
def _paged_decode(params, bank, cache, tokens, positions, lora_ids, page_table, temperature, top_k, top_p, seeds,
                  steps, row_steps, *, config, runtime, num_logprobs, max_steps, greedy):
    def fwd(tok, pos, cache):
        return forward(params, bank, tok, pos, lora_ids, cache, config=config, logit_index=jnp.zeros_like(tok[:, 0]),
                       runtime=runtime, page_table=page_table)

    return decode_loop(fwd, cache, tokens, positions, row_steps, temperature, top_k, top_p, seeds, steps,
                       num_logprobs, max_steps, greedy)


def decode_loop(fwd, cache, tokens, positions, row_steps, temperature, top_k, top_p, seeds, steps, num_logprobs: int,
                max_steps: int, greedy: bool):
    """Up to `max_steps` decode steps in one program, each feeding its sampled tokens to the next on the device.

    Row b decodes row_steps[b] <= max_steps tokens from position positions[b, 0]; after that its positions are -1
    (it writes and attends nothing). The loop always runs max_steps times: a trip count fixed at compile time
    measured faster on the H100 than one read from row_steps (LoRA off, 4 steps: 6490 against 5963 tok/s).
    `greedy` (static) says whether every row is greedy, so that no step holds a `lax.cond`: XLA's GPU runtime reads a
    conditional's predicate back to the host, which stalled the device once per step. (The loop itself still makes
    one device-to-host copy per iteration in the H100 profile.) Sampling step k of row b uses the key of
    `sample_outputs` at steps[b] + k, so a request's draws are those of k single steps.

    Args:
      fwd: (tokens [B, 1], positions [B, 1], cache) -> (logits [B, V], cache).
    Returns:
      ((tokens, logprobs, top ids, top logprobs), each with a leading [max_steps] axis), the cache.
    """
    B = tokens.shape[0]
    outs = (jnp.zeros((max_steps, B), jnp.int32), jnp.zeros((max_steps, B), jnp.float32),
            jnp.zeros((max_steps, B, num_logprobs), jnp.int32), jnp.zeros((max_steps, B, num_logprobs), jnp.float32))

    def body(k, carry):
        cache, tok, outs = carry
        pos = jnp.where(k < row_steps, positions[:, 0] + k, -1)[:, None]
        logits, cache = fwd(tok, pos, cache)
        new = sample_outputs(logits, temperature, top_k, top_p, seeds, steps + k, num_logprobs, greedy)
        outs = tuple(o.at[k].set(n.astype(o.dtype)) for o, n in zip(outs, new))
        return cache, new[0].astype(tokens.dtype)[:, None], outs

    cache, _, outs = jax.lax.fori_loop(0, max_steps, body, (cache, tokens, outs))
    return outs, cache


def sample_outputs(logits, temperature, top_k, top_p, seeds, steps, num_logprobs: int, greedy_only=None):
    """(sampled token [B], its log-probability [B], top ids [B, n], top log-probabilities [B, n]) from logits [B, V].

    Row b samples with key fold_in(key(seeds[b]), steps[b]): a request's draws depend on its seed and how many
    tokens it has, never on the batch around it. Derived inside the jitted step (no per-step host dispatch).
    """
    keys = jax.vmap(lambda sd, st: jax.random.fold_in(jax.random.key(sd), st))(seeds, steps)
    token = sample(logits, temperature, top_k, top_p, keys, greedy_only)
    logp = jax.nn.log_softmax(logits, axis=-1)
    top_lp, top_ids = jax.lax.top_k(logp, num_logprobs)
    return token, jnp.take_along_axis(logp, token[:, None], axis=-1)[:, 0], top_ids, top_lp


class ModelRunner:
    """Owns the paged KV cache and runs steps on one device (`jlora.engine.mesh.MeshRunner`: on a mesh).

    Args:
      config, params: the base model.
      num_pages, page_size: the KV page pool.
      max_model_len: longest sequence; bounds the page-table width.
      max_num_seqs: the largest sequence bucket (per data replica).
      runtime: kernel and layout switches, resolved here by platform and passed to every step program (static).
      donate_params: on GPU the stacked layer weights are split per layer (`llama.split_layers`); if True the
        caller's stacked arrays are deleted as they are split, so the weights are never held twice.
      decode_steps: most decode steps one call runs. A decode batch with `steps` runs `decode_loop` for
        decode_steps steps (rows stop at their own count); one without (pages were short) the one-step program.
      max_num_batched_tokens, max_prefill_chunk: the scheduler's token budget and longest chunk. With a budget,
        prefill steps keep their padded [sequences, chunk] rows within `prefill_row_budget` (see `prefill_fits`).
    """

    dp = 1  # data replicas: each owns a block of rows of every step and a block of pages

    def __init__(self, config: ModelConfig, params, *, num_pages: int, page_size: int, max_model_len: int,
                 max_num_seqs: int, dtype=jnp.float32, runtime: RuntimeConfig = RuntimeConfig(), num_logprobs: int = 5,
                 donate_params: bool = False, decode_steps: int = 1, max_num_batched_tokens: int | None = None,
                 max_prefill_chunk: int = 512):
        compiles.install()
        self.config, self.runtime = config, runtime.resolved()
        self.page_size, self.max_num_seqs = page_size, max_num_seqs
        self.pages_per_replica = num_pages // self.dp
        self.max_pages = -(-max_model_len // page_size)
        # Padded prefill tokens per replica: the token budget, but at least the smallest sequence bucket of the
        # longest chunks. None: no bound (every sequence bucket with every chunk bucket).
        self.prefill_row_budget = None if max_num_batched_tokens is None else max(
            bucket(max_num_batched_tokens), self._seq_range()[0] * bucket(max_prefill_chunk, 16))
        # The paged-attention kernels walk only a row's own pages, so on them every decode step takes the widest page
        # table: one decode program per sequence bucket instead of one per table width too.
        self.decode_any_width = attention.paged_backend(config, 1, self.runtime, page_size=page_size,
                                                        dtype=dtype) != "xla"
        self.donate_params, self.decode_steps = donate_params, decode_steps
        self.params, self.cache = self._allocate(params, num_pages, page_size, dtype)
        self.num_logprobs = num_logprobs
        self.shapes_run: set[tuple] = set()

    def _allocate(self, params, num_pages: int, page_size: int, dtype):
        """`_place`, waited for, so that a device out of memory fails here, with what to change, and not at the
        first step with XLA's message."""
        try:
            placed = self._place(params, num_pages, page_size, dtype)
            jax.block_until_ready(placed[1])
        except jax.errors.JaxRuntimeError as e:
            if "RESOURCE_EXHAUSTED" not in str(e):
                raise
            stats = jax.devices()[0].memory_stats() or {}
            largest = stats.get("largest_free_block_bytes")
            pool = f"; the largest free block of JAX's memory pool is {largest / 2**30:.1f} GiB" if largest else ""
            half = num_pages * page_bytes(self.config, page_size, dtype) // 2  # K or V
            raise DeviceMemoryError(
                f"{num_pages} KV pages ({2 * half / 2**30:.1f} GiB, as two {half / 2**30:.1f} GiB arrays) and the "
                f"weights do not fit on {jax.devices()[0].device_kind}{pool}. Lower EngineConfig.memory_bytes or "
                f"num_pages (jlora serve --num-pages), or give JAX's GPU pool more of the device with "
                f"XLA_CLIENT_MEM_FRACTION (default 0.75; splitting the weights per layer leaves holes in it). "
                f"XLA said: {str(e)[:300]}") from e
        return placed

    def _place(self, params, num_pages: int, page_size: int, dtype):
        if split_layers_enabled(self.runtime):
            params = split_layers(params, donate=self.donate_params)
        return params, KVCache.pages(self.config, num_pages, page_size, dtype)

    def _run(self, bank, a: dict) -> tuple[np.ndarray, ...]:
        """One jitted step on host arrays `a` (a decode loop when `a` has "row_steps"); returns (tokens, logprobs,
        top ids, top logprobs) on the host, with a leading [decode_steps] axis for a decode loop."""
        if "row_steps" in a:
            out, self.cache = _paged_decode(self.params, bank, self.cache, **a, config=self.config,
                                            runtime=self.runtime, num_logprobs=self.num_logprobs,
                                            max_steps=self.decode_steps, greedy=self._greedy(a))
        else:
            out, self.cache = _paged_step(self.params, bank, self.cache, **a, config=self.config,
                                          runtime=self.runtime, num_logprobs=self.num_logprobs)
        return jax.device_get(out)  # the step's one device-to-host transfer

    @staticmethod
    def _greedy(a: dict) -> bool:
        """Whether every row of a decode loop's arrays samples greedily (padding rows have temperature 0)."""
        return not np.any(a["temperature"] > 0)

    # Small batches and short page tables share one bucket: fewer programs, at no cost worth counting.
    def _seq_range(self):
        return min(8, bucket(self.max_num_seqs)), bucket(self.max_num_seqs)

    def _page_range(self):
        return min(8, bucket(self.max_pages)), bucket(self.max_pages)

    def page_buckets(self, mode: str, T: int) -> list[int]:
        """Page-table widths a step can have. A prefill step's table is as wide as its chunk bucket (what fresh
        prompts need) or, for a longer context (a later chunk, a recomputed sequence), the widest; a decode step's is
        the widest on the Pallas kernel, else any power of two in range."""
        lo, hi = self._page_range()
        if mode == "prefill":
            return sorted({min(hi, max(lo, bucket(-(-T // self.page_size)))), hi})
        return [hi] if self.decode_any_width else _ladder(lo, hi)

    def prefill_fits(self, num_seqs: int, longest_chunk: int) -> bool:
        """Whether a prefill step of this many sequences, the longest chunk this long, keeps its padded rows
        (sequence bucket x chunk bucket) within the row budget. The scheduler asks before adding a sequence."""
        B = bucket(num_seqs, *self._seq_range())
        return self.prefill_row_budget is None or B * bucket(longest_chunk, 16) <= self.prefill_row_budget

    def bucket_shapes(self, max_prefill_chunk: int) -> list[tuple[str, int, int, int]]:
        """Every (mode, sequences, tokens per row, page-table width) a step can have."""
        loops = ["decode_loop_greedy", "decode_loop"] if self.decode_steps > 1 else []
        shapes = []
        for b in _ladder(*self._seq_range()):
            for m in ["decode"] + loops:
                shapes += [(m, self.dp * b, 1, P) for P in self.page_buckets(m, 1)]
            for T in _ladder(16, bucket(max_prefill_chunk, 16)):
                if self.prefill_row_budget is None or b * T <= self.prefill_row_budget:
                    shapes += [("prefill", self.dp * b, T, P) for P in self.page_buckets("prefill", T)]
        return shapes

    @staticmethod
    def _arrays(mode: str, B: int, T: int, P: int) -> dict[str, np.ndarray]:
        """An all-padding step: positions -1 write nothing, no row has an adapter, and a decode row runs no step."""
        a = {"tokens": np.zeros((B, T), np.int32), "positions": np.full((B, T), -1, np.int32),
             "lora_ids": np.full((B, T), -1, np.int32), "page_table": np.zeros((B, P), np.int32),
             "temperature": np.zeros((B,), np.float32), "top_k": np.zeros((B,), np.int32),
             "top_p": np.ones((B,), np.float32), "seeds": np.zeros((B,), np.uint32), "steps": np.zeros((B,), np.int32)}
        if mode.startswith("decode_loop"):
            a["row_steps"] = np.zeros((B,), np.int32)
            a["temperature"][:] = 0.0 if mode == "decode_loop_greedy" else 1.0  # which of the two programs
        else:
            a["logit_index"] = np.zeros((B,), np.int32)
        return a

    def warmup(self, bank, max_prefill_chunk: int, shapes=None) -> int:
        """Compiles every bucket shape (or the given ones) with all-padding batches (nothing is written); returns
        how many."""
        shapes = self.bucket_shapes(max_prefill_chunk) if shapes is None else list(shapes)
        for mode, B, T, P in shapes:
            self._run(bank, self._arrays(mode, B, T, P))
            self.shapes_run.add((mode, B, T, P))
        return len(shapes)

    def _rows(self, seqs, slot_of: list[int]) -> tuple[list[int], int]:
        """(row of each sequence, rows B). Data replica r runs rows [r B / dp, (r + 1) B / dp), so a sequence goes
        to the block of the replica holding its pages; inside a block rows go in adapter-slot order, so each
        adapter is one contiguous kernel segment."""
        blocks = [[] for _ in range(self.dp)]
        for i, s in enumerate(seqs):
            blocks[s.pages[0] // self.pages_per_replica].append(i)
        b = bucket(max(map(len, blocks)), *self._seq_range())
        rows = [0] * len(seqs)
        for r, block in enumerate(blocks):
            for k, i in enumerate(sorted(block, key=lambda i: slot_of[i])):
                rows[i] = r * b + k
        return rows, self.dp * b

    def execute(self, batch: ScheduledBatch, slots: dict[str, int], bank) -> StepOutput:
        """Runs one step and returns its results in the order of `batch.seqs`."""
        seqs, chunks = batch.seqs, batch.chunks
        steps = batch.steps or [1] * len(seqs)  # samples per sequence: several for a multi-step decode
        if max(steps) > (self.decode_steps if batch.mode == "decode" else 1):
            raise ValueError(f"a {batch.mode} batch asks for {max(steps)} steps; this runner runs at most "
                             f"{self.decode_steps if batch.mode == 'decode' else 1}")
        # Multi-step whenever the scheduler asks for it, even for one token each (the tail of a burst): the loop then
        # runs steps nobody needs, but the one-step programs stay for page shortage alone, so fewer shapes compile.
        multi = batch.steps is not None and self.decode_steps > 1
        slot_of = [-1 if s.adapter is None else slots[s.adapter] for s in seqs]
        rows, B = self._rows(seqs, slot_of)
        T = 1 if batch.mode == "decode" else bucket(max(chunks), 16)
        widest = max(-(-(s.num_computed + c + k - 1) // self.page_size) for s, c, k in zip(seqs, chunks, steps))
        P = next(p for p in self.page_buckets(batch.mode, T) if p >= widest)
        a = self._arrays("decode_loop_greedy" if multi else batch.mode, B, T, P)  # padding rows are greedy
        for i, (s, c) in enumerate(zip(seqs, chunks)):
            row, start, sp = rows[i], s.num_computed, s.sampling
            a["tokens"][row, :c] = s.token_ids[start:start + c]
            a["positions"][row, :c] = np.arange(start, start + c)
            a["lora_ids"][row, :c] = slot_of[i]
            first = s.pages[0] // self.pages_per_replica * self.pages_per_replica  # the replica's page 0
            a["page_table"][row, :len(s.pages)] = np.asarray(s.pages[:P]) - first
            if multi:
                a["row_steps"][row] = steps[i]
            else:
                a["logit_index"][row] = c - 1
            a["temperature"][row], a["top_k"][row], a["top_p"][row] = sp.temperature, sp.top_k, sp.top_p
            a["seeds"][row], a["steps"][row] = s.sampling_seed, len(s.output_ids)
        mode = ("decode_loop_greedy" if self._greedy(a) else "decode_loop") if multi else batch.mode
        self.shapes_run.add((mode, B, T, P))
        out = self._run(bank, a)
        # [B, k, ...] rows: a decode loop's leading step axis moves second, a single step gets k = 1
        token, logp, top_ids, top_lp = (np.moveaxis(x, 0, 1) if multi else x[:, None] for x in out)
        return StepOutput(token[rows], logp[rows], top_ids[rows], top_lp[rows], np.asarray(steps))
