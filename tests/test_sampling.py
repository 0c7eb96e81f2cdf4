import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora.errors import RequestError
from jlora.sampling import SamplingParams, sample


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
    ({"max_tokens": 0}, "max_tokens"), ({"stop": [""]}, "stop"), ({"stop_token_ids": [-1]}, "stop_token_ids"),
    ({"seed": "x"}, "seed")])
def test_bad_values_are_named(kwargs, match):
    with pytest.raises(RequestError, match=match):
        SamplingParams(**kwargs)
