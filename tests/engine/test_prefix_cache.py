"""Prefix caching: the hash chain, reference counts, LRU eviction, salts (adapters and replaced adapters), page
invariants over 2,000 random requests (pure Python, a simulated model), and the engine with the cache on and off."""

import numpy as np
import pytest
from conftest import BANK

from jlora.engine.block_manager import PageAllocator, Prefix
from jlora.engine.engine import Engine, EngineConfig
from jlora.engine.prefix_cache import ROOT, PrefixCache, block_hash, extend_hashes
from jlora.engine.scheduler import Scheduler, SchedulerConfig
from jlora.engine.sequence import Sequence, Status
from jlora.sampling import SamplingParams

PS = 4  # tokens per page in the pure-Python tests


def _scheduler(num_pages=32, replicas=1, **kw):
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=32, max_prefill_chunk=16, num_scheduler_steps=1)
    cfg.update(kw)
    allocator = PageAllocator(num_pages, PS, replicas, PrefixCache(replicas))
    return Scheduler(SchedulerConfig(**cfg), allocator)


def _seq(rid, prompt, salt="base", max_tokens=3):
    return Sequence(rid, list(prompt), SamplingParams(max_tokens=max_tokens), cache_salt=salt)


class FakeModel:
    """Runs scheduled batches as the engine would, on a shadow KV pool: the "KV" of position p is (salt, tokens up
    to p). Before a row attends, every position before its chunk must hold exactly its own (salt, tokens): a page
    shared wrongly, or overwritten, or cached before it was written, shows up here. A row only ever writes to pages
    that it alone holds and that are not cached."""

    def __init__(self, scheduler):
        self.s, self.a = scheduler, scheduler.allocator
        self.kv = {}  # (page, offset) -> (salt, tokens up to that position)

    def _kv(self, seq, pos):
        return seq.cache_salt, tuple(seq.token_ids[:pos + 1])

    def _write(self, seq, pos):
        page = seq.pages[pos // PS]
        assert self.a.ref_count(page) == 1 and not self.a.cache.is_cached(page), "a write into a shared page"
        self.kv[page, pos % PS] = self._kv(seq, pos)

    def _next_token(self, seq):  # a deterministic "model": the next token depends on the salt and all tokens
        return hash((seq.cache_salt, tuple(seq.token_ids))) % 50

    def run(self, batch) -> list:
        """Runs `batch`; returns the sequences that finished (removed from the scheduler)."""
        finished = []
        for seq, chunk, k in zip(batch.seqs, batch.chunks, batch.steps or [1] * len(batch.seqs)):
            start = seq.num_computed
            assert chunk >= 1, f"{seq.request_id} is scheduled to compute nothing: it would have no logits"
            for pos in range(start):
                assert self.kv.get((seq.pages[pos // PS], pos % PS)) == self._kv(seq, pos), \
                    f"{seq.request_id} attends to wrong KV at position {pos}"
            for pos in range(start, start + chunk):
                self._write(seq, pos)
            seq.num_computed += chunk
            if seq.num_computed < seq.num_tokens:
                self.a.commit(seq)
                continue
            for i in range(k):
                if i:
                    self._write(seq, seq.num_computed)
                    seq.num_computed += 1
                seq.output_ids.append(self._next_token(seq))
                if len(seq.output_ids) >= seq.sampling.max_tokens:
                    break
            if len(seq.output_ids) >= seq.sampling.max_tokens:
                seq.status = Status.FINISHED
                self.s.remove(seq)
                finished.append(seq)
            else:
                self.a.commit(seq)
        return finished


def _live(scheduler):
    return scheduler.running + list(scheduler.waiting)


def _drain(scheduler, model, seqs):
    for seq in seqs:
        scheduler.add(seq)
    while scheduler.has_work():
        batch = scheduler.schedule()
        model.run(batch)
        scheduler.allocator.check_invariants(_live(scheduler))


# -- the hash chain ------------------------------------------------------------------------------------------------

def test_hash_chain_keys_depend_on_every_earlier_token_and_the_salt():
    tokens = list(range(12))
    a, b, c, d = [], [], [], []
    extend_hashes(a, tokens, PS, "base", 3)
    extend_hashes(b, tokens[:8] + [99, 9, 10, 11], PS, "base", 3)  # differs in block 2 only
    extend_hashes(c, [99] + tokens[1:], PS, "base", 3)  # differs in block 0: no key in common
    extend_hashes(d, tokens, PS, "adapter:1", 3)
    assert a[0] == block_hash(ROOT, tokens[:4], "base") and a[1] == block_hash(a[0], tokens[4:8], "base")
    assert a[:2] == b[:2] and a[2] != b[2]
    assert not set(a) & set(c) and not set(a) & set(d)
    # the same block after another parent is another key; extending keeps what is there
    assert block_hash(ROOT, tokens[4:8], "base") != a[1]
    e = a[:1]
    extend_hashes(e, tokens, PS, "base", 3)
    assert e == a
    with pytest.raises(ValueError, match="num_blocks"):
        extend_hashes([], tokens, PS, "base", 4)


# -- sharing and reference counts ---------------------------------------------------------------------------------

def test_second_request_starts_after_the_shared_prefix_and_shares_its_pages():
    s = _scheduler()
    model = FakeModel(s)
    first = _seq("a", range(10), max_tokens=20)
    s.add(first)
    model.run(s.schedule())  # prompt prefilled: its 2 full pages are committed
    assert s.allocator.num_cached == 2 and first.num_cached_pages == 2
    second = _seq("b", list(range(8)) + [40, 41, 42])
    s.add(second)
    batch = s.schedule()
    assert batch.mode == "prefill" and batch.seqs == [second] and batch.chunks == [3]
    assert second.num_computed == 8 and second.pages[:2] == first.pages[:2]
    assert [s.allocator.ref_count(p) for p in second.pages] == [2, 2, 1]
    assert s.allocator.cache.stats.hit_tokens == 8 and s.allocator.cache.stats.query_tokens == 10 + 11
    s.allocator.check_invariants([first, second])
    model.run(batch)
    s.remove(first)
    assert [s.allocator.ref_count(p) for p in second.pages[:2]] == [1, 1]
    s.allocator.check_invariants([second])


def test_a_prompt_cached_in_full_recomputes_its_last_page():
    s = _scheduler()
    model = FakeModel(s)
    _drain(s, model, [_seq("a", range(8))])
    assert s.allocator.num_cached == 2  # 8 prompt tokens and 2 of the 3 outputs computed: 2 full pages
    again = _seq("b", range(8))
    s.add(again)
    batch = s.schedule()
    assert again.num_computed == 4 and batch.chunks == [4]  # one page hit; the last page is computed for logits
    model.run(batch)
    s.allocator.check_invariants([again])


def test_salts_separate_adapters_and_registrations():
    s = _scheduler()
    model = FakeModel(s)
    prompt = list(range(13))
    _drain(s, model, [_seq("base", prompt)])
    for salt in ("adapter:1", "adapter:2", "adapter:3"):  # other adapters, or a replaced one: never a hit
        seq = _seq(salt, prompt, salt)
        s.add(seq)
        s.schedule()
        assert seq.num_computed == 0
        s.remove(seq)
    assert s.allocator.cache.stats.hit_tokens == 0
    seq = _seq("base-again", prompt)
    s.add(seq)
    s.schedule()
    assert seq.num_computed == 12 and s.allocator.cache.stats.hit_tokens == 12


def test_eviction_order_is_exact():
    """Hand-counted: pages released a1 a0 b1 b0 (each sequence's last page first) are evicted in that order."""
    alloc = PageAllocator(4, PS, 1, PrefixCache(1))
    a, b = _seq("a", range(8)), _seq("b", range(10, 18))
    for seq in (a, b):
        assert alloc.reserve(seq, 8)
        seq.num_computed = 8
    assert a.pages == [0, 1] and b.pages == [2, 3]
    alloc.free(a)
    alloc.free(b)
    assert alloc.cache.parked_pages(0) == [1, 0, 3, 2] and alloc.num_free == 4 and alloc.num_cached == 4
    c = _seq("c", range(20, 32))
    assert alloc.reserve(c, 12)  # 3 pages, none free: the 3 least recently released are evicted
    assert c.pages == [1, 0, 3] and alloc.cache.parked_pages(0) == [2] and alloc.cache.stats.evictions == 3
    alloc.check_invariants([c])
    assert not alloc.reserve(_seq("d", range(40, 48)), 8)  # one page left
    alloc.check_invariants([c])


def test_a_hit_makes_its_pages_the_most_recently_released():
    alloc = PageAllocator(4, PS, 1, PrefixCache(1))
    a, b = _seq("a", range(8)), _seq("b", range(10, 18))
    for seq in (a, b):
        assert alloc.reserve(seq, 8)
        seq.num_computed = 8
        alloc.free(seq)
    assert alloc.cache.parked_pages(0) == [1, 0, 3, 2]
    h = _seq("h", list(range(8)) + [60])
    prefix = alloc.match(h, lambda start: h.num_tokens - start)
    assert prefix.pages == (0, 1) and prefix.num_tokens == 8
    assert alloc.reserve(h, 9, prefix)  # a's two pages, and one more: b's last page is evicted for it
    h.num_computed = 8
    assert h.pages == [0, 1, 3] and [alloc.ref_count(p) for p in h.pages] == [1, 1, 1]
    alloc.check_invariants([h])
    alloc.free(h)
    assert alloc.cache.parked_pages(0) == [2, 1, 0] and not alloc.cache.is_cached(3)
    alloc.check_invariants([])


def test_data_parallel_hit_comes_from_the_replica_holding_the_prefix():
    s = _scheduler(num_pages=16, replicas=2)
    model = FakeModel(s)
    first = _seq("a", range(13), max_tokens=30)
    s.add(first)
    model.run(s.schedule())
    r = s.allocator.replica(first)
    assert s.allocator.available(r) == 4 and s.allocator.available(1 - r) == 8
    follower = _seq("b", range(13))
    s.add(follower)
    s.schedule()  # the replica with fewer pages free, but with the prefix
    assert s.allocator.replica(follower) == r and follower.num_computed == 12
    s.allocator.check_invariants([first, follower])
    # fill the prefix's replica: the next one goes to the other replica and computes everything
    filler = _seq("filler", range(300, 312))
    assert s.allocator.reserve(filler, 12, Prefix(r)) and s.allocator.available(r) == 0
    late = _seq("c", range(13))
    s.add(late)
    s.schedule()
    assert s.allocator.replica(late) == 1 - r and late.num_computed == 0
    s.allocator.check_invariants([first, follower, filler, late])


# -- invariants over many requests --------------------------------------------------------------------------------

def test_invariants_over_2000_requests_with_aborts_and_preemption():
    NUM_PAGES = 48
    rng = np.random.default_rng(18)
    s = _scheduler(num_pages=NUM_PAGES, replicas=2, max_num_seqs=8, max_num_batched_tokens=24, max_prefill_chunk=12,
                   num_scheduler_steps=3)
    model = FakeModel(s)
    prefixes = [rng.integers(0, 50, int(n)).tolist() for n in rng.integers(4, 22, 6)]
    salts = ["base", "adapter:1", "adapter:2"]
    seqs, added, aborted, step = [], 0, 0, 0
    while added < 2000 or s.has_work():
        for _ in range(rng.poisson(0.5) if added < 2000 else 0):
            prompt = prefixes[rng.integers(len(prefixes))] + rng.integers(0, 50, rng.integers(0, 6)).tolist()
            seq = _seq(f"r{added}", prompt or [1], salts[rng.integers(3)], int(rng.integers(1, 24)))
            s.add(seq)
            seqs.append(seq)
            added += 1
        live = _live(s)
        if live and rng.random() < 0.05:  # an abort, of a waiting or a running sequence
            victim = live[rng.integers(len(live))]
            victim.status = Status.FINISHED
            s.remove(victim)
            aborted += 1
        batch = s.schedule()
        if batch is not None:
            model.run(batch)
        s.allocator.check_invariants(_live(s))
        step += 1
        assert step < 100_000
    stats = s.allocator.cache.stats
    assert sum(q.num_preemptions for q in seqs) > 200 and aborted > 100
    assert stats.hit_tokens > 0.2 * stats.query_tokens and stats.evictions > 1000
    assert s.allocator.num_free == NUM_PAGES and s.allocator.num_cached > 0  # nothing held; cached pages stay
    s.allocator.check_invariants([])


# -- the engine ---------------------------------------------------------------------------------------------------

ENGINE = dict(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_chunk=32, page_size=4, num_pages=64,
              max_model_len=64, bank=BANK)  # test_engine's sizes: the same compiled programs


def _engine(tiny, adapters=("r4", "r8"), **kw):
    engine = Engine(tiny["model"], None, EngineConfig(**{**ENGINE, **kw}))
    for name in adapters:
        engine.store.register(name, tiny["adapters"][name])
    prefill = []  # tokens each prefill step computed, per sequence
    execute = engine.runner.execute

    def counting(batch, slots, bank, *rest):
        if batch.mode == "prefill":
            prefill.extend(batch.chunks)
        return execute(batch, slots, bank, *rest)

    engine.runner.execute = counting
    return engine, prefill


def _run(engine, requests, arrivals):
    """Adds request i at step arrivals[i]; returns the token ids of each."""
    done, step = {}, 0
    while len(done) < len(requests):
        for i, (prompt, adapter) in enumerate(requests):
            if arrivals[i] == step:
                engine.add_request(prompt, SamplingParams(temperature=0.0, max_tokens=4), adapter, request_id=f"q{i}")
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
        step += 1
        assert step < 1000
    return [done[f"q{i}"] for i in range(len(requests))]


def test_engine_outputs_equal_with_the_cache_on_and_off(tiny):
    rng = np.random.default_rng(7)
    shared = rng.integers(0, 97, 22).tolist()  # 5 full pages and a partial one
    adapters = [None, "r4", "r8"]
    requests = [(shared + rng.integers(0, 97, int(rng.integers(0, 6))).tolist(), adapters[i % 3]) for i in range(9)]
    arrivals = [0, 0, 1, 3, 4, 6, 9, 12, 15]
    on, prefill_on = _engine(tiny)
    off, prefill_off = _engine(tiny, enable_prefix_caching=False)
    out_on, out_off = _run(on, requests, arrivals), _run(off, requests, arrivals)
    assert out_on == out_off
    m_on, m_off = on.metrics(), off.metrics()
    assert m_off["prefix_cache_hit_tokens"] == 0 and sum(prefill_off) == sum(len(p) for p, _ in requests)
    # each adapter's first request computes its prompt; later ones mostly hit (unless they came at once)
    assert m_on["prefix_cache_hit_tokens"] >= 5 * 20 and sum(prefill_on) == \
        sum(len(p) for p, _ in requests) - m_on["prefix_cache_hit_tokens"]
    assert 0 < m_on["prefix_cache_hit_rate"] < 1 and m_on["prefix_cache_pages"] > 0
    assert on.allocator.num_free == ENGINE["num_pages"] and m_on["pages_used"] == 0
    on.allocator.check_invariants([])


def test_second_request_with_a_shared_prefix_hits(tiny):
    engine, prefill = _engine(tiny)
    prompt = list(range(10, 28))  # 18 tokens: 4 full pages
    first = _run(engine, [(prompt, "r4")], [0])
    assert engine.metrics()["prefix_cache_hit_tokens"] == 0 and prefill == [18]
    second = _run(engine, [(prompt[:16] + [5, 6, 7], "r4")], [0])
    assert engine.metrics()["prefix_cache_hit_tokens"] == 16 and prefill == [18, 3]
    again = _run(engine, [(prompt, "r4")], [0])  # 4 pages hit: the last prompt token is computed
    assert engine.metrics()["prefix_cache_hit_tokens"] == 16 + 16 and prefill == [18, 3, 2] and again == first
    off, _ = _engine(tiny, enable_prefix_caching=False)
    assert _run(off, [(prompt[:16] + [5, 6, 7], "r4")], [0]) == second


def test_replaced_or_reregistered_adapter_never_hits(tiny):
    engine, prefill = _engine(tiny, adapters=("r8",))
    paths = tiny["adapters"]
    prompt = list(range(30, 50))
    engine.store.register("x", paths["r4"])
    salt_x = engine.store.cache_salt(engine.store.current["x"])
    old = _run(engine, [(prompt, "x")], [0])
    engine.store.register("x", paths["r8"])  # replaced: same name, other weights
    salt_x2 = engine.store.cache_salt(engine.store.current["x"])
    new = _run(engine, [(prompt, "x")], [0])
    assert salt_x2 != salt_x and engine.metrics()["prefix_cache_hit_tokens"] == 0 and prefill == [20, 20]
    assert new == _run(engine, [(prompt, "r8")], [0])  # r8's weights (its own registration: no hit either)
    assert new != old  # stale pages would have given the old weights' tokens
    engine.store.unregister("x")
    engine.store.register("x", paths["r4"])  # the first identity "x" again, with a new salt
    assert engine.store.current["x"] == "x" and engine.store.cache_salt("x") not in (salt_x, salt_x2)
    assert _run(engine, [(prompt, "x")], [0]) == old
    assert engine.metrics()["prefix_cache_hit_tokens"] == 0 and prefill == [20] * 4
    assert _run(engine, [(prompt, "x")], [0]) == old and engine.metrics()["prefix_cache_hit_tokens"] == 16


def test_metrics_and_flag():
    from jlora.cli import build_parser
    from jlora.serve.cli import config_from_args
    from jlora.serve.metrics import EngineCollector

    class Stats:
        def stats(self):
            return {"prefix_cache_hit_rate": 0.25, "prefix_cache_pages": 7, "prefix_cache_hit_tokens": 3}

    families = {f.name: f.samples[0].value for f in EngineCollector(Stats()).collect() if f.samples}
    assert families["jlora_prefix_cache_hit_rate"] == 0.25 and families["jlora_prefix_cache_pages"] == 7
    assert families["jlora_prefix_cache_hit_tokens"] == 3 and families["jlora_prefix_cache_query_tokens"] == 0
    parse = build_parser().parse_args
    assert config_from_args(parse(["serve"])).engine_config().enable_prefix_caching
    assert not config_from_args(parse(["serve", "--no-enable-prefix-caching"])).engine_config().enable_prefix_caching
