import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.errors import RequestError
from jlora.sampling import SamplingParams, candidates, sample


def _logits(seed, B=4, V=50):
    return jnp.asarray(np.random.default_rng(seed).normal(0, 3, (B, V)), jnp.float32)


def _keys(seeds):
    return jax.vmap(jax.random.key)(jnp.asarray(list(seeds), jnp.uint32))


_SAMPLE = jax.jit(sample)  # one program per batch size, not one dispatch per op


def _draw(logits, temp, k, p, seeds):
    B = logits.shape[0]
    return np.asarray(_SAMPLE(logits, jnp.full((B,), temp, jnp.float32), jnp.full((B,), k, jnp.int32),
                             jnp.full((B,), p, jnp.float32), _keys(seeds)))


def test_greedy_is_argmax():
    logits = _logits(0)
    assert (_draw(logits, 0.0, 0, 1.0, range(4)) == np.argmax(np.asarray(logits), -1)).all()


def test_top_k_1_and_tiny_top_p_are_greedy():
    logits = _logits(1)
    want = np.argmax(np.asarray(logits), -1)
    assert (_draw(logits, 1.5, 1, 1.0, range(4)) == want).all()
    assert (_draw(logits, 1.5, 0, 1e-6, range(4)) == want).all()


def test_same_seed_same_tokens_and_different_seeds_differ():
    logits = jnp.tile(_logits(2, B=1), (64, 1))
    a = _draw(logits, 1.0, 0, 1.0, [7] * 64)
    assert len(set(a.tolist())) == 1  # one seed -> one draw
    b = _draw(logits, 1.0, 0, 1.0, range(64))
    assert len(set(b.tolist())) > 3


def test_top_k_restricts_support():
    logits = jnp.tile(_logits(3, B=1), (200, 1))
    allowed = set(np.argsort(-np.asarray(logits[0]))[:3].tolist())
    drawn = set(_draw(logits, 5.0, 3, 1.0, range(200)).tolist())
    assert drawn <= allowed and len(drawn) > 1


def test_top_p_restricts_support():
    logits = jnp.tile(jnp.log(jnp.asarray([[0.5, 0.3, 0.15, 0.05]])), (300, 1))
    drawn = set(_draw(logits, 1.0, 0, 0.75, range(300)).tolist())
    assert drawn == {0, 1}


def test_sampled_frequencies_follow_probabilities():
    probs = np.array([0.6, 0.3, 0.1])
    logits = jnp.tile(jnp.log(jnp.asarray(probs))[None], (4000, 1))
    freq = np.bincount(_draw(logits, 1.0, 0, 1.0, range(4000)), minlength=3) / 4000
    assert np.abs(freq - probs).max() < 0.03


@pytest.mark.parametrize("kwargs,match", [
    ({"temperature": -0.5}, "temperature"), ({"temperature": float("nan")}, "temperature"),
    ({"top_p": 0.0}, "top_p"), ({"top_p": 1.5}, "top_p"), ({"top_k": -3}, "top_k"),
    ({"max_tokens": -1}, "max_tokens"), ({"logprobs": 21}, "logprobs"), ({"prompt_logprobs": -1}, "prompt_logprobs"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": "x"}, "seed"), ({"min_p": 1.5}, "min_p"), ({"min_p": -0.1}, "min_p"),
    ({"presence_penalty": 2.5}, "presence_penalty"), ({"frequency_penalty": -2.01}, "frequency_penalty"),
    ({"repetition_penalty": 0.0}, "repetition_penalty"), ({"repetition_penalty": float("inf")}, "repetition_penalty"),
    ({"min_tokens": 17}, r"min_tokens must be an integer in \[0, max_tokens=16\]"), ({"min_tokens": -1}, "min_tokens"),
    ({"logit_bias": {5: 101}}, r"logit_bias\[5\]"), ({"logit_bias": {"5": 1}}, "logit_bias keys"),
    ({"logit_bias": {i: 1 for i in range(301)}}, "at most 300"), ({"logit_bias": [(1, 1), (1, 2)]}, "twice"),
    ({"logit_bias": 3}, "logit_bias must map"), ({"n": 0}, "n must"), ({"n": 3, "best_of": 2}, r"best_of .*\[n=3, 64\]")])
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs)


def test_logit_bias_is_normalized_to_sorted_pairs():
    sp = SamplingParams(logit_bias={7: -1, 2: 0.5})
    assert sp.logit_bias == ((2, 0.5), (7, -1.0)) and sp.uses_processors
    assert SamplingParams(logit_bias=[[7, -1], [2, 0.5]]) == sp  # as JSON brings it back (multi-host commands)
    assert not SamplingParams(temperature=0.7, top_p=0.9, min_p=0.1).uses_processors


# -- the sort-free sampler against a full sort, as vLLM defines top_k, top_p and min_p -------------------------

def ref_probs(logits, temperature, top_k, top_p, min_p):
    """NumPy, float64: softmax(logits / T) after min_p (p >= min_p * p_max), top_k (the k largest) and top_p
    (renormalized over the top_k set; keep while the mass before a token is below p, at least one)."""
    s = np.asarray(logits, np.float64) / temperature
    V = s.size
    p = np.exp(s - s.max())
    p /= p.sum()
    s = np.where(p >= min_p * p.max(), s, -np.inf)
    order = np.argsort(-s, kind="stable")
    if 0 < top_k < V:
        s[order[top_k:]] = -np.inf
    p = np.exp(s - s.max())
    p /= p.sum()
    before = np.cumsum(p[order]) - p[order]
    drop = order[(before >= top_p) & (np.arange(V) > 0)]
    p[drop] = 0
    return p / p.sum()


