"""The CPU's dense XLA path against the per-token gather reference, on fresh random inputs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from pallas_kernels import lora_expand, lora_shrink, ref_lora_expand, ref_lora_shrink, resolve_backend


@pytest.mark.parametrize("T,S,r,seed", [(1, 1, 8, 0), (7, 3, 16, 1), (133, 5, 32, 2), (64, 8, 4, 3)])
def test_xla_path_matches_reference(T, S, r, seed):
    rng = np.random.default_rng(seed)
    d_in, d_outs = 24, (16, 8, 8)
    x = jnp.asarray(rng.normal(size=(T, d_in)), jnp.float32)
    a = jnp.asarray(rng.normal(size=(S, d_in, 3 * r)), jnp.float32)
    bs = tuple(jnp.asarray(rng.normal(size=(S, r, d)), jnp.float32) for d in d_outs)
    y = jnp.asarray(rng.normal(size=(T, sum(d_outs))), jnp.float32)
    slots = jnp.asarray(rng.integers(-1, S, T), jnp.int32)  # unsorted, with -1 tokens
    v = jax.jit(lambda x, a, s: lora_shrink(x, a, s, backend="xla"))(x, a, slots)
    np.testing.assert_allclose(v, ref_lora_shrink(x, a, slots), rtol=1e-5, atol=1e-5)
    out = jax.jit(lambda y, v, s: lora_expand(y, v, bs, s, backend="xla"))(y, v, slots)
    np.testing.assert_allclose(out, ref_lora_expand(y, v, bs, slots), rtol=1e-5, atol=1e-4)
    untouched = np.asarray(slots) < 0
    np.testing.assert_array_equal(np.asarray(out)[untouched], np.asarray(y)[untouched])


def test_all_minus_one_is_identity_and_zero():
    x = jnp.ones((5, 4))
    a = jnp.ones((2, 4, 8))
    slots = jnp.full((5,), -1, jnp.int32)
    assert float(jnp.abs(lora_shrink(x, a, slots, backend="xla")).max()) == 0.0
    y = jnp.arange(20.0).reshape(5, 4)
    np.testing.assert_array_equal(lora_expand(y, jnp.ones((5, 8)), (jnp.ones((2, 8, 4)),), slots, backend="xla"), y)


def test_default_backend_follows_the_platform(monkeypatch):
    monkeypatch.delenv("JLORA_LORA_BACKEND", raising=False)
    expected = {"cpu": "xla", "gpu": "triton", "cuda": "triton", "tpu": "mosaic"}[jax.default_backend()]
    assert resolve_backend(None) == expected
