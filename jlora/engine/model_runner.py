"""Turns a scheduled batch into padded device arrays and runs the jitted paged step with on-device sampling.

Shapes are padded to buckets (sequences and chunk lengths to powers of two, page-table widths too), so the set of
compiled programs depends only on the buckets and the prefill/decode mode, never on adapters or request mix. A
structured-output step adds a grammar bitmask to the one-step program; its presence (None or an int32 [B, words]
array, one pytree structure each) is the only other thing the compile key sees.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from jlora.config import ModelConfig, RuntimeConfig
from jlora.engine import compiles
from jlora.engine.memory import page_bytes
from jlora.engine.sampler import decode_loop, fill_row, loop_kind, row_arrays, step_sample
from jlora.engine.scheduler import ScheduledBatch
from jlora.errors import DeviceMemoryError
from jlora.model import attention
from jlora.model.kv_cache import KVCache
from jlora.model.llama import forward, split_layers, split_layers_enabled
from jlora.sampling import MAX_LOGIT_BIAS
from jlora.sampling_penalties import PenaltyState, write_slots

PENALTY_WRITE_ROWS = 8  # slots one write of penalty state sets (padded): one compiled write

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
    decode, see `sampler.decode_loop`), of which the first `num_steps[i]` are real for sequence i."""

    tokens: np.ndarray  # [n, k] sampled ids (meaningless where the chunk did not reach the end)
    logprobs: np.ndarray | None  # [n, k] log-probability of the sampled token (None: no row asked)
    top_ids: np.ndarray | None  # [n, k, num_logprobs]
    top_logprobs: np.ndarray | None  # [n, k, num_logprobs]
    num_steps: np.ndarray  # [n] samples drawn for each sequence


@functools.partial(jax.jit, static_argnames=("config", "runtime", "num_logprobs"),
                   donate_argnames=("cache", "penalty"))
def _paged_step(params, bank, cache, penalty, tokens, positions, lora_ids, page_table, logit_index, sampling,
                bitmask=None, *, config, runtime, num_logprobs):
    logits, cache = forward(params, bank, tokens, positions, lora_ids, cache, config=config, logit_index=logit_index,
                            runtime=runtime, page_table=page_table)
    out, penalty = step_sample(logits, sampling, penalty, num_logprobs, bitmask)
    return out, cache, penalty


@functools.partial(jax.jit, static_argnames=("config", "runtime"), donate_argnames=("cache",))
def _paged_logits(params, bank, cache, tokens, positions, lora_ids, page_table, logit_index, *, config, runtime):
    """The forward half of a masked one-step program: logits [B, V] stay on the device while the host fills the
    grammar bitmask (`ModelRunner.overlap_masks`)."""
    return forward(params, bank, tokens, positions, lora_ids, cache, config=config, logit_index=logit_index,
                   runtime=runtime, page_table=page_table)


@functools.partial(jax.jit, static_argnames=("num_logprobs",), donate_argnames=("penalty",))
def _masked_sample(logits, penalty, sampling, bitmask, *, num_logprobs):
    """The sampling half: `sampler.step_sample` among the tokens `bitmask` allows."""
    return step_sample(logits, sampling, penalty, num_logprobs, bitmask)


@functools.partial(jax.jit, static_argnames=("config", "runtime", "max_steps", "greedy", "num_logprobs"),
                   donate_argnames=("cache", "penalty"))
