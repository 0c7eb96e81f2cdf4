"""Continuous batching: which sequences run this step. Pure Python (no JAX).

Each step is either a prefill step (chunks of prompts, up to `max_num_batched_tokens`) or a decode step (one
token for every running sequence, or up to `num_scheduler_steps` tokens in one call when pages allow: the host's
work is then paid once for several tokens). Prefill goes first when there is waiting work. When pages run out during
decode, the newest running sequence is preempted: its pages are freed and it is recomputed later from its tokens
(with prefix caching, from the first of its pages that is no longer cached).

Admission is FIFO by default. With `lora_scheduling="affinity"`, waiting requests whose adapter is already on the
device or in the running batch go first, and a request whose adapter cannot join the batch now is passed over instead
of stalling the queue behind it. A request that has waited `affinity_max_wait_s` is overdue: overdue requests go first,
in queue order, and nothing passes one that cannot be admitted yet, so from then on it waits only as it would at the
head of a FIFO queue.

A structured sequence (`Sequence.structured`: its output follows a grammar) samples only in one-token decode steps,
where the host computes each token's mask before the step: its prefill stops one token short of the end (the decode
step computes that token and samples), and a decode batch holding one runs one token per sequence.
"""

from __future__ import annotations

import collections
import dataclasses
import time
from typing import Callable

from jlora.engine.block_manager import PageAllocator
from jlora.engine.sequence import Sequence, Status


