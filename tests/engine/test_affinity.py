"""Adapter-affinity admission (pure Python): resident adapters first, a blocked adapter passed over, and the age bound."""

import numpy as np
import pytest

from jlora.engine.block_manager import PageAllocator
from jlora.engine.scheduler import Scheduler, SchedulerConfig
from jlora.engine.sequence import Sequence, Status
from jlora.sampling import SamplingParams


class Clock:
    def __init__(self):
        self.now = 0.0

    def __call__(self):
        return self.now


def _scheduler(mode, *, slots=1, resident=(), max_num_seqs=8, max_wait=2.0, clock=None):
    """A scheduler whose device holds `slots` adapters at once."""
    return Scheduler(SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=1000, lora_scheduling=mode,
                                     affinity_max_wait_s=max_wait),
                     PageAllocator(256, 4), adapters_fit=lambda names: len(names) <= slots,
                     adapter_resident=lambda name: name in resident, clock=clock or Clock())


def _add(scheduler, adapters, at=0.0):
    seqs = [Sequence(f"{a}-{i}", [1, 2, 3], SamplingParams(max_tokens=4), adapter=a, arrival_time=at)
            for i, a in enumerate(adapters)]
    for seq in seqs:
        scheduler.add(seq)
    return seqs


def _run(batch):
    """What the engine does with a step's results: the chunks are cached; a finished prompt samples a token."""
    for seq, chunk in zip(batch.seqs, batch.chunks):
        seq.num_computed += chunk
        if seq.remaining == 0:
            seq.output_ids.append(1)


def _step(scheduler):
    batch = scheduler.schedule()
    if batch is not None:
        _run(batch)
    return batch


def _admitted(scheduler):
    """The requests one step admits (a prefill step), or none."""
    batch = _step(scheduler)
    return [] if batch is None or batch.mode != "prefill" else [s.request_id for s in batch.seqs]


def test_fifo_stalls_behind_an_adapter_that_does_not_fit_and_affinity_passes_it():
    for mode, want in [("fifo", ["x-0"]), ("affinity", ["x-0", "x-2"])]:
        s = _scheduler(mode, slots=1)
        _add(s, ["x", "y", "x"])  # one slot: y cannot join x's batch
        assert _admitted(s) == want, mode


def test_resident_adapters_and_the_base_go_first_in_queue_order():
    s = _scheduler("affinity", slots=4, resident={"hot"}, max_num_seqs=3)
    _add(s, ["cold", "hot", None, "cold", "hot"])
    assert _admitted(s) == ["hot-1", "None-2", "hot-4"]
    assert [q.request_id for q in s.waiting] == ["cold-0", "cold-3"]  # the queue keeps its order
    fifo = _scheduler("fifo", slots=4, resident={"hot"}, max_num_seqs=3)
    _add(fifo, ["cold", "hot", None, "cold", "hot"])
    assert _admitted(fifo) == ["cold-0", "hot-1", "None-2"]


def test_an_adapter_in_the_running_batch_counts_as_hot():
    s = _scheduler("affinity", slots=4, max_num_seqs=2)
    (run,) = _add(s, ["b"])
    assert _admitted(s) == ["b-0"] and run.status is Status.RUNNING
    _add(s, ["a", "b"])
    assert _admitted(s) == ["b-1"]  # one seat left: b's second request takes it ahead of a's


def test_an_overdue_request_goes_first_and_nothing_passes_it():
    clock = Clock()
    s = _scheduler("affinity", slots=1, resident={"y"}, max_wait=2.0, clock=clock)
    (hold,) = _add(s, ["x"], at=0.0)
    assert _admitted(s) == ["x-0"]  # x now holds the one slot
    _add(s, ["y", "y"], at=0.5)
    clock.now = 1.0  # y is resident but cannot join x's batch: it waits
    assert _step(s).mode == "decode"
    late = Sequence("z", [1, 2], SamplingParams(max_tokens=4), adapter=None, arrival_time=1.0)
    s.add(late)
    clock.now = 2.0  # the y requests are not overdue yet; z (base) may pass them
    assert _admitted(s) == ["z"]
    s.remove(hold)
    clock.now = 2.6  # both y requests overdue now: first, in queue order
    assert _admitted(s) == ["y-0", "y-1"]


def test_an_overdue_request_that_does_not_fit_blocks_the_queue_as_fifo_does():
    clock = Clock()
    s = _scheduler("affinity", slots=1, max_wait=1.0, clock=clock)
    _add(s, ["x"], at=0.0)
    assert _admitted(s) == ["x-0"]
    _add(s, ["y"], at=0.0)
    _add(s, [None], at=5.0)
    clock.now = 5.0  # y is overdue and cannot fit: the base request behind it must not pass it
    assert _step(s).mode == "decode"


def _simulate(mode, arrivals, names, lengths, *, max_wait, slots=2, dt=0.1):
    """Runs the scheduler over timed arrivals (one step per `dt`); returns (admission time of each request, the
    number of adapters that became resident over the run)."""
    clock = Clock()
    device = []  # the adapters in the device slots, most recently used last
    s = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64, lora_scheduling=mode,
                                  affinity_max_wait_s=max_wait),
                  PageAllocator(512, 4), adapters_fit=lambda names: len(names) <= slots,
                  adapter_resident=lambda name: name in device, clock=clock)
    pending, when, last, loads = list(range(len(arrivals))), {}, set(), 0
    while pending or s.has_work():
        while pending and arrivals[pending[0]] <= clock.now + 1e-9:
            i = pending.pop(0)
            s.add(Sequence(str(i), [1] * int(lengths[i]), SamplingParams(max_tokens=3), adapter=names[i],
                           arrival_time=float(arrivals[i])))
        batch = _step(s)
        if batch is not None:
            for seq in batch.seqs:
                when.setdefault(int(seq.request_id), clock.now)
                if seq.adapter in device:
                    device.remove(seq.adapter)
                device.append(seq.adapter)
                del device[:-slots]
                if len(seq.output_ids) >= seq.sampling.max_tokens:
                    s.remove(seq)
            resident = {q.adapter for q in s.running}
            loads += len(resident - last)
            last = resident
        clock.now += dt
    return when, loads


