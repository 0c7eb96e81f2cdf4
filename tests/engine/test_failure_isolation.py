"""Failure isolation: an exception inside a step fails only the requests it concerns; the engine keeps serving.
Adapter replacement: running requests finish on the old weights, new requests get the new ones."""

import os

import jax
import numpy as np
import pytest
from helpers import write_adapter
from test_engine import make_engine, run_staggered

from jlora.config import LoraBankConfig
from jlora.engine.engine import Engine, EngineConfig
from jlora.errors import RequestError
from jlora.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


def lone(tiny, prompt, adapter, sp=GREEDY, **kw):
    """The greedy tokens of one request run alone on a fresh engine."""
    engine = make_engine(tiny, **kw)
    return run_staggered(engine, [(prompt, adapter, sp)], [0])["r0"].token_ids


def bare_engine(tiny, **kw):
    """`make_engine`'s sizes without its eight adapters."""
    cfg = dict(max_num_seqs=8, max_num_batched_tokens=64, max_prefill_chunk=32, page_size=4, num_pages=64,
               max_model_len=64)
    return Engine(tiny["model"], None, EngineConfig(**{**cfg, **kw}))


def drain(engine) -> dict:
    done = {}
    for _ in range(500):
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
        if not engine.has_unfinished():
            return done
    raise AssertionError("the engine did not finish its requests")


def assert_idle(engine):
    assert not engine.requests and not engine.store.refs and not engine.has_unfinished()
    assert engine.allocator.num_free == engine.allocator.num_pages
    engine.allocator.check_invariants([])


@pytest.mark.parametrize("field, value", [("seed", 1 << 32), ("seed", -1), ("top_k", 1 << 31),
                                          ("max_tokens", 1 << 31), ("temperature", float("inf"))])
def test_out_of_range_sampling_is_refused_before_the_engine(field, value):
    with pytest.raises(RequestError, match=field):
        SamplingParams(**{field: value})


def test_a_failing_step_fails_its_batch_alone_and_the_engine_keeps_serving(tiny):
    engine = make_engine(tiny)
    execute = engine.runner.execute

    def poisoned(batch, slots, bank, *rest):
        if any(s.request_id == "bad" for s in batch.seqs):
            raise OverflowError("Python integer out of bounds for uint32")
        return execute(batch, slots, bank, *rest)

    engine.runner.execute = poisoned
    engine.add_request([1, 2, 3, 4], GREEDY, "r4", request_id="early")
    first = engine.step()  # "early" is prefilled alone, before "bad" arrives
    assert [o.request_id for o in first] == ["early"]
    engine.add_request([5, 6], GREEDY, "r8", request_id="bad")
    outs = engine.step()  # the prefill of "bad" alone: a decode of "early" would come after it
    assert [(o.request_id, o.finish_reason) for o in outs] == [("bad", "error")]
    assert "OverflowError" in outs[0].error and outs[0].error_kind == "internal"
    engine.add_request([7, 8, 9], GREEDY, None, request_id="later")
    done = drain(engine)
    assert done["early"].token_ids == lone(tiny, [1, 2, 3, 4], "r4")
    assert done["later"].token_ids == lone(tiny, [7, 8, 9], None)
    assert_idle(engine)