def _paged_decode(params, bank, cache, penalty, tokens, positions, lora_ids, page_table, row_steps, sampling, *,
                  config, runtime, max_steps, greedy, num_logprobs):
    def fwd(tok, pos, cache):
        return forward(params, bank, tok, pos, lora_ids, cache, config=config, logit_index=jnp.zeros_like(tok[:, 0]),
                       runtime=runtime, page_table=page_table)

    return decode_loop(fwd, cache, penalty, tokens, positions, row_steps, sampling, max_steps, greedy, num_logprobs)


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
      num_logprobs: top logprobs a step computes per row (when a row asks).
      penalty_slots: sequences that can hold penalty state at once (`sampling_penalties.PenaltyState`); default
        max_num_seqs, the most that run at once.
      bitmask_words: int32 words of a grammar bitmask row (`structured.bitmask_words`), or 0 if no step takes one.
        Structured rows sample only in one-token decode steps (`scheduler`), so warm-up compiles the masked
        variant of those alone ("decode_masked").
    """

    dp = 1  # data replicas: each owns a block of rows of every step and a block of pages
    processes = 1  # JAX processes that run every step together
    model = None  # the `ShardedModel` of a mesh runner
    # A masked step runs as two programs, the forward and then the sampling, so that the host fills the grammar
    # bitmask while the forward runs (a mesh runs it as one program, the bitmask filled first).
    overlap_masks = True

    def __init__(self, config: ModelConfig, params, *, num_pages: int, page_size: int, max_model_len: int,
                 max_num_seqs: int, dtype=jnp.float32, runtime: RuntimeConfig = RuntimeConfig(),
                 num_logprobs: int = 20, donate_params: bool = False, decode_steps: int = 1,
                 max_num_batched_tokens: int | None = None, max_prefill_chunk: int = 512,
                 penalty_slots: int | None = None, bitmask_words: int = 0):
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
        self.num_pages, self.dtype = num_pages, dtype
        self.params, self.cache = self._allocate(params, num_pages, page_size, dtype)
        self.num_logprobs, self.bitmask_words = num_logprobs, bitmask_words
        self._penalty_zeros = functools.partial(PenaltyState.zeros, penalty_slots or max_num_seqs,
                                                config.vocab_size, MAX_LOGIT_BIAS)
        self.penalty = self._place_state(self._penalty_zeros)
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
        return params, self._new_cache()

    def _new_cache(self):
        return KVCache.pages(self.config, self.num_pages, self.page_size, self.dtype)

    def recover(self) -> bool:
        """After a failed step: whether the step took the KV cache or the penalty state with it. A jitted step
        donates both, so a call that fails after taking them leaves their arrays deleted and every later step would
        fail. Then both are allocated afresh (the survivors freed first) and True is returned: every sequence's
        cached keys and values, and every penalty slot, are lost, and the caller must recompute them."""
        leaves = jax.tree.leaves((self.cache, self.penalty))
        if not any(x.is_deleted() for x in leaves):
            return False
        for x in leaves:
            if not x.is_deleted():
                x.delete()
        self.cache, self.penalty = self._new_cache(), self._place_state(self._penalty_zeros)
        return True

    def _place_state(self, make) -> PenaltyState:
        return make()

    @property
    def spare_slot(self) -> int:
        """The penalty slot of rows without processors."""
        return self.penalty.spare

    def write_penalty_rows(self, rows: list[tuple]) -> None:
        """Sets penalty slots: `rows` of (slot, counts [V], flags [V], bias ids [N], bias [N]) host arrays
        (`penalty_slots.host_row`), PENALTY_WRITE_ROWS at a time, padded with zero rows on the spare slot."""
        R = PENALTY_WRITE_ROWS
        for start in range(0, len(rows), R):
            group = rows[start:start + R]
            pad = [(self.spare_slot, *(np.zeros_like(x) for x in group[0][1:]))] * (R - len(group))
            cols = list(zip(*(group + pad)))
            self.penalty = self._write_state(np.asarray(cols[0], np.int32), *(np.stack(c) for c in cols[1:]))

    def _write_state(self, slot, counts, flags, bias_ids, bias) -> PenaltyState:
        return write_slots(self.penalty, slot, counts, flags, bias_ids, bias)

    def _run(self, bank, a: dict, fill_mask=None):
        """One jitted step on host arrays `a` (a decode loop when `a` has "row_steps"); returns, on the host,
        (tokens, logprobs, top ids, top logprobs) with a leading [decode_steps] axis for a decode loop, which
        returns tokens alone unless a row asks for logprobs. `fill_mask()` writes a masked step's bitmask rows
        into `a["bitmask"]`: once the forward is dispatched, where `overlap_masks`."""
        if "bitmask" in a and self.overlap_masks:
            forward_args, _ = self._masked_args(a)
            logits, self.cache = _paged_logits(self.params, bank, self.cache, **forward_args,
                                               config=self.config, runtime=self.runtime)
            if fill_mask is not None:
                fill_mask()  # on the host, while the device runs the forward
            out, self.penalty = _masked_sample(logits, self.penalty, a["sampling"], a["bitmask"],
                                               num_logprobs=self.num_logprobs)
            return jax.device_get(out)
        if fill_mask is not None:
            fill_mask()
        program, args, kwargs = self._step_call(bank, a)
        out, self.cache, penalty = program(*args, **kwargs)
        self.penalty = self.penalty if penalty is None else penalty
        return jax.device_get(out)  # the step's one device-to-host transfer

    def _masked_args(self, a: dict):
        """A masked step's arrays, split: (the forward's keyword arguments, the sampling's)."""
        sample = ("sampling", "bitmask")
        return {k: v for k, v in a.items() if k not in sample}, {k: a[k] for k in sample}

    def _lower(self, bank, a: dict) -> list:
        """The lowered programs of the step on host arrays `a`, in the order a step runs them."""
        if "bitmask" in a and self.overlap_masks:
            forward_args, sample_args = self._masked_args(a)
            forward_half = _paged_logits.lower(self.params, bank, self.cache, **forward_args, config=self.config,
                                               runtime=self.runtime)
            logits = forward_half.out_info[0]
            return [forward_half, _masked_sample.lower(logits, self.penalty, **sample_args,
                                                       num_logprobs=self.num_logprobs)]
        program, args, kwargs = self._step_call(bank, a)
        return [program.lower(*args, **kwargs)]

    def _step_call(self, bank, a: dict):
        """(jitted program, positional arguments, keyword arguments) of the step on host arrays `a`."""
        step, decode, static = self._programs()
        state = (self.params, bank, self.cache)
        if "row_steps" in a:
            return decode, (*state, self._loop_state(a)), dict(a, **static, max_steps=self.decode_steps,
                                                               **self._loop_flags(a))
        return step, (*state, self.penalty), dict(a, **static, num_logprobs=self.num_logprobs)

    def _programs(self):
        """(one-step program, decode-loop program, the static arguments both take)."""
        return _paged_step, _paged_decode, {"config": self.config, "runtime": self.runtime}

    def _loop_state(self, a: dict):
        """The penalty state a decode loop takes: none for the greedy program."""
        return None if loop_kind(a["sampling"]) == "decode_loop_greedy" else self.penalty

    def _loop_flags(self, a: dict) -> dict:
        """The static arguments of the decode loop program that rows `a` need."""
        kind = loop_kind(a["sampling"])
        return {"greedy": kind == "decode_loop_greedy",
                "num_logprobs": self.num_logprobs if kind == "decode_loop_logprobs" else 0}

    # Small batches and short page tables share one bucket: fewer programs, at no cost worth counting.
    def _seq_range(self):
        return min(8, bucket(self.max_num_seqs)), bucket(self.max_num_seqs)

    def _page_range(self):
        return min(8, bucket(self.max_pages)), bucket(self.max_pages)

    def page_buckets(self, mode: str, T: int) -> list[int]:
        """Page-table widths a step can have. A prefill step's table is as wide as its chunk bucket (what fresh
        prompts need) or, for a longer context (a later chunk, a recomputed sequence), the widest; a decode step's is
        the widest on the Pallas kernel, else any power of two in range. A masked decode step's (a structured row) is
        always the widest: one such program per sequence bucket, since few steps carry a grammar."""
        lo, hi = self._page_range()
        if mode == "prefill":
            return sorted({min(hi, max(lo, bucket(-(-T // self.page_size)))), hi})
        return [hi] if self.decode_any_width or mode == "decode_masked" else _ladder(lo, hi)

    def prefill_fits(self, num_seqs: int, longest_chunk: int) -> bool:
        """Whether a prefill step of this many sequences, the longest chunk this long, keeps its padded rows
        (sequence bucket x chunk bucket) within the row budget. The scheduler asks before adding a sequence."""
        B = bucket(num_seqs, *self._seq_range())
        return self.prefill_row_budget is None or B * bucket(longest_chunk, 16) <= self.prefill_row_budget

    def bucket_shapes(self, max_prefill_chunk: int) -> list[tuple[str, int, int, int]]:
        """Every (mode, sequences, tokens per row, page-table width) a step can have."""
        loops = ["decode_loop_greedy", "decode_loop", "decode_loop_logprobs"] if self.decode_steps > 1 else []
        masked = ["decode_masked"] if self.bitmask_words else []
        shapes = []
        for b in _ladder(*self._seq_range()):
            for m in ["decode"] + masked + loops:
                shapes += [(m, self.dp * b, 1, P) for P in self.page_buckets(m, 1)]
            for T in _ladder(16, bucket(max_prefill_chunk, 16)):
                if self.prefill_row_budget is None or b * T <= self.prefill_row_budget:
                    shapes += [("prefill", self.dp * b, T, P) for P in self.page_buckets("prefill", T)]
        return shapes

    def _arrays(self, mode: str, B: int, T: int, P: int) -> dict:
        """An all-padding step: positions -1 write nothing, no row has an adapter, a decode row runs no step, and a
        "_masked" mode's bitmask allows every token."""
        a = {"tokens": np.zeros((B, T), np.int32), "positions": np.full((B, T), -1, np.int32),
             "lora_ids": np.full((B, T), -1, np.int32), "page_table": np.zeros((B, P), np.int32),
             "sampling": row_arrays(B, self.spare_slot)}
        if mode.startswith("decode_loop"):  # which of the three programs (`sampler.loop_kind`)
            a["row_steps"] = np.zeros((B,), np.int32)
            a["sampling"]["temperature"][:] = 0.0 if mode == "decode_loop_greedy" else 1.0
            a["sampling"]["logprobs"][:] = mode == "decode_loop_logprobs"
        else:
            a["logit_index"] = np.zeros((B,), np.int32)
        if mode.endswith("_masked"):
            a["bitmask"] = np.full((B, self.bitmask_words), -1, np.int32)
        return a

    def warmup(self, bank, max_prefill_chunk: int, shapes=None, workers: int | None = None) -> int:
        """Compiles every bucket shape (or the given ones) and runs each once with an all-padding batch (nothing is
        written); returns how many. The programs compile on `workers` threads at once (default: one per core, at
        most 8; XLA compiles outside the GIL), then run one after another from JAX's caches."""
        shapes = self.bucket_shapes(max_prefill_chunk) if shapes is None else list(shapes)
        V = self.config.vocab_size  # the penalty-slot write: one program, here on the spare slot alone
        self.write_penalty_rows([(self.spare_slot, np.zeros(V, np.int32), np.zeros(V, np.int8),
                                  np.zeros(MAX_LOGIT_BIAS, np.int32), np.zeros(MAX_LOGIT_BIAS, np.float32))])
        self.precompile(bank, shapes, workers)
        for mode, B, T, P in shapes:
            self._run(bank, self._arrays(mode, B, T, P))
            self.shapes_run.add((mode, B, T, P))
        return len(shapes)

    def precompile(self, bank, shapes, workers: int | None = None) -> None:
        """Compiles the step programs of `shapes` on a thread pool, without running them: a later step of one of
        these shapes finds its program in JAX's caches. Lowering stays on this thread, in the order of `shapes`,
        and each program goes to the pool as soon as it is lowered: Mosaic GPU kernels lowered on concurrent
        threads serialized differently from one process to the next, so the persistent cache missed them on a
        restart. One process only (the processes of a multi-host mesh must compile the same programs in the same
        order)."""
        workers = workers or min(8, len(os.sched_getaffinity(0)))
        if workers <= 1 or len(shapes) <= 1 or jax.process_count() > 1:
            return
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="jlora-compile") as pool:
            futures = []
            for shape in shapes:
                futures += [pool.submit(lowered.compile) for lowered in self._lower(bank, self._arrays(*shape))]
            for f in futures:
                f.result()

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

    def execute(self, batch: ScheduledBatch, slots: dict[str, int], bank,
                penalty_slots: list[int] | None = None, bitmask: np.ndarray | None = None) -> StepOutput:
        """Runs one step and returns its results in the order of `batch.seqs`; `penalty_slots[i]` is the penalty
        slot of sequence i (None: every row on the spare slot, i.e. no processors); `bitmask[i]` the int32 grammar
        bitmask row of sequence i (`engine.grammars`; None: no row is constrained), in a one-step batch only. It may
        be a function returning those rows (or None): it is then called while the step's forward runs."""
        seqs, chunks = batch.seqs, batch.chunks
        steps = batch.steps or [1] * len(seqs)  # samples per sequence: several for a multi-step decode
        if max(steps) > (self.decode_steps if batch.mode == "decode" else 1):
            raise ValueError(f"a {batch.mode} batch asks for {max(steps)} steps; this runner runs at most "
                             f"{self.decode_steps if batch.mode == 'decode' else 1}")
        # Multi-step whenever the scheduler asks for it, even for one token each (the tail of a burst): the loop then
        # runs steps nobody needs, but the one-step programs stay for page shortage alone, so fewer shapes compile.
        multi = batch.steps is not None and self.decode_steps > 1
        if bitmask is not None and multi:
            raise ValueError("a grammar bitmask needs a one-step batch: the decode loop samples several tokens")
        penalty_slots = penalty_slots or [self.spare_slot] * len(seqs)
        slot_of = [-1 if s.adapter is None else slots[s.adapter] for s in seqs]
        rows, B = self._rows(seqs, slot_of)
        T = 1 if batch.mode == "decode" else bucket(max(chunks), 16)
        widest = max(-(-(s.num_computed + c + k - 1) // self.page_size) for s, c, k in zip(seqs, chunks, steps))
        masked = "" if bitmask is None else "_masked"
        P = next(p for p in self.page_buckets(batch.mode + masked, T) if p >= widest)
        a = self._arrays("decode_loop_greedy" if multi else batch.mode + masked, B, T, P)  # padding rows are greedy
        for i, (s, c) in enumerate(zip(seqs, chunks)):
            row, start = rows[i], s.num_computed
            a["tokens"][row, :c] = s.token_ids[start:start + c]
            a["positions"][row, :c] = np.arange(start, start + c)
            a["lora_ids"][row, :c] = slot_of[i]
            first = s.pages[0] // self.pages_per_replica * self.pages_per_replica  # the replica's page 0
            a["page_table"][row, :len(s.pages)] = np.asarray(s.pages[:P]) - first
            if multi:
                a["row_steps"][row] = steps[i]
            else:
                a["logit_index"][row] = c - 1
            fill_row(a["sampling"], row, s, penalty_slots[i], live=start + c == s.num_tokens)

        def fill_mask():
            m = bitmask() if callable(bitmask) else bitmask
            if m is not None:
                a["bitmask"][rows] = m

        mode = loop_kind(a["sampling"]) if multi else batch.mode + masked
        self.shapes_run.add((mode, B, T, P))
        out = self._run(bank, a, None if bitmask is None else fill_mask)
        if multi:  # [B, k, ...] rows: the loop's leading step axis moves second
            out = tuple(np.moveaxis(x, 0, 1)[rows] for x in (out if isinstance(out, tuple) else (out,)))
            return StepOutput(out[0], *(out[1:] if len(out) > 1 else (None,) * 3), np.asarray(steps))
        token, logp, top_ids, top_lp = (x[:, None][rows] for x in out)  # a single step: k = 1
        return StepOutput(token, logp, top_ids, top_lp, np.asarray(steps))
