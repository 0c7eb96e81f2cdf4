"""The engine against the foundation's generation: continuous batching, paging, preemption, compiles, leaks."""

import numpy as np
import pytest
from conftest import BANK, reference_greedy

from jlora.config import RuntimeConfig
from jlora.engine.compiles import compile_count
from jlora.engine.engine import Engine, EngineConfig
from jlora.errors import RequestError, UnknownAdapterError
from jlora.sampling import SamplingParams


def make_engine(tiny, **kw):
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_chunk=32, page_size=4, num_pages=64,
               max_model_len=64, bank=BANK)
    cfg.update(kw)
    engine = Engine(tiny["model"], None, EngineConfig(**cfg))
    for name, path in tiny["adapters"].items():
        engine.store.register(name, path)
    return engine


def run_staggered(engine, requests, arrivals, abort_at=None, logprobs=False):
    """Adds request i at step arrivals[i] (with logprobs if `logprobs`, or `logprobs(i)`); returns {request_id:
    final output}."""
    done, step, pending = {}, 0, list(range(len(requests)))
    while pending or engine.has_unfinished():
        for i in [i for i in pending if arrivals[i] <= step]:
            prompt, adapter, sp = requests[i]
            engine.add_request(prompt, sp, adapter, request_id=f"r{i}",
                               logprobs=logprobs(i) if callable(logprobs) else logprobs)
            pending.remove(i)
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if abort_at:
            for rid in abort_at.get(step, []):
                out = engine.abort(rid)
                if out is not None:
                    done[rid] = out
        step += 1
        assert step < 10_000
    return done


def _requests(rng, n, names, max_tokens=(3, 9)):
    return [(rng.integers(0, 97, rng.integers(1, 20)).tolist(), names[rng.integers(len(names))],
             SamplingParams(temperature=0.0, max_tokens=int(rng.integers(*max_tokens)))) for _ in range(n)]


def _check_against_reference(engine, tiny, requests, done):
    names = sorted({a for _, a, _ in requests if a})
    slots = engine.store.ensure_resident(set(names[:8]))
    n = max(sp.max_tokens for _, _, sp in requests)
    ref = reference_greedy(tiny["model"], engine.store.bank, lambda a: -1 if a is None else slots[a],
                           [p for p, _, _ in requests], [a for _, a, _ in requests], n)
    for i, (_, _, sp) in enumerate(requests):
        assert done[f"r{i}"].token_ids == ref[i][:sp.max_tokens], f"request {i}"


def test_mixed_arrivals_match_reference_generation(tiny):
    engine = make_engine(tiny)
    rng = np.random.default_rng(0)
    names = [None] + list(tiny["adapters"])
    requests = _requests(rng, 32, names)
    done = run_staggered(engine, requests, arrivals=rng.integers(0, 12, 32).tolist())
    assert len(done) == 32 and all(o.finish_reason == "length" for o in done.values())
    assert len({a for _, a, _ in requests}) == 9  # 8 adapters of different ranks + base
    _check_against_reference(engine, tiny, requests, done)


def test_split_layers_engine_matches_reference(tiny):
    """The engine's GPU layout, forced on the CPU: per-layer weights give the (scanned) reference's greedy tokens,
    and donate_weights frees the model's stacked arrays once they are split."""
    from jlora.model import Llama
    engine = make_engine(tiny, runtime=RuntimeConfig(layer_loop="split"))
    assert isinstance(engine.runner.params["layers"], tuple)
    rng = np.random.default_rng(3)
    requests = _requests(rng, 12, [None] + list(tiny["adapters"]))
    done = run_staggered(engine, requests, arrivals=rng.integers(0, 6, 12).tolist())
    _check_against_reference(engine, tiny, requests, done)
    assert not any(x.is_deleted() for x in tiny["model"].params()["layers"].values())  # not donated: untouched
    copy = Llama(tiny["model"].config, {**tiny["model"].params(), "layers": {
        k: v + 0 for k, v in tiny["model"].params()["layers"].items()}})
    Engine(copy, None, EngineConfig(num_pages=8, page_size=4, max_model_len=32, bank=BANK,
                                    runtime=RuntimeConfig(layer_loop="split")), donate_weights=True)
    assert all(x.is_deleted() for x in copy.params()["layers"].values())


