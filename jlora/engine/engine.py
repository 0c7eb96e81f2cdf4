"""The engine: requests in, a scheduled step, streamed outputs out.

One step: schedule (pure Python) -> make the batch's adapters resident -> one jitted paged forward with on-device
sampling (for decode, up to `num_scheduler_steps` forwards, each fed the last one's tokens on the device; with
structured rows, the forward and then the sampling, the host filling the rows' grammar bitmasks in between, while
the forward runs) -> one device-to-host copy -> matchers, stop checks, incremental
detokenization (`output_processor`), page frees.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
import logging
import secrets
import time


from jlora.config import LoraBankConfig, RuntimeConfig
from jlora.engine import memory, mesh
from jlora.engine.adapter_store import AdapterStore
from jlora.engine.block_manager import PageAllocator
from jlora.engine.grammars import Grammars
from jlora.engine.memory import MemoryPlan, plan_memory
from jlora.engine.metrics import engine_metrics
from jlora.engine.logprobs import PromptScorer, check_logprobs
from jlora.engine.model_runner import ModelRunner
from jlora.engine.output_processor import OutputProcessor
from jlora.engine.outputs import RequestOutput, cause as _cause
from jlora.engine.penalty_slots import PenaltySlots, host_row
from jlora.engine.prefix_cache import PrefixCache
from jlora.engine.siblings import Siblings
from jlora.engine.scheduler import Scheduler, SchedulerConfig
from jlora.engine.sequence import Sequence, Status
from jlora.errors import AdapterError, CapacityError, RequestError, UnknownAdapterError
from jlora.sampling import MAX_LOGIT_BIAS, SamplingParams

log = logging.getLogger("jlora.engine")


@dataclasses.dataclass(frozen=True)
class EngineConfig:
    """Engine sizes. With `memory_bytes` set, KV pages and adapter slots are carved out of that one budget
    (`adapter_memory_fraction` of it for the bank); otherwise `num_pages` and `bank` are used as given."""

    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512
    page_size: int = 16
    num_pages: int = 512
    max_model_len: int | None = None
    memory_bytes: int | None = None
    adapter_memory_fraction: float = 0.1
    # Instead of memory_bytes: fill this fraction of JAX's memory pool on the device (`memory.device_memory_limit`)
    # with the weights, a bound on a step's activations, and KV pages + adapter slots (one device; GPU or TPU).
    memory_pool_fraction: float | None = None
    bank: LoraBankConfig = LoraBankConfig()
    max_cpu_loras: int = 64
    adapter_roots: tuple[str, ...] | None = None
    runtime: RuntimeConfig = RuntimeConfig()  # kernel and layout switches; a static argument of every step program
    num_logprobs: int = 20  # top logprobs a step computes for the rows that ask (the most a request may ask)
    # Decode tokens per sequence per engine step, sampled in one device call: the host's per-step work (scheduling,
    # batch building, dispatch, output handling) is paid once for all of them. Outputs then stream in bursts of up to
    # this many tokens, and a new request waits up to that many decode steps before its prefill.
    num_scheduler_steps: int = 8
    tp: int = 1  # tensor-parallel degree: the "model" axis of the mesh
    dp: int = 1  # data-parallel degree: the "data" axis of the mesh; each replica gets num_pages / dp pages
    # Share full KV pages between requests whose tokens and adapter registration match (`prefix_cache`).
    enable_prefix_caching: bool = True
    # Admission order when more requests wait than fit: "fifo", or "affinity" (requests whose adapter is resident or
    # running go first; one waiting `lora_affinity_max_wait_s` goes first again and nothing passes it; `scheduler.py`).
    lora_scheduling: str = "fifo"
    lora_affinity_max_wait_s: float = 2.0

    def __post_init__(self):
        if self.tp < 1 or self.dp < 1:
            raise ValueError(f"EngineConfig.tp and .dp must be >= 1, got tp={self.tp}, dp={self.dp}")
        if self.num_scheduler_steps < 1:
            raise ValueError(f"EngineConfig.num_scheduler_steps must be >= 1, got {self.num_scheduler_steps}")
        if self.memory_pool_fraction is not None:
            if not 0 < self.memory_pool_fraction <= 1:
                raise ValueError(f"EngineConfig.memory_pool_fraction must be in (0, 1], got {self.memory_pool_fraction}")
            if self.memory_bytes is not None or self.tp * self.dp > 1:
                raise ValueError("EngineConfig.memory_pool_fraction sizes one device and replaces memory_bytes: "
                                 "with tp, dp or memory_bytes set, size the engine by num_pages or memory_bytes")


class Engine:
    def __init__(self, model, tokenizer, config: EngineConfig = EngineConfig(), donate_weights: bool = False):
        """Args: model (`Llama`), tokenizer, config; donate_weights: the engine may delete the model's stacked weight
        arrays once it holds its per-layer copies (GPU), which leaves `model` unusable (`LLM` and `jlora serve`
        pass True)."""
        self.model_config, self.tokenizer, self.config = model.config, tokenizer, config
        dtype = model.dtype
        self.max_model_len = min(config.max_model_len or model.config.max_position_embeddings,
                                 model.config.max_position_embeddings)
        if config.memory_pool_fraction is not None:
            config = self.config = memory.fill_pool(model.config, model.params(), config, dtype)
        self.plan: MemoryPlan = plan_memory(model.config, config, dtype)
        sharded = mesh.sharded_model(model.config, config.tp, config.dp) if config.tp * config.dp > 1 else None
        if config.dp > 1:  # each data replica owns an equal block of pages
            if self.plan.num_pages < config.dp:
                raise ValueError(f"{self.plan.num_pages} KV pages cannot be split over dp={config.dp} replicas")
            self.plan = dataclasses.replace(self.plan, num_pages=self.plan.num_pages // config.dp * config.dp)
        self.grammars = Grammars(tokenizer, model.config.vocab_size)
        self.store = AdapterStore(model.config, self.plan.bank, roots=config.adapter_roots,
                                  max_cpu_loras=config.max_cpu_loras, dtype=dtype,
                                  layout=mesh.MeshBankLayout(sharded) if sharded else None)
        self.allocator = PageAllocator(self.plan.num_pages, config.page_size, replicas=config.dp,
                                       cache=PrefixCache(config.dp) if config.enable_prefix_caching else None)
        runner_kw = dict(num_pages=self.plan.num_pages, page_size=config.page_size, max_model_len=self.max_model_len,
                         max_num_seqs=config.max_num_seqs, dtype=dtype, runtime=config.runtime,
                         num_logprobs=config.num_logprobs, donate_params=donate_weights,
                         decode_steps=config.num_scheduler_steps, max_num_batched_tokens=config.max_num_batched_tokens,
                         max_prefill_chunk=config.max_prefill_chunk,
                         bitmask_words=0 if tokenizer is None else self.grammars.words)
        if sharded is None:
            self.runner = ModelRunner(model.config, model.params(), **runner_kw)
        else:
            self.runner = mesh.MeshRunner(model.config, model.params(), model=sharded, **runner_kw)
        self.scheduler = Scheduler(SchedulerConfig(config.max_num_seqs, config.max_num_batched_tokens,
                                                   config.max_prefill_chunk, config.num_scheduler_steps,
                                                   config.lora_scheduling, config.lora_affinity_max_wait_s),
                                   self.allocator, self.store.fits, self.runner.prefill_fits,
                                   adapter_resident=lambda key: self.store.slots.slot(key) is not None)
        self.penalties = PenaltySlots(config.max_num_seqs, self.runner.spare_slot)
        self.prompt_scorer = PromptScorer()
        self.siblings = Siblings()
        self.requests: dict[str, Sequence] = {}
        self.outputs = OutputProcessor(tokenizer, self.grammars)
        self._ids = itertools.count()
        self.steps = 0
        self.preemptions = 0
        self.device_state_resets = 0  # failed steps that took the KV cache with them (`_recompute_all`)
        log.info("memory plan: %s", self.plan.describe())

    # -- requests -----------------------------------------------------------------------------------------

    def add_request(self, prompt, sampling: SamplingParams | None = None, adapter: str | None = None,
                    request_id: str | None = None, logprobs: bool = False, follows: str | None = None) -> str:
        """Queues a request (text or token ids). Raises `RequestError` (or `UnknownAdapterError`) at once for a
        bad request, which then never touches the engine's state. The request holds the adapter registration
        current now: replacing the adapter later does not change its weights. `logprobs=True` asks for the
        logprobs of each output token with the top 5 (`sampling.logprobs` sets how many, and asks too). `follows`:
        the id of a request with the same prompt and adapter (another choice of it): this one waits until that
        one's prompt is cached, so the prompt is prefilled once (`siblings`)."""
        sampling = sampling or SamplingParams()
        if not isinstance(sampling, SamplingParams):
            raise RequestError(f"sampling must be a SamplingParams, got {type(sampling).__name__}")
        if sampling.n > 1 or (sampling.best_of or 1) > 1:
            raise RequestError("the engine runs one sequence per request: expand n and best_of with "
                               "SamplingParams.choices (LLM.generate and the servers do)")
        ids = self._encode(prompt)
        check_logprobs(sampling, self.runner.num_logprobs, self.runner.processes)
        V = self.model_config.vocab_size
        bad = [i for i, _ in sampling.logit_bias if i >= V]
        if bad:
            raise RequestError(f"logit_bias names token id {bad[0]}, outside the vocabulary [0, {V})")
        if len(ids) + sampling.max_tokens > self.max_model_len:
            raise RequestError(f"prompt of {len(ids)} tokens + max_tokens {sampling.max_tokens} exceeds the "
                               f"context length {self.max_model_len}")
        pages = -(-(len(ids) + sampling.max_tokens) // self.config.page_size)
        if pages > self.allocator.pages_per_replica:
            per = " per data replica" if self.config.dp > 1 else ""
            raise RequestError(f"prompt + max_tokens needs {pages} KV pages but the pool has "
                               f"{self.allocator.pages_per_replica}{per}")
        if adapter is not None and not isinstance(adapter, str):
            raise RequestError(f"adapter must be a name (a string) or None, got {type(adapter).__name__}")
        if adapter is not None and not self.store.has(adapter):
            names = self.store.names()
            shown = ", ".join(names[:8]) + (f" and {len(names) - 8} more" if len(names) > 8 else "")
            raise UnknownAdapterError(f"adapter {adapter[:100]!r} is not loaded; loaded: {shown or 'none'}",
                                      adapter=adapter)
        request_id = request_id or f"req-{next(self._ids)}"
        if request_id in self.requests:
            raise RequestError(f"request id {request_id!r} is already in use")
        if sampling.structured is not None:
            self.grammars.add(request_id, sampling.structured)  # compiled now: a bad grammar fails here alone
        key = self.store.acquire(adapter)
        seq = Sequence(request_id, ids, sampling, key, adapter_name=adapter,
                       want_logprobs=logprobs or sampling.logprobs is not None,
                       num_top=5 if sampling.logprobs is None else sampling.logprobs,
                       sampling_seed=sampling.seed if sampling.seed is not None else secrets.randbits(31),
                       cache_salt=self.store.cache_salt(key))
        self.store.prefetch([key])
        self.requests[request_id] = seq
        self.outputs.add(seq)
        if sampling.prompt_logprobs is not None or sampling.max_tokens == 0:
            self.prompt_scorer.add(seq)  # scored (or finished) at the next step, before scheduling
        elif follows in self.requests and self.allocator.cache is not None:
            self.siblings.hold(follows, seq)
        else:
            self.scheduler.add(seq)
        return request_id


    def _encode(self, prompt) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise RequestError("this model has no tokenizer: send token ids")
            try:
                ids = self.tokenizer.encode(prompt)
            except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate: the text is at fault
                raise RequestError(f"the prompt cannot be tokenized ({type(e).__name__})") from None
        else:
            try:
                ids = list(prompt)
            except TypeError:
                raise RequestError(f"prompt must be text or a list of token ids, got {type(prompt).__name__}") \
                    from None
            if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.model_config.vocab_size
                       for t in ids):
                raise RequestError(f"token ids must be integers in [0, {self.model_config.vocab_size})")
        if not ids:
            raise RequestError("prompt is empty")
        return ids

    def abort(self, request_id: str) -> RequestOutput | None:
        """Cancels a request at any time; its pages and adapter reference are freed at once."""
        seq = self.requests.get(request_id)
        if seq is None:
            return None
        return self._finish(seq, "abort")

    def has_unfinished(self) -> bool:
        return self.scheduler.has_work() or bool(self.prompt_scorer) or bool(self.siblings)

    # -- stepping ----------------------------------------------------------------------------------------

    def step(self) -> list[RequestOutput]:
        """Runs one scheduled step and returns the requests that changed. Never raises: an exception fails only
        the requests it concerns (an adapter's files: that registration's requests; one request's outputs: that
        request; the step itself, or anything else that cannot be told apart: the step's batch), each with a
        message naming the cause, and the engine keeps serving. Requests that asked for prompt logprobs are
        scored first (`logprobs.PromptScorer`), after choices whose first choice's prompt is cached have queued."""
        for seq in self.siblings.ready(self.requests):
            self.scheduler.add(seq)
        return (self._score_prompts() if self.prompt_scorer else []) + self._step()

    def _score_prompts(self) -> list[RequestOutput]:
        """Scores the waiting prompts that ask; those with max_tokens=0 finish, the rest go to the scheduler."""
        pending = list(self.prompt_scorer.pending)
        try:
            seqs = self.prompt_scorer.run(self)
        except CapacityError:
            return []  # their adapters wait for slots: the next step tries again
        except AdapterError as e:
            return self._fail_adapter(pending, e)
        except Exception as e:  # noqa: BLE001 - which prompt caused it cannot be told
            log.exception("scoring %d prompts failed", len(pending))
            return self._fail(pending, _cause("scoring the prompt failed", e))
        outs = []
        for seq in seqs:
            if seq.sampling.max_tokens == 0:
                outs.append(self._finish(seq, "length"))
            else:
                self.scheduler.add(seq)
        return outs

    def _step(self) -> list[RequestOutput]:
        try:
            batch = self.scheduler.schedule()
        except Exception as e:  # noqa: BLE001 - a bug in the scheduler: its queues cannot be trusted
            log.exception("scheduling failed; failing the %d requests it held", len(self.requests))
            return self._fail(list(self.requests.values()), _cause("scheduling failed", e))
        if batch is None:
            return []
        self.preemptions += len(batch.preempted)
        if not batch.seqs:
            return []
        try:
            # Queued requests' adapters may give up their slots: the scheduler only checked that the running
            # sequences' adapters fit.
            slots = self.store.ensure_resident({s.adapter for s in batch.seqs if s.adapter is not None},
                                               running={s.adapter for s in self.scheduler.running if s.adapter})
        except AdapterError as e:
            return self._fail_adapter(batch.seqs, e)
        except CapacityError as e:
            return self._requeue(batch.seqs, e)
        except Exception as e:  # noqa: BLE001
            log.exception("making the step's adapters resident failed; failing its %d requests", len(batch.seqs))
            return self._fail(batch.seqs, _cause("loading the step's adapters failed", e))
        try:
            bitmask = (functools.partial(self.grammars.bitmask, batch.seqs, batch.chunks)  # filled during the forward
                       if self.grammars.constrains(batch.seqs, batch.chunks) else None)
            out = self.runner.execute(batch, slots, self.store.bank, self._penalty_slots(batch.seqs), bitmask)
        except Exception as e:  # noqa: BLE001 - which row caused it cannot be told: the batch fails
            log.exception("engine step failed; failing its %d requests", len(batch.seqs))
            failed = self._fail(batch.seqs, _cause("the engine step running this request failed", e))
            if self.runner.recover():
                self._recompute_all()
            return failed
        self.steps += 1
        now = time.perf_counter()
        changed = []
        for i, (seq, chunk) in enumerate(zip(batch.seqs, batch.chunks)):
            if seq.request_id not in self.requests:
                continue
            try:
                update = self._advance(seq, chunk, out, i, now)
                if seq.request_id in self.requests:
                    self.allocator.commit(seq)  # its pages filled by this step join the prefix cache
            except Exception as e:  # noqa: BLE001 - this request's outputs alone
                log.exception("processing the outputs of %s failed", seq.request_id)
                update = self._fail([seq], _cause("processing this request's output failed", e))[0]
            if update is not None:
                changed.append(update)
        return changed

    def _penalty_slots(self, seqs) -> list[int]:
        """The penalty slot of each of `seqs`; slots taken now are written from the host first."""
        slots, new = self.penalties.assign(seqs, self.scheduler.running)
        if new:
            V = self.model_config.vocab_size
            self.runner.write_penalty_rows([
                (self.penalties.slot(s.request_id), *host_row(s.sampling, s.prompt_ids, s.output_ids,
                                                               self.outputs.stop_ids(s.sampling), V, MAX_LOGIT_BIAS))
                for s in new])
        return slots

    def _advance(self, seq: Sequence, chunk: int, out, i: int, now: float) -> RequestOutput | None:
        """Takes row i of a step's outputs into `seq`; its output, or None for a prompt chunk short of the end."""
        taken = self.outputs.advance(seq, chunk, out, i, now)
        if taken is None:
            return None
        reason, before = taken
        return self.outputs.output(seq, before) if reason is None else self._finish(seq, reason, before)

    def _finish(self, seq: Sequence, reason: str, before: int | None = None, error: str | None = None,
                error_kind: str | None = None) -> RequestOutput:
        """Ends a request and frees its pages and adapter reference; its output with the delta since character
        `before` of its text (None: since what was last sent)."""
        seq.status, seq.finish_reason, seq.finish_time = Status.FINISHED, reason, time.perf_counter()
        try:
            if not self.prompt_scorer.remove(seq) and not self.siblings.remove(seq):
                self.scheduler.remove(seq)
        finally:
            self.store.release(seq.adapter)
            self.penalties.release(seq.request_id)
            self.grammars.remove(seq.request_id)
        out = self.outputs.finish(seq, before, error, error_kind)
        del self.requests[seq.request_id]
        return out

    def _fail(self, seqs, error: str, kind: str = "internal") -> list[RequestOutput]:
        """Fails the requests of `seqs` that still run, each with `error`; frees their pages and references."""
        outs = []
        for seq in seqs:
            if seq.request_id in self.requests:
                try:
                    outs.append(self._finish(seq, "error", error=error, error_kind=kind))
                except Exception:  # noqa: BLE001 - keep failing the others; the state is logged
                    log.exception("could not finish %s cleanly", seq.request_id)
                    self._forget(seq)
        return outs

    def _forget(self, seq: Sequence) -> None:
        """Last resort after `_finish` itself failed: drop every trace of the request."""
        self.requests.pop(seq.request_id, None)
        self.outputs.remove(seq.request_id)
        self.grammars.remove(seq.request_id)
        self.prompt_scorer.remove(seq)
        self.siblings.remove(seq)
        for queue in (self.scheduler.running, self.scheduler.waiting):
            if seq in queue:
                queue.remove(seq)

    def _fail_adapter(self, seqs, error: AdapterError) -> list[RequestOutput]:
        """An adapter's files turned out bad when first needed: fail the requests of that registration (all of
        them, queued ones too: they would fail the same way) and keep it registered, so that the client sees
        why and a fixed file serves again. The rest of the batch runs in a later step."""
        if error.identity is None:
            return self._fail(seqs, str(error), "adapter")
        log.warning("%s; failing its requests", error)
        return self._fail([s for s in self.requests.values() if s.adapter == error.identity], str(error),
                          "adapter")

    def _requeue(self, seqs, error: CapacityError) -> list[RequestOutput]:
        """The batch's adapters turned out not to fit the slots at once (a lazily registered adapter's bucket is
        only known from its weights): its sequences whose adapters are not resident go back to the queue, and
        the scheduler admits them again with the buckets now known."""
        waiting = [s for s in seqs if s.adapter is not None and self.store.slots.slot(s.adapter) is None]
        if not waiting:
            log.error("%s with every adapter resident; failing the step's batch", error)
            return self._fail(seqs, str(error))
        for seq in waiting:
            self.scheduler.preempt(seq)
        self.preemptions += len(waiting)
        return []

    def _recompute_all(self) -> None:
        """The failed step took the device's KV cache and penalty state with it (`ModelRunner.recover` allocated
        them afresh): every other request goes back to the queue, to be recomputed from its tokens, and the prefix
        cache, whose pages were lost, is emptied. Nothing is lost but the time to recompute."""
        live = list(self.scheduler.running) + [s for s in self.scheduler.waiting if s.pages or s.num_computed]
        for seq in live:
            self.scheduler.preempt(seq)
        self.preemptions += len(live)
        self.device_state_resets += 1
        dropped = self.allocator.drop_cached()
        self.penalties.clear()
        log.warning("the failed step took the KV cache with it: reallocated; %d requests requeued for recompute, "
                    "%d cached prefix pages dropped", len(live), dropped)

    def close(self) -> None:
        """Stops the adapter loader threads."""
        self.store.close()

    def warmup(self) -> int:
        """Compiles every step shape (and the adapter slot writes) now, so no request mix compiles anything
        later. Returns the number of step shapes."""
        self.store.slots.warmup()
        return self.runner.warmup(self.store.bank, self.config.max_prefill_chunk)

    # -- introspection -----------------------------------------------------------------------------------

    @property
    def tokens_generated(self) -> int:
        return self.outputs.tokens_generated

    def metrics(self) -> dict:
        return engine_metrics(self)
