"""Paged decode through JAX's Pallas GPU paged-attention kernel (interpret mode here) equals the XLA path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, rel_err

from jlora.model import KVCache, attention, forward, init_params


def _decode_logits(monkeypatch, mode, params, table, tokens, positions, lens, steps=4):
    monkeypatch.setenv(attention.ATTENTION_ENV, mode)
    B = len(lens)
    cache = KVCache.pages(TINY, 32, 4)
    prefill = jax.jit(lambda c, t, p: forward(params, None, t, p, None, c, config=TINY, page_table=table))
    decode = jax.jit(lambda c, t, p: forward(params, None, t, p, None, c, config=TINY, page_table=table,
                                             logit_index=jnp.zeros((B,), jnp.int32)))
    _, cache = prefill(cache, tokens, positions)
    token, out = tokens[np.arange(B), lens - 1][:, None], []
    for i in range(steps):
        pos = (lens + i)[:, None].astype(np.int32)
        if i == 0:
            pos[-1, 0] = -1  # a padding row: writes nothing, its output is never used
        logits, cache = decode(cache, jnp.asarray(token), jnp.asarray(pos))
        out.append(np.asarray(logits))
        token = out[-1].argmax(-1)[:, None].astype(np.int32)
    return np.stack(out)


@pytest.mark.parametrize("programs", [1, 512])  # no split (8 pages per block) and an 8-way split
def test_pallas_paged_decode_matches_xla(monkeypatch, programs):
    monkeypatch.setattr(attention, "DECODE_ATTENTION_PROGRAMS", programs)
    rng = np.random.default_rng(0)
    params = init_params(TINY, jax.random.key(0), jnp.float32)
    lens = np.array([5, 13, 2])
    table = jnp.asarray(rng.permutation(32)[:24].reshape(3, 8), jnp.int32)  # disjoint pages per row
    tokens = rng.integers(0, TINY.vocab_size, (3, 16)).astype(np.int32)
    positions = np.where(np.arange(16)[None] < lens[:, None], np.arange(16)[None], -1).astype(np.int32)
    want = _decode_logits(monkeypatch, "xla", params, table, tokens, positions, lens)
    mode = "pallas" if jax.default_backend() == "gpu" else "interpret"  # compiled on a GPU
    got = _decode_logits(monkeypatch, mode, params, table, tokens, positions, lens)
    # Every step of the real rows (the padded row's garbage token then differs, so it is not compared).
    assert rel_err(got[:, :2], want[:, :2]) < 1e-5
    assert np.abs(want[:, :2]).max() > 0.05 and rel_err(want[0, :2], want[1, :2]) > 1e-3  # not trivially equal


def test_decode_backend_choice(monkeypatch):
    monkeypatch.setenv(attention.ATTENTION_ENV, "pallas")
    assert attention.decode_backend(TINY, 1) == "pallas"
    assert attention.decode_backend(TINY, 16) == "xla"  # prefill chunks stay on XLA
    monkeypatch.delenv(attention.ATTENTION_ENV)
    assert attention.decode_backend(TINY, 1) == ("pallas" if jax.default_backend() == "gpu" else "xla")
    monkeypatch.setenv(attention.ATTENTION_ENV, "flash")
    with pytest.raises(ValueError, match="JLORA_ATTENTION"):
        attention.decode_backend(TINY, 1)


def test_decode_partitions():
    # Large batches are not split and read 8 pages per block; small ones split until there are programs enough.
    assert attention.decode_partitions(64, 8, 32) == (1, 8)
    assert attention.decode_partitions(32, 8, 32) == (2, 8)
    assert attention.decode_partitions(8, 8, 128) == (8, 8)
    assert attention.decode_partitions(2, 8, 128) == (16, 8)  # at most 16 partitions
    assert attention.decode_partitions(2, 8, 16) == (16, 1)  # the split stops at the page-table width
    assert attention.decode_partitions(1, 8, 4) == (4, 1)