def test_preemption_under_tiny_page_budget(tiny):
    engine = make_engine(tiny, num_pages=10, max_num_seqs=8)
    rng = np.random.default_rng(1)
    requests = _requests(rng, 12, [None, "r3", "r8", "r16"], max_tokens=(6, 14))
    done = run_staggered(engine, requests, arrivals=[0] * 12)
    assert engine.preemptions > 0 and len(done) == 12
    _check_against_reference(engine, tiny, requests, done)
    assert engine.allocator.num_free == 10


def test_no_new_compilations_after_warmup_over_a_broad_mix(tiny):
    """Two sequence buckets (up to 16 sequences), prompts longer than a prefill chunk, greedy and sampled
    requests, penalties, logit_bias, min_p and logprobs, and preemption (too few pages for them all): after warm-up
    nothing compiles. Pages of 8 tokens make every page table one width (the widths are `test_buckets.py`'s)."""
    engine = make_engine(tiny, max_num_seqs=16, max_prefill_chunk=16, num_pages=12, page_size=8)
    shapes = engine.warmup()
    before = compile_count()
    rng = np.random.default_rng(7)
    names = [None] + list(tiny["adapters"])
    extras = [{}, {}, {"repetition_penalty": 1.3}, {"presence_penalty": 0.5, "min_p": 0.05},
              {"logit_bias": {3: 2.0}, "min_tokens": 2, "stop_token_ids": [5]}]
    requests = [(rng.integers(0, 97, rng.integers(1, 40)).tolist(), names[rng.integers(len(names))],
                 SamplingParams(temperature=float(rng.choice([0.0, 0.8])), top_k=int(rng.integers(0, 20)),
                                seed=int(rng.integers(0, 1000)), max_tokens=int(rng.integers(2, 12)),
                                **extras[rng.integers(len(extras))]))
                for _ in range(60)]
    assert max(len(p) for p, _, _ in requests) > 2 * 16  # some prompts take several chunks
    done = run_staggered(engine, requests, arrivals=rng.integers(0, 20, 60).tolist(),
                         logprobs=lambda i: i % 7 == 0)
    assert len(done) == 60 and all(o.finish_reason in ("length", "stop") for o in done.values())
    assert compile_count() == before, "a request mix compiled something after warm-up"
    assert engine.preemptions > 0
    assert len({B for _, B, _, _ in engine.runner.shapes_run}) >= 2  # several sequence buckets ran
    assert len(engine.runner.shapes_run) <= shapes


def test_no_leaks_after_2000_requests_with_cancellations(tiny):
    engine = make_engine(tiny, num_pages=24)
    rng = np.random.default_rng(3)
    names = [None] + list(tiny["adapters"])
    requests = [(rng.integers(0, 97, rng.integers(1, 12)).tolist(), names[rng.integers(len(names))],
                 SamplingParams(temperature=1.0, max_tokens=int(rng.integers(1, 5)), seed=i)) for i in range(2000)]
    arrivals = np.sort(rng.integers(0, 1500, 2000)).tolist()
    aborts = {}
    for i in rng.choice(2000, 300, replace=False):
        aborts.setdefault(int(arrivals[i] + rng.integers(0, 4)), []).append(f"r{i}")
    done, step, pending = {}, 0, list(range(2000))
    while pending or engine.has_unfinished():
        while pending and arrivals[pending[0]] <= step:
            i = pending.pop(0)
            engine.add_request(*requests[i][:1], requests[i][2], requests[i][1], request_id=f"r{i}")
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        for rid in aborts.get(step, []):
            out = engine.abort(rid)
            if out is not None:
                done[rid] = out
        live = engine.scheduler.running + list(engine.scheduler.waiting)
        engine.allocator.check_invariants(live)
        step += 1
    assert len(done) == 2000
    assert sum(o.finish_reason == "abort" for o in done.values()) > 50
    assert engine.allocator.num_free == 24 and not engine.requests
    assert not engine.store.refs, "adapter references leaked"


