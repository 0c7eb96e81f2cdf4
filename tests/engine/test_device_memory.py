"""A device out of memory at start-up fails the runner's construction with what to change, not the first step."""

import jax
import jax.numpy as jnp
import pytest
from helpers import TINY

from jlora.engine.model_runner import ModelRunner
from jlora.errors import DeviceMemoryError
from jlora.model import init_params


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0), jnp.float32)


def _runner(params):
    return ModelRunner(TINY, params, num_pages=64, page_size=4, max_model_len=256, max_num_seqs=8)


def test_out_of_memory_names_the_settings(params, monkeypatch):
    def no_room(self, *a):
        raise jax.errors.JaxRuntimeError("RESOURCE_EXHAUSTED: Out of memory while trying to allocate 18.01GiB")

    monkeypatch.setattr(ModelRunner, "_place", no_room)
    with pytest.raises(DeviceMemoryError) as err:
        _runner(params)
    msg = str(err.value)
    half = 64 * 4 * TINY.num_layers * TINY.kv_dim * 4  # float32 K (or V) pages
    assert f"64 KV pages ({2 * half / 2**30:.1f} GiB" in msg
    for hint in ("memory_bytes", "--num-pages", "XLA_CLIENT_MEM_FRACTION", "18.01GiB"):
        assert hint in msg


def test_other_runtime_errors_pass_through(params, monkeypatch):
    def broken(self, *a):
        raise jax.errors.JaxRuntimeError("INTERNAL: something else")

    monkeypatch.setattr(ModelRunner, "_place", broken)
    with pytest.raises(jax.errors.JaxRuntimeError, match="INTERNAL"):
        _runner(params)


def test_a_runner_that_fits_is_built(params):
    runner = _runner(params)
    assert runner.cache.k.shape[2] == 64 and not runner.cache.k.is_deleted()