def test_a_failing_step_that_took_the_kv_cache_loses_nothing_else(tiny):
    """A step that dies after its donated KV cache and penalty state were taken (their arrays deleted, as a device
    failure inside the call leaves them): its request fails; the engine reallocates both, recomputes the running
    requests from their tokens (same greedy and penalised outputs as alone), empties the prefix cache of lost
    pages, and keeps serving."""
    engine = make_engine(tiny)
    run = engine.runner._run
    greedy = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True)  # longer than a decode burst
    penalised = SamplingParams(temperature=0.0, max_tokens=14, ignore_eos=True, repetition_penalty=1.5,
                               frequency_penalty=0.7)

    def dies_after_donation(bank, a, fill_mask=None):
        if engine.runner.poison:
            for x in jax.tree.leaves((engine.runner.cache, engine.runner.penalty)):
                x.delete()
            raise RuntimeError("INTERNAL: CUDA error: an illegal memory access was encountered")
        return run(bank, a, fill_mask)

    engine.runner.poison = False
    engine.runner._run = dies_after_donation
    engine.add_request([1, 2, 3, 4, 5, 6, 7, 8, 9], greedy, "r4", request_id="a")
    engine.add_request([7, 8, 9], penalised, None, request_id="b")
    while len(engine.requests["a"].output_ids) < 2 or len(engine.requests["b"].output_ids) < 2:
        assert not [o for o in engine.step() if o.finished]
    engine.add_request([5, 6], GREEDY, "r8", request_id="bad")
    engine.runner.poison = True
    outs = engine.step()  # the prefill of "bad" alone
    engine.runner.poison = False
    assert [(o.request_id, o.finish_reason) for o in outs] == [("bad", "error")]
    assert "illegal memory access" in outs[0].error
    assert engine.device_state_resets == 1 and engine.allocator.cache.num_cached == 0
    assert not any(x.is_deleted() for x in jax.tree.leaves((engine.runner.cache, engine.runner.penalty)))
    done = drain(engine)
    assert len(done["a"].token_ids) == 14
    assert done["a"].token_ids == lone(tiny, [1, 2, 3, 4, 5, 6, 7, 8, 9], "r4", greedy)
    assert done["b"].token_ids == lone(tiny, [7, 8, 9], None, penalised)
    engine.add_request([1, 2, 3, 4, 5, 6, 7, 8, 9], greedy, "r4", request_id="again")  # no stale prefix pages
    assert drain(engine)["again"].token_ids == done["a"].token_ids
    assert_idle(engine)


def test_a_failing_output_fails_that_request_alone(tiny):
    engine = make_engine(tiny)
    after = engine.outputs.after_token

    def poisoned(seq):
        if seq.request_id == "bad":
            raise ValueError("detokenizer broke")
        return after(seq)

    engine.outputs.after_token = poisoned
    for rid, prompt in (("a", [1, 2, 3]), ("bad", [4, 5]), ("b", [6, 7, 8, 9])):
        engine.add_request(prompt, GREEDY, "r12", request_id=rid)
    done = drain(engine)  # all three share every step
    assert done["bad"].finish_reason == "error" and "detokenizer broke" in done["bad"].error
    assert done["a"].token_ids == lone(tiny, [1, 2, 3], "r12")
    assert done["b"].token_ids == lone(tiny, [6, 7, 8, 9], "r12")
    assert_idle(engine)