def test_abort_frees_pages_at_once(tiny):
    engine = make_engine(tiny)
    engine.add_request(list(range(1, 30)), SamplingParams(max_tokens=20), "r8", request_id="x")
    engine.step()
    assert engine.allocator.num_free < 64 and engine.store.refs["r8"] == 1
    out = engine.abort("x")
    assert out.finish_reason == "abort" and out.finished
    assert engine.allocator.num_free == 64 and not engine.store.refs and not engine.has_unfinished()


def test_bad_requests_fail_alone(tiny):
    engine = make_engine(tiny)
    engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=4), "r4", request_id="ok")
    with pytest.raises(UnknownAdapterError, match="nope"):
        engine.add_request([1], adapter="nope")
    with pytest.raises(RequestError, match="context length"):
        engine.add_request([1] * 60, SamplingParams(max_tokens=10))
    with pytest.raises(RequestError, match="empty"):
        engine.add_request([])
    with pytest.raises(RequestError, match="already in use"):
        engine.add_request([1], request_id="ok")
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    assert [o.request_id for o in outs if o.finished] == ["ok"] and len(outs[-1].token_ids) == 4


def test_seeded_sampling_is_independent_of_batch_mix(tiny):
    sp = SamplingParams(temperature=1.0, max_tokens=6, seed=7)
    alone = run_staggered(make_engine(tiny), [([5, 6, 7], "r12", sp)], [0])["r0"].token_ids
    rng = np.random.default_rng(4)
    crowd = [([5, 6, 7], "r12", sp)] + _requests(rng, 7, [None, "r1", "r32"])
    assert run_staggered(make_engine(tiny), crowd, [3] + [0] * 7)["r0"].token_ids == alone


def test_logprobs_are_returned(tiny):
    engine = make_engine(tiny)
    engine.add_request([1, 2, 3], SamplingParams(temperature=0.0, max_tokens=3), None, logprobs=True)
    outs = []
    while engine.has_unfinished():
        outs += engine.step()
    lp = outs[-1].logprobs
    assert len(lp) == 3 and all(e["logprob"] <= 0 for e in lp)
    assert all(e["token"] == max(e["top"], key=e["top"].get) for e in lp)  # greedy picks the top-1


def test_multi_step_decode_matches_single_steps(tiny):
    """num_scheduler_steps samples several tokens per sequence in one call: the same tokens, stops, finish reasons and
    logprobs as one token per step (seeded sampling, stop ids hit inside a burst, max_tokens not a multiple of it),
    in fewer engine steps."""
    rng = np.random.default_rng(5)
    names = [None] + list(tiny["adapters"])
    requests = [(rng.integers(0, 97, rng.integers(1, 20)).tolist(), names[rng.integers(len(names))],
                 SamplingParams(temperature=1.0, seed=i, max_tokens=int(rng.integers(1, 15)),
                                stop_token_ids=rng.integers(0, 97, 4).tolist())) for i in range(16)]
    arrivals = rng.integers(0, 8, 16).tolist()
    runs = {}
    for k in (1, 5):
        engine = make_engine(tiny, num_scheduler_steps=k)
        done = run_staggered(engine, requests, arrivals, logprobs=True)
        runs[k] = ({rid: (o.token_ids, o.finish_reason, [round(e["logprob"], 4) for e in o.logprobs])
                    for rid, o in done.items()}, engine.steps)
        assert engine.allocator.num_free == 64 and not engine.requests
    assert runs[5][0] == runs[1][0]
    assert {reason for _, reason, _ in runs[1][0].values()} == {"stop", "length"}
    assert runs[5][1] < runs[1][1]


def test_multi_step_decode_streams_every_token_once(tiny):
    """A burst's tokens arrive as one output whose delta ids extend the last; none is lost or repeated."""
    engine = make_engine(tiny, num_scheduler_steps=4)
    engine.add_request([3, 4, 5], SamplingParams(temperature=0.0, max_tokens=10), "r8", request_id="x")
    seen = []
    while engine.has_unfinished():
        for out in engine.step():
            assert out.token_ids[:len(seen)] == seen
            seen = out.token_ids
    assert len(seen) == 10 and engine.steps == 1 + 3  # prefill (1 token), then bursts of 4, 4 and 1