_CANDIDATES = jax.jit(candidates, static_argnames=("window",))


def dense_probs(logits, temperature, top_k, top_p, min_p, window):
    """The distribution `sample` draws from, as a dense [B, V] array."""
    B, V = logits.shape
    windowed, ids, w_win, w_full = map(np.asarray, _CANDIDATES(
        jnp.asarray(logits, jnp.float32), jnp.asarray(temperature, jnp.float32), jnp.asarray(top_k, jnp.int32),
        jnp.asarray(top_p, jnp.float32), jnp.asarray(min_p, jnp.float32), window=window))
    out = np.zeros((B, V))
    for b in range(B):
        if windowed[b]:
            np.add.at(out[b], ids[b], w_win[b])
        else:
            out[b] = w_full[b]
        out[b] /= out[b].sum()
    return out


W, VOCAB = 16, 200  # a window far smaller than the vocabulary, so that it matters


def _rows(seed, scale):
    return np.random.default_rng(seed).normal(0, scale, (6, VOCAB)).astype(np.float32)


def test_window_sampling_equals_a_full_sort_when_the_candidates_fit():
    """Exact (to float32) when 1 <= top_k <= window with any top_p and min_p, when top_k is off and the top_p set
    fits the window, and for rows that truncate nothing (the whole vocabulary, no window)."""
    cases = [  # (temperature, top_k, top_p, min_p)
        (1.0, 5, 1.0, 0.0), (0.7, 16, 0.8, 0.0), (1.3, 12, 0.5, 0.05), (1.0, 0, 0.3, 0.0),  # peaked rows: p = 0.3
        (2.0, -1, 1.0, 0.0), (1.0, 0, 1.0, 1e-3)]
    logits = _rows(0, 4.0)  # peaked: a 0.3 nucleus holds a few tokens
    T, k, p, m = map(np.array, zip(*cases))
    got = dense_probs(logits, T, k, p, m, W)
    for b, case in enumerate(cases):
        want = ref_probs(logits[b], *case)
        assert (want > 0).sum() <= W or case[1] <= 0 and case[2] == 1, "the case must fit the window"
        np.testing.assert_allclose(got[b], want, atol=2e-6, err_msg=str(case))
    assert (got[5] > 0).sum() > W  # min_p alone keeps more tokens than the window: no window for it


def test_window_sampling_outside_the_exact_cases_draws_from_the_window():
    """top_k above the window acts as top_k = window; a top_p set wider than the window is cut to it."""
    logits = _rows(1, 0.5)  # flat: a 0.95 nucleus holds most of the 200 tokens
    cases = [(1.0, 50, 1.0, 0.0), (1.0, 0, 0.95, 0.0), (1.0, 150, 0.95, 0.0)]
    T, k, p, m = map(np.array, zip(*cases))
    got = dense_probs(logits[:3], T, k, p, m, W)
    np.testing.assert_allclose(got[0], ref_probs(logits[0], 1.0, W, 1.0, 0.0), atol=2e-6)
    assert (ref_probs(logits[1], 1.0, 0, 0.95, 0.0) > 0).sum() > W
    np.testing.assert_allclose(got[1], ref_probs(logits[1], 1.0, W, 1.0, 0.0), atol=2e-6)
    np.testing.assert_allclose(got[2], ref_probs(logits[2], 1.0, W, 0.95, 0.0), atol=2e-6)
    assert (got[2] > 0).sum() == W - 1  # top_p, renormalized over the window, still cuts inside it


def test_draws_follow_the_windowed_distribution():
    logits = np.tile(_rows(2, 2.0)[:1], (3000, 1))
    B = logits.shape[0]
    drawn = np.asarray(jax.jit(sample, static_argnames=("greedy_only", "window"))(
        jnp.asarray(logits), jnp.full((B,), 1.0), jnp.full((B,), 8, jnp.int32), jnp.full((B,), 0.9),
        _keys(range(B)), min_p=jnp.full((B,), 0.01), window=W))
    want = ref_probs(logits[0], 1.0, 8, 0.9, 0.01)
    freq = np.bincount(drawn, minlength=VOCAB) / B
    assert set(np.flatnonzero(freq)) <= set(np.flatnonzero(want))
    assert np.abs(freq - want).max() < 0.03


def test_choices_are_one_sequence_each_with_its_own_seed():
    sp = SamplingParams(n=2, best_of=3, seed=(1 << 32) - 2, temperature=0.9)
    seqs = sp.choices()
    assert [c.seed for c in seqs] == [(1 << 32) - 2, (1 << 32) - 1, 0]
    assert all(c.n == 1 and c.best_of is None and c.logprobs == 0 for c in seqs)  # best_of picks by logprob
    assert [c.logprobs for c in SamplingParams(n=2, logprobs=3).choices()] == [3, 3]
    assert [c.seed for c in SamplingParams(n=2).choices()] == [None, None]
