"""Multi-step decode scheduling (pure Python): tokens per sequence and the pages reserved for them."""

from jlora.engine.block_manager import PageAllocator
from jlora.engine.scheduler import Scheduler, SchedulerConfig
from jlora.engine.sequence import Sequence, Status
from jlora.sampling import SamplingParams


def _running(scheduler, prompt_len, max_tokens, rid):
    seq = Sequence(rid, list(range(prompt_len)), SamplingParams(max_tokens=max_tokens))
    seq.output_ids = [1]  # prefilled and sampled once: the next step is a decode step
    seq.num_computed = seq.num_tokens - 1
    assert scheduler.allocator.reserve(seq, seq.num_tokens)
    seq.status = Status.RUNNING
    scheduler.running.append(seq)
    return seq


def test_decode_steps_stop_at_max_tokens_and_reserve_their_pages():
    scheduler = Scheduler(SchedulerConfig(num_scheduler_steps=8), PageAllocator(64, 4))
    short = _running(scheduler, 7, max_tokens=4, rid="short")  # 3 tokens left
    long = _running(scheduler, 7, max_tokens=50, rid="long")
    batch = scheduler.schedule()
    assert batch.mode == "decode" and batch.seqs == [short, long] and batch.steps == [3, 8]
    # the last step of k caches token num_tokens + k - 2, so the pages hold num_tokens + k - 1 tokens
    assert len(short.pages) == -(-(8 + 3 - 1) // 4) and len(long.pages) == -(-(8 + 8 - 1) // 4)


def test_decode_falls_back_to_one_token_when_pages_are_short():
    scheduler = Scheduler(SchedulerConfig(num_scheduler_steps=8), PageAllocator(6, 4))
    a = _running(scheduler, 7, max_tokens=50, rid="a")  # 8 tokens in 2 full pages each: 2 pages free
    b = _running(scheduler, 7, max_tokens=50, rid="b")
    batch = scheduler.schedule()  # 8 tokens each would need 2 more pages each; one each needs none
    assert batch.seqs == [a, b] and batch.steps is None and not batch.preempted
    assert len(a.pages) == len(b.pages) == 2 and scheduler.allocator.num_free == 2
    scheduler.allocator.check_invariants([a, b])


def test_one_step_scheduler_is_unchanged():
    scheduler = Scheduler(SchedulerConfig(), PageAllocator(64, 4))
    _running(scheduler, 7, max_tokens=50, rid="a")
    assert scheduler.schedule().steps == [1]


def _waiting(scheduler, lengths):
    seqs = [Sequence(f"w{i}", list(range(n)), SamplingParams(max_tokens=4)) for i, n in enumerate(lengths)]
    for seq in seqs:
        scheduler.add(seq)
    return seqs


def test_prefill_stops_at_the_runners_row_budget_in_order():
    asked = []

    def fits(num_seqs, longest):
        asked.append((num_seqs, longest))
        return num_seqs * longest <= 64

    scheduler = Scheduler(SchedulerConfig(max_num_batched_tokens=1000), PageAllocator(256, 4), prefill_fits=fits)
    seqs = _waiting(scheduler, [10, 20, 30, 5])
    batch = scheduler.schedule()
    # 2 x 20 fits; 3 x 30 does not, so the third waits, and the fourth (which would fit) stays behind it
    assert batch.mode == "prefill" and batch.seqs == seqs[:2] and batch.chunks == [10, 20]
    assert asked == [(2, 20), (3, 30)] and list(scheduler.waiting) == seqs[2:]
    assert not seqs[2].pages  # nothing was reserved for the sequence that did not fit


def test_prefill_always_runs_one_sequence():
    scheduler = Scheduler(SchedulerConfig(), PageAllocator(256, 4), prefill_fits=lambda n, longest: False)
    seqs = _waiting(scheduler, [40, 3])
    batch = scheduler.schedule()
    assert batch.seqs == seqs[:1] and list(scheduler.waiting) == seqs[1:]


def test_structured_sequences_sample_only_in_one_token_decode_steps():
    """A structured sequence's prefill stops one token short (its decode step samples); a one-token prompt is
    admitted straight to decode; a decode batch holding one runs one token per sequence, its neighbours too."""
    from jlora.structured import StructuredOutput
    json_object = SamplingParams(max_tokens=50, structured=StructuredOutput("json_object"))
    scheduler = Scheduler(SchedulerConfig(num_scheduler_steps=8), PageAllocator(64, 4))
    plain = _running(scheduler, 7, max_tokens=50, rid="plain")
    long, one = Sequence("long", list(range(9)), json_object), Sequence("one", [5], json_object)
    scheduler.add(long)
    scheduler.add(one)
    batch = scheduler.schedule()
    assert batch.mode == "prefill" and batch.seqs == [long] and batch.chunks == [8]
    assert one.status is Status.RUNNING and one.num_computed == 0 and not one.pages  # nothing to prefill
    long.num_computed += 8
    batch = scheduler.schedule()
    assert batch.mode == "decode" and set(batch.seqs) == {plain, long, one} and batch.steps is None
    assert len(one.pages) == 1
    scheduler.allocator.check_invariants([plain, long, one])