@dataclasses.dataclass(frozen=True)
class SchedulerConfig:
    max_num_seqs: int = 64
    max_num_batched_tokens: int = 2048
    max_prefill_chunk: int = 512  # longest chunk of one prompt per step, so long prompts are chunked
    num_scheduler_steps: int = 1  # most decode tokens per sequence in one step
    lora_scheduling: str = "fifo"  # "fifo", or "affinity": admit requests whose adapters are resident first
    affinity_max_wait_s: float = 2.0  # with "affinity": a request waiting this long is admitted in FIFO order

    def __post_init__(self):
        for name in ("max_num_seqs", "max_num_batched_tokens", "max_prefill_chunk", "num_scheduler_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"SchedulerConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.lora_scheduling not in LORA_SCHEDULING:
            raise ValueError(f"lora_scheduling must be one of {', '.join(LORA_SCHEDULING)}, "
                             f"got {self.lora_scheduling!r}")
        if not self.affinity_max_wait_s >= 0:
            raise ValueError(f"affinity_max_wait_s must be >= 0, got {self.affinity_max_wait_s}")


LORA_SCHEDULING = ("fifo", "affinity")


@dataclasses.dataclass
class ScheduledBatch:
    """One step's work: `chunks[i]` new tokens of `seqs[i]` starting at `seqs[i].num_computed`. A decode step samples
    `steps[i]` tokens for seqs[i], each fed to the next, in one multi-step call; with steps None (prefill, or pages
    too short for more) it samples one token each in a one-step call."""

    mode: str  # "prefill" or "decode"
    seqs: list[Sequence]
    chunks: list[int]
    preempted: list[Sequence] = dataclasses.field(default_factory=list)
    steps: list[int] | None = None


class Scheduler:
    """Queues and budgets.

    Args:
      config: the budgets.
      allocator: the KV page pool.
      adapters_fit: callback(set of adapter names) -> whether they can all be resident at once.
      prefill_fits: callback(sequences, longest chunk) -> whether a prefill step of that shape may run (the
        runner bounds its padded rows, `ModelRunner.prefill_fits`).
      adapter_resident: callback(adapter) -> whether it is on the device now (used by affinity admission).
      clock: seconds, on the clock of `Sequence.arrival_time`.
    """

    def __init__(self, config: SchedulerConfig, allocator: PageAllocator,
                 adapters_fit: Callable[[set[str]], bool] = lambda names: True,
                 prefill_fits: Callable[[int, int], bool] = lambda num_seqs, longest: True,
                 adapter_resident: Callable[[str], bool] = lambda name: False,
                 clock: Callable[[], float] = time.perf_counter):
        self.config, self.allocator, self.adapters_fit = config, allocator, adapters_fit
        self.prefill_fits, self.adapter_resident, self.clock = prefill_fits, adapter_resident, clock
        self.waiting: collections.deque[Sequence] = collections.deque()
        self.running: list[Sequence] = []
        self._order = 0

    def add(self, seq: Sequence) -> None:
        seq.status = Status.WAITING
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def remove(self, seq: Sequence) -> None:
        """Drops a finished or aborted sequence and frees its pages at once."""
        if seq in self.running:
            self.running.remove(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self.allocator.free(seq)

    def schedule(self) -> ScheduledBatch | None:
        preempted = []
        while True:
            batch = self._schedule_prefill() or self._schedule_decode()
            if batch is not None or not self.running:
                break
            # Running prompts hold every page and none can grow: recompute the newest later.
            victim = max(self.running, key=lambda s: s.order)
            self._preempt(victim)
            preempted.append(victim)
        if batch is not None:
            batch.preempted = preempted + batch.preempted
        return batch

    def _adapters(self, seqs) -> set[str]:
        return {s.adapter for s in seqs if s.adapter is not None}

    def _schedule_prefill(self) -> ScheduledBatch | None:
        budget = self.config.max_num_batched_tokens
        seqs, chunks = [], []
        # Sequences already running but not fully prefilled continue first, then waiting ones are admitted.
        affinity = self.config.lora_scheduling == "affinity"
        waiting = self._affinity_order() if affinity else list(self.waiting)
        candidates = [s for s in self.running if s.remaining > 1] + waiting
        for seq in candidates:
            if budget <= 0 or len(seqs) >= self.config.max_num_seqs:
                break
            admitting = seq.status is Status.WAITING
            waiting_in_batch = sum(s.status is Status.WAITING for s in seqs)
            if admitting and len(self.running) + waiting_in_batch >= self.config.max_num_seqs:
                break
            if admitting and not self.adapters_fit(self._adapters(self.running + seqs + [seq])):
                if affinity and not self._overdue(seq):
                    continue  # its adapter must wait for a slot; requests behind it may still join
                break
            # An admitted sequence starts after the longest cached prefix of its tokens (if prefix caching is on).
            prefix = self.allocator.match(seq, lambda start: self._chunk(seq, start, budget)) if admitting else None
            start = prefix.num_tokens if admitting else seq.num_computed
            chunk = self._chunk(seq, start, budget)
            if chunk == 0:  # structured, all but its last token cached: it joins the next decode step
                self.allocator.reserve(seq, start, prefix)  # its cached pages alone: never short
                seq.num_computed = start
                self._admit(seq)
                continue
            if seqs and not self.prefill_fits(len(seqs) + 1, max(chunks + [chunk])):
                break  # the rest wait for the next step, in order
            if not self.allocator.reserve(seq, start + chunk, prefix):
                break
            seq.num_computed = start
            seqs.append(seq)
            chunks.append(chunk)
            budget -= chunk
        if not seqs:
            return None
        for seq in seqs:
            if seq.status is Status.WAITING:
                self._admit(seq)
        return ScheduledBatch("prefill", seqs, chunks)

    def _admit(self, seq: Sequence) -> None:
        self.waiting.remove(seq)
        seq.status = Status.RUNNING
        self._order += 1
        seq.order = self._order
        self.running.append(seq)

    def _overdue(self, seq: Sequence) -> bool:
        return self.clock() - seq.arrival_time >= self.config.affinity_max_wait_s

    def _affinity_order(self) -> list[Sequence]:
        """Waiting sequences: overdue ones first, then those whose adapter is resident, in the batch or none, then
        the rest; in queue order within each group."""
        hot = self._adapters(self.running)

        def group(seq: Sequence) -> int:
            if self._overdue(seq):
                return 0
            return 1 if seq.adapter is None or seq.adapter in hot or self.adapter_resident(seq.adapter) else 2
        return sorted(self.waiting, key=group)  # sorted() is stable: queue order within a group

    def _chunk(self, seq: Sequence, start: int, budget: int) -> int:
        """The prefill chunk of `seq` from token `start`. A chunk that reaches the end samples a token, so decode
        needs nothing more until then; a structured sequence's stops one short (its decode step samples)."""
        return min(seq.num_tokens - start - int(seq.structured), budget, self.config.max_prefill_chunk)

    def _schedule_decode(self) -> ScheduledBatch | None:
        preempted = []
        while True:
            ready = [s for s in self.running if s.remaining == 1][:self.config.max_num_seqs]
            # Several tokens per sequence where pages allow (never past max_tokens) and no sequence is structured,
            # else one before preempting.
            steps = [max(1, min(self.config.num_scheduler_steps, s.tokens_left)) for s in ready]
            if not any(s.structured for s in ready) and self.allocator.can_grow(ready, [k - 1 for k in steps]):
                break
            steps = None  # one token each, through the one-step program
            if self.allocator.can_grow(ready) or not self.running:
                break
            victim = max(self.running, key=lambda s: s.order)
            self._preempt(victim)
            preempted.append(victim)
        for seq, k in zip(ready, steps or [1] * len(ready)):
            ok = self.allocator.reserve(seq, seq.num_tokens + k - 1)
            assert ok, "pages were counted before reserving"
        if not ready:
            return ScheduledBatch("decode", [], [], preempted) if preempted else None
        return ScheduledBatch("decode", ready, [1] * len(ready), preempted, steps)

    def preempt(self, seq: Sequence) -> None:
        """Sends a scheduled sequence back to the front of the queue (its pages freed, recomputed later)."""
        if seq in self.running:
            self._preempt(seq)
        elif seq in self.waiting:
            self.allocator.free(seq)
            seq.num_computed = 0

    def _preempt(self, seq: Sequence) -> None:
        """Frees a sequence's pages; it goes back to the front of the queue and is recomputed from its tokens."""
        self.running.remove(seq)
        self.allocator.free(seq)
        seq.num_computed = 0
        seq.num_preemptions += 1
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)
