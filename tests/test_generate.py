"""LLM.generate on a tiny random model: batching, adapters, stops and bad requests."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_adapter, write_model

from jlora.config import LoraBankConfig
from jlora.errors import RequestError, UnknownAdapterError
from jlora.generate import LLM
from jlora.model import KVCache, forward
from jlora.sampling import SamplingParams

GREEDY = SamplingParams(temperature=0.0, max_tokens=6)


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    root = tmp_path_factory.mktemp("gen")
    llm = LLM(write_model(str(root / "m")), bank=LoraBankConfig(buckets=(8, 16), slots=(2, 1)), progress=False)
    llm.load_adapter("a", write_adapter(str(root / "a"), r=4, seed=1, std=0.3))
    llm.load_adapter("b", write_adapter(str(root / "b"), r=16, seed=2, std=0.3, targets=("q_proj", "down_proj")))
    return llm


_FORWARD = jax.jit(forward, static_argnames=("config",))  # one compile for the padded reference shape


def _greedy_reference(llm, prompt, adapter, n):
    """Token-by-token greedy decoding by full re-forward, no cache reuse: an independent route."""
    ids = list(prompt)
    slot = -1 if adapter is None else llm.store.ensure_resident({adapter})[adapter]
    L = 16  # one padded length, one compile: causal attention keeps the tail from touching position T - 1
    assert len(ids) + n <= L, "the reference pads every sequence to L tokens"
    for _ in range(n):
        T = len(ids)
        logits, _ = _FORWARD(llm.params, llm.store.bank, jnp.asarray([ids + [0] * (L - T)]), jnp.arange(L)[None],
                            jnp.full((1, L), slot), KVCache.zeros(llm.config, 1, L), config=llm.config)
        ids.append(int(jnp.argmax(logits[0, T - 1])))
    return ids[len(prompt):]


def test_mixed_batch_equals_reference(llm):
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, 97, n).tolist() for n in (3, 9, 5, 1)]
    adapters = ["b", None, "a", "a"]
    outs = llm.generate(prompts, adapter=adapters, sampling=GREEDY)
    for p, a, o in zip(prompts, adapters, outs):
        assert o.token_ids == _greedy_reference(llm, p, a, 6)
        assert o.finish_reason == "length" and o.adapter == a
    assert outs[1].token_ids != llm.generate([prompts[1]], adapter="a", sampling=GREEDY)[0].token_ids


def test_stop_token_ids_end_the_request(llm):
    prompt = [5, 6, 7]
    full = llm.generate([prompt], sampling=GREEDY)[0].token_ids
    stop = SamplingParams(temperature=0.0, max_tokens=6, stop_token_ids=(full[2],))
    out = llm.generate([prompt], sampling=stop)[0]
    assert out.token_ids == full[:full.index(full[2])] and out.finish_reason == "stop"


def test_seeded_sampling_is_reproducible(llm):
    sp = SamplingParams(temperature=1.0, max_tokens=8, seed=123)
    a = llm.generate([[1, 2, 3]] * 2, sampling=sp)
    b = llm.generate([[1, 2, 3]], sampling=sp)
    assert a[0].token_ids == a[1].token_ids == b[0].token_ids


def test_bad_requests_fail_alone(llm):
    with pytest.raises(UnknownAdapterError, match="nope"):
        llm.generate([[1, 2]], adapter="nope")
    with pytest.raises(RequestError, match="exceeds the context length"):
        llm.generate([[1] * 120], sampling=SamplingParams(max_tokens=20))
    with pytest.raises(RequestError, match="empty"):
        llm.generate([[]])
    with pytest.raises(RequestError, match="token ids"):
        llm.generate([[1, 500]])
    assert llm.generate([[1, 2]], adapter="a", sampling=GREEDY)[0].token_ids  # still serving


def test_more_adapters_than_slots_take_turns(llm, tmp_path):
    # Bucket 16 has one slot: the scheduler runs b's and c's requests one after the other.
    llm.load_adapter("c", write_adapter(str(tmp_path / "c"), r=16, seed=3, std=0.3))
    outs = llm.generate([[1, 2], [1, 2]], adapter=["b", "c"], sampling=GREEDY)
    assert outs[0].token_ids == _greedy_reference(llm, [1, 2], "b", 6)
    assert outs[1].token_ids == _greedy_reference(llm, [1, 2], "c", 6)
    llm.unload_adapter("c")


def test_logprobs_and_prompt_logprobs_agree(llm):
    """The steps' logprobs of the generated tokens equal the prompt logprobs of the same tokens echoed back (one
    extra forward): two routes to one distribution."""
    prompt = [5, 6, 7]
    out = llm.generate([prompt], adapter="a", sampling=SamplingParams(temperature=0.0, max_tokens=5, logprobs=2))[0]
    assert [e["token"] for e in out.logprobs] == out.token_ids and all(len(e["top"]) == 2 for e in out.logprobs)
    assert out.prompt_logprobs is None
    scored = llm.generate([prompt + out.token_ids], adapter="a",
                          sampling=SamplingParams(max_tokens=0, prompt_logprobs=1))[0]
    assert scored.token_ids == [] and scored.prompt_logprobs[0] is None and len(scored.prompt_logprobs) == 8
    np.testing.assert_allclose([e["logprob"] for e in scored.prompt_logprobs[3:]],
                               [e["logprob"] for e in out.logprobs], atol=1e-4)
    assert out.cumulative_logprob == pytest.approx(sum(e["logprob"] for e in out.logprobs))


def test_n_and_best_of(llm):
    """Choice j of seed s is the request with seed s + j; best_of returns the one of highest cumulative logprob."""
    prompts = [[1, 2, 3], [4, 5]]
    outs = llm.generate(prompts, sampling=SamplingParams(temperature=1.0, max_tokens=5, seed=4, n=2))
    assert [o.index for o in outs] == [0, 1, 0, 1]
    singles = [llm.generate([p], sampling=SamplingParams(temperature=1.0, max_tokens=5, seed=4 + j))[0].token_ids
               for p in prompts for j in range(2)]
    assert [o.token_ids for o in outs] == singles
    best = llm.generate([prompts[0]], sampling=SamplingParams(temperature=1.0, max_tokens=5, seed=4, best_of=3))
    candidates = [llm.generate([prompts[0]], sampling=SamplingParams(temperature=1.0, max_tokens=5, seed=4 + j,
                                                                     logprobs=0))[0] for j in range(3)]
    assert len(best) == 1 and best[0].logprobs is None
    assert best[0].token_ids == max(candidates, key=lambda o: o.cumulative_logprob).token_ids
    with pytest.raises(RequestError, match="expand n and best_of with SamplingParams.choices"):
        llm.engine.add_request([1], SamplingParams(n=2))