def test_affinity_loads_fewer_adapters_and_delays_no_request_past_the_bound():
    """Bursty traffic over 6 adapters with 2 device slots: affinity makes fewer adapters resident over the run than
    FIFO (fewer distinct adapters per step), and admits every request at most the bound (plus a step) after FIFO."""
    rng = np.random.default_rng(0)
    arrivals = np.sort(rng.uniform(0, 2, 80))
    names = [f"a{int(i)}" for i in rng.zipf(1.6, 80) % 6]
    lengths = rng.integers(2, 30, 80)
    fifo, fifo_loads = _simulate("fifo", arrivals, names, lengths, max_wait=1.0)
    aff, aff_loads = _simulate("affinity", arrivals, names, lengths, max_wait=1.0)
    assert sorted(fifo) == sorted(aff) == list(range(80))
    assert aff_loads < fifo_loads
    assert max(aff[i] - fifo[i] for i in fifo) <= 1.0 + 0.1 + 1e-9


def test_the_bound_ends_starvation_under_a_steady_stream_of_a_resident_adapter():
    """One slot, a request for a cold adapter at t=0 and a hot adapter's requests arriving every step for 10 s:
    without a bound the cold one waits for the stream to end; with a 1 s bound it goes once the hot batch drains."""
    arrivals = [0.0, 0.0] + [0.1 * k for k in range(1, 100)]
    names = ["hot", "cold"] + ["hot"] * 99  # the hot adapter comes first and takes the slot
    lengths = [4] * 101
    unbounded, _ = _simulate("affinity", arrivals, names, lengths, max_wait=1e9, slots=1)
    bounded, _ = _simulate("affinity", arrivals, names, lengths, max_wait=1.0, slots=1)
    fifo, _ = _simulate("fifo", arrivals, names, lengths, max_wait=1.0, slots=1)
    assert unbounded[1] > 9.0  # starved while the stream lasted
    assert 1.0 <= bounded[1] <= 1.0 + 0.5  # overdue at 1.0 s, then the running hot requests finish (3 tokens each)
    assert fifo[1] <= bounded[1]


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="lora_scheduling must be one of fifo, affinity"):
        SchedulerConfig(lora_scheduling="lottery")
    with pytest.raises(ValueError, match="affinity_max_wait_s"):
        SchedulerConfig(affinity_max_wait_s=-1.0)


def test_engine_with_affinity_generates_what_fifo_does_with_fewer_adapter_loads(tiny):
    """The tiny engine, r6 and r8 sharing bucket 8's one slot: greedy outputs equal FIFO's, every request finishes,
    and fewer adapters are written into slots."""
    from jlora.config import LoraBankConfig
    from jlora.engine.engine import Engine, EngineConfig

    bank = LoraBankConfig(buckets=(4, 8, 16, 32), slots=(3, 1, 2, 1))

    rng = np.random.default_rng(1)
    names = ["r6", "r8", "r6", "r12", "r8", "r6", "r12", "r6"] * 2
    requests = [(rng.integers(0, 97, rng.integers(2, 12)).tolist(), a) for a in names]
    runs = {}
    for mode in ("fifo", "affinity"):
        engine = Engine(tiny["model"], None, EngineConfig(
            max_num_seqs=8, max_num_batched_tokens=64, max_prefill_chunk=32, page_size=4, num_pages=64,
            max_model_len=64, bank=bank, lora_scheduling=mode, lora_affinity_max_wait_s=60.0))
        for name in ("r6", "r8", "r12"):
            engine.store.register(name, tiny["adapters"][name])
        for i, (prompt, adapter) in enumerate(requests):
            engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=4), adapter, request_id=f"q{i}")
        done = {}
        while engine.has_unfinished():
            done.update((o.request_id, o.token_ids) for o in engine.step() if o.finished)
        runs[mode] = done, engine.store.stats.device_misses
    assert runs["fifo"][0] == runs["affinity"][0] and len(runs["fifo"][0]) == len(requests)
    assert runs["affinity"][1] < runs["fifo"][1], (runs["affinity"][1], runs["fifo"][1])


def test_serve_flags_reach_the_engine(capsys):
    from jlora.cli import build_parser
    from jlora.serve.cli import config_from_args

    parse = build_parser().parse_args
    default = config_from_args(parse(["serve"])).engine_config()
    assert (default.lora_scheduling, default.lora_affinity_max_wait_s) == ("fifo", 2.0)
    chosen = config_from_args(parse(["serve", "--lora-scheduling", "affinity", "--lora-affinity-max-wait", "0.5"]))
    assert (chosen.engine_config().lora_scheduling, chosen.engine_config().lora_affinity_max_wait_s) == ("affinity", 0.5)
    with pytest.raises(SystemExit):
        parse(["serve", "--lora-scheduling", "random"])
    assert "invalid choice: 'random'" in capsys.readouterr().err
