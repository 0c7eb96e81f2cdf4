"""Penalties, logit_bias, min_tokens and stop ids in the engine, per request in a mixed batch, against greedy decoding
by full re-forward with the logits processed by a NumPy reference of vLLM's definitions (inside the multi-step
decode loop, across preemption, and in the no-recompile mix of test_engine)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from test_engine import make_engine, run_staggered
from test_sampling_penalties import ref_process

from jlora.errors import RequestError
from jlora.model import KVCache, forward
from jlora.sampling import SamplingParams

_FORWARD = jax.jit(forward, static_argnames=("config",))
L, B = 32, 8  # the reference pads every call to B rows of L tokens: one compile
PAGES = 10  # too few for the requests of either test at once: both preempt
# One engine size for every test here, so they share their compiled programs: 32-token sequences make page tables
# of 8 pages, one width (make_engine's 64 make two).
SMALL = dict(num_pages=PAGES, max_model_len=32)


def reference(model, bank, requests, slot_of):
    """Greedy tokens of (prompt, adapter, sampling) requests: each step re-runs the whole sequence, processes the
    last logits with `ref_process` and takes the argmax; stops as the engine does (stop ids after min_tokens)."""
    config, params = model.config, model.params()
    assert len(requests) <= B
    lora = np.full((B, L), -1, np.int32)
    lora[:len(requests)] = [[slot_of(a)] * L for _, a, _ in requests]
    outs, done = [[] for _ in requests], [False] * B
    for _ in range(max(sp.max_tokens for _, _, sp in requests)):
        tokens = np.zeros((B, L), np.int32)
        for i, (p, _, _) in enumerate(requests):
            tokens[i, :len(p) + len(outs[i])] = p + outs[i]
        logits, _ = _FORWARD(params, bank, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(L), (B, L)),
                             jnp.asarray(lora), KVCache.zeros(config, B, L), config=config)
        logits = np.asarray(logits)
        for i, (p, _, sp) in enumerate(requests):
            if done[i]:
                continue
            x = ref_process(logits[i, len(p) + len(outs[i]) - 1], p, outs[i], sp, set(sp.stop_token_ids))
            outs[i].append(int(np.argmax(x)))
            if len(outs[i]) > sp.min_tokens and outs[i][-1] in sp.stop_token_ids:
                outs[i].pop()
                done[i] = True
            done[i] = done[i] or len(outs[i]) >= sp.max_tokens
    return outs


def _check(engine, tiny, requests, done):
    names = sorted({a for _, a, _ in requests if a})
    slots = engine.store.ensure_resident(set(names))
    ref = reference(tiny["model"], engine.store.bank, requests, lambda a: -1 if a is None else slots[a])
    for i, want in enumerate(ref):
        assert done[f"r{i}"].token_ids == want, f"request {i}: {requests[i][2]}"


def _plain(tiny, engine, prompt, n):
    return reference(tiny["model"], engine.store.bank, [(prompt, None, SamplingParams(temperature=0.0, max_tokens=n))],
                     lambda a: -1)[0]


def test_processors_per_request_in_a_mixed_multi_step_batch(tiny):
    """One engine, 8 tokens per decode call: rows with each processor, a plain greedy row and a sampled row
    (top_k=1, so deterministic) share every step; min_tokens holds back a stop id that would end the row at once."""
    engine = make_engine(tiny, **SMALL)
    plain = _plain(tiny, engine, [9, 8, 7], 6)
    g = dict(temperature=0.0, max_tokens=10)
    requests = [
        ([5, 6, 7, 5, 6], "r8", SamplingParams(repetition_penalty=1.8, **g)),
        ([1, 2, 3], None, SamplingParams(frequency_penalty=1.5, presence_penalty=0.5, **g)),
        ([4, 4, 4], "r3", SamplingParams(logit_bias={17: 4.0, 3: -100.0}, **g)),
        ([9, 8, 7], None, SamplingParams(min_tokens=4, stop_token_ids=(plain[0], plain[1]), **g)),
        ([9, 8, 7], None, SamplingParams(stop_token_ids=(plain[1],), **g)),
        ([2, 7, 1, 8], "r16", SamplingParams(temperature=0.8, top_k=1, presence_penalty=2.0, seed=3, max_tokens=10)),
        ([3, 1, 4, 1, 5], "r8", SamplingParams(**g)),
    ]
    done = run_staggered(engine, requests, arrivals=[0, 0, 1, 1, 2, 0, 3])
    _check(engine, tiny, requests, done)
    assert done["r4"].finish_reason == "stop" and done["r4"].token_ids == plain[:1]
    assert len(done["r3"].token_ids) >= 4
    assert ("decode_loop", 8, 1, 8) in engine.runner.shapes_run, "no multi-step call ran"
    assert not engine.penalties._slot and not engine.requests


def test_penalty_counts_survive_preemption(tiny):
    """Too few pages for them all: preempted sequences are written afresh from their tokens when they run again."""
    rng = np.random.default_rng(11)
    requests = [(rng.integers(0, 97, rng.integers(2, 8)).tolist(), [None, "r4", "r12"][i % 3],
                 SamplingParams(temperature=0.0, max_tokens=int(rng.integers(8, 14)), repetition_penalty=1.5,
                                frequency_penalty=float(rng.choice([0.0, 1.0])))) for i in range(8)]
    engine = make_engine(tiny, **SMALL)
    done = run_staggered(engine, requests, arrivals=[0] * 8)
    assert engine.preemptions > 0
    _check(engine, tiny, requests, done)


def test_bad_logit_bias_fails_alone(tiny):
    engine = make_engine(tiny, **SMALL)
    engine.add_request([1, 2], SamplingParams(temperature=0.0, max_tokens=3, logit_bias={5: 1.0}), request_id="ok")
    with pytest.raises(RequestError, match=r"logit_bias names token id 97, outside the vocabulary \[0, 97\)"):
        engine.add_request([1], SamplingParams(logit_bias={97: 1.0}))
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o for o in engine.step() if o.finished})
    assert list(done) == ["ok"] and len(done["ok"].token_ids) == 3


def _ref_logprobs(model, bank, seqs):
    """float64 log-softmax of the reference forward over each (tokens, slot): [len(seqs), L, V]."""
    tokens, lora = np.zeros((B, L), np.int32), np.full((B, L), -1, np.int32)
    for i, (ids, slot) in enumerate(seqs):
        tokens[i, :len(ids)], lora[i] = ids, slot
    logits, _ = _FORWARD(model.params(), bank, jnp.asarray(tokens), jnp.broadcast_to(jnp.arange(L), (B, L)),
                         jnp.asarray(lora), KVCache.zeros(model.config, B, L), config=model.config)
    x = np.asarray(logits, np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def _assert_entries(entries, ids, lp, start, k):
    """entries[j] is the logprobs of ids[start + j + 1] given ids[:start + j + 1], with the top k."""
    for j, e in enumerate(entries):
        row = lp[start + j]
        assert e["token"] == ids[start + j + 1]
        np.testing.assert_allclose(e["logprob"], row[e["token"]], atol=1e-4)
        top = np.argsort(-row)[:k]
        assert list(e["top"]) == top.tolist()
        np.testing.assert_allclose(list(e["top"].values()), row[top], atol=1e-4)


def test_logprobs_equal_a_log_softmax_of_a_reference_forward(tiny):
    """Output logprobs (one-step and multi-step programs) and prompt logprobs, of the raw distribution (before
    penalties and temperature), each equal to float32 log-softmax of the reference logits within 1e-4."""
    requests = [([5, 6, 7], "r8", SamplingParams(temperature=0.0, max_tokens=9, logprobs=5)),
                ([1, 2, 3, 4], None, SamplingParams(temperature=0.7, seed=1, max_tokens=7, logprobs=3,
                                                    repetition_penalty=1.5)),
                ([9, 8, 7, 6, 5], "r3", SamplingParams(max_tokens=0, prompt_logprobs=4)),
                ([4, 2], "r16", SamplingParams(temperature=0.0, max_tokens=3, prompt_logprobs=2, logprobs=0))]
    engine = make_engine(tiny, **SMALL)
    done = run_staggered(engine, requests, arrivals=[0, 0, 1, 1])
    slots = engine.store.ensure_resident({"r8", "r3", "r16"})
    seqs = [(p + done[f"r{i}"].token_ids, -1 if a is None else slots[a]) for i, (p, a, _) in enumerate(requests)]
    lp = _ref_logprobs(tiny["model"], engine.store.bank, seqs)
    for i, (p, _, sp) in enumerate(requests):
        out = done[f"r{i}"]
        assert len(out.token_ids) == sp.max_tokens and out.finish_reason == "length"
        if sp.logprobs is not None:
            assert len(out.logprobs) == sp.max_tokens
            _assert_entries(out.logprobs, seqs[i][0], lp[i], len(p) - 1, sp.logprobs)
            assert out.cumulative_logprob == pytest.approx(sum(e["logprob"] for e in out.logprobs))
        else:
            assert out.logprobs is None and out.cumulative_logprob is None
        if sp.prompt_logprobs is not None:
            assert out.prompt_logprobs[0] is None and len(out.prompt_logprobs) == len(p)
            _assert_entries(out.prompt_logprobs[1:], p, lp[i], 0, sp.prompt_logprobs)
        else:
            assert out.prompt_logprobs is None
    assert ("decode_loop_logprobs", 8, 1, 8) in engine.runner.shapes_run
    assert not engine.requests and engine.allocator.num_free == PAGES


def test_bad_logprobs_requests_fail_alone(tiny):
    engine = make_engine(tiny, **SMALL, num_logprobs=4)
    with pytest.raises(RequestError, match="logprobs must be at most 4 on this engine, got 5"):
        engine.add_request([1], SamplingParams(logprobs=5))
    with pytest.raises(RequestError, match="prompt_logprobs must be at most 4"):
        engine.add_request([1], SamplingParams(prompt_logprobs=9))
    rid = engine.add_request([1, 2, 3], SamplingParams(max_tokens=0, prompt_logprobs=2))
    assert engine.abort(rid).finish_reason == "abort" and not engine.has_unfinished()