def test_an_adapter_gone_bad_on_disk_fails_its_requests_alone(tiny, tmp_path):
    engine = make_engine(tiny)
    bad = write_adapter(str(tmp_path / "bad"), r=4, seed=5)
    engine.store.register("bad", bad, eager=False)
    with open(os.path.join(bad, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    engine.add_request([1, 2, 3], GREEDY, "r6", request_id="good")
    engine.add_request([4, 5, 6], GREEDY, "bad", request_id="bad1")
    engine.add_request([7], GREEDY, "bad", request_id="bad2")
    done = drain(engine)
    for rid in ("bad1", "bad2"):
        assert done[rid].finish_reason == "error" and done[rid].error_kind == "adapter"
        assert "adapter 'bad' cannot be loaded" in done[rid].error and "safetensors" in done[rid].error
        assert str(tmp_path) not in done[rid].error  # no server paths in what clients read
    assert done["good"].token_ids == lone(tiny, [1, 2, 3], "r6")
    assert engine.store.has("bad"), "a bad adapter must not vanish silently"
    assert_idle(engine)


def test_a_lazily_registered_adapter_in_another_bucket_is_requeued_not_failed(tiny, tmp_path):
    """Both configs say r=8 (2 slots), the weights are rank 4 (1 slot): the step that finds out never raises
    CapacityError; the requests run one after the other and give their lone outputs."""
    bank = LoraBankConfig(buckets=(4, 8), slots=(1, 2))
    targets = ("q_proj", "v_proj")
    paths = {n: write_adapter(str(tmp_path / n), r=4, seed=i + 10, std=0.3, targets=targets,
                              extra_config={"r": 8, "rank_pattern": {m: 4 for m in targets}})
             for i, n in enumerate("xy")}
    engine = bare_engine(tiny, bank=bank)
    for n, p in paths.items():
        engine.store.register(n, p, eager=False)
    assert engine.store.registration("x").bucket == 8
    engine.add_request([1, 2, 3], GREEDY, "x", request_id="x")
    engine.add_request([4, 5], GREEDY, "y", request_id="y")
    done = drain(engine)
    assert {o.finish_reason for o in done.values()} == {"length"}
    assert engine.preemptions > 0 and engine.store.registration("x").bucket == 4
    for rid, prompt in (("x", [1, 2, 3]), ("y", [4, 5])):
        alone = bare_engine(tiny, bank=bank)
        alone.store.register(rid, paths[rid])
        assert done[rid].token_ids == run_staggered(alone, [(prompt, rid, GREEDY)], [0])["r0"].token_ids
    assert_idle(engine)


def test_replacing_an_adapter_in_use_keeps_both_weights_apart(tiny, tmp_path):
    old = write_adapter(str(tmp_path / "old"), r=8, seed=21, std=0.3)
    new = write_adapter(str(tmp_path / "new"), r=8, seed=22, std=0.3)
    sp = SamplingParams(temperature=0.0, max_tokens=10)
    refs = {}
    for tag, path in (("old", old), ("new", new)):
        alone = make_engine(tiny)
        alone.store.register("a", path)
        refs[tag] = run_staggered(alone, [([3, 1, 4], "a", sp)], [0])["r0"].token_ids
    assert refs["old"] != refs["new"]

    engine = make_engine(tiny)
    engine.store.register("a", old)
    engine.add_request([3, 1, 4], sp, "a", request_id="before")
    engine.step()
    engine.step()
    engine.store.register("a", new)  # replaced while "before" runs on it
    engine.add_request([3, 1, 4], sp, "a", request_id="after")
    done = drain(engine)
    assert done["before"].token_ids == refs["old"] and done["before"].adapter == "a"
    assert done["after"].token_ids == refs["new"]
    # The old registration went with its last request; the new one stays and serves.
    assert engine.store.has("a") and engine.store.paths["a"] == os.path.realpath(new)
    assert len([k for k in engine.store.entries if engine.store.entries[k].name == "a"]) == 1
    engine.add_request([3, 1, 4], sp, "a", request_id="again")
    assert drain(engine)["again"].token_ids == refs["new"]
    assert_idle(engine)


def test_unload_then_reload_under_load_never_mixes_weights(tiny, tmp_path):
    """Replacements and unloads while requests of every generation run: each request gets the weights that
    were current when it was added."""
    paths = [write_adapter(str(tmp_path / f"v{i}"), r=4, seed=30 + i, std=0.3) for i in range(3)]
    sp = SamplingParams(temperature=0.0, max_tokens=5)
    refs = []
    for p in paths:
        alone = make_engine(tiny)
        alone.store.register("t", p)
        refs.append(run_staggered(alone, [([2, 7], "t", sp)], [0])["r0"].token_ids)
    engine = make_engine(tiny)
    expected, done = {}, {}
    rng = np.random.default_rng(0)
    for i in range(12):
        version = i % 3
        if not engine.store.has("t") or rng.random() < 0.6:
            engine.store.register("t", paths[version])
        else:
            version = [k for k, p in enumerate(paths) if os.path.realpath(p) == engine.store.paths["t"]][0]
        engine.add_request([2, 7], sp, "t", request_id=f"q{i}")
        expected[f"q{i}"] = refs[version]
        if i % 5 == 4:
            engine.store.unregister("t")
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out
    done.update(drain(engine))
    assert {rid: o.token_ids for rid, o in done.items()} == expected
    assert_idle(engine)
