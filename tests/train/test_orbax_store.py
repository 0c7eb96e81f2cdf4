"""Base weights through orbax: exact round trip, dtype cast, NamedSharding targets, the load_model cache."""

import dataclasses
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, write_model
from jax.sharding import NamedSharding, PartitionSpec

from jlora.checkpoint.hf import load_hf_dir
from jlora.checkpoint.orbax_store import restore_params, save_params
from jlora.checkpoint.resolve import ORBAX_DIR, load_converted
from jlora.model import init_params, param_shapes


def _equal(a, b) -> bool:
    return all(jax.tree.leaves(jax.tree.map(lambda x, y: bool(np.array_equal(np.asarray(x), np.asarray(y))), a, b)))


def test_restore_is_exact_and_casts(tmp_path):
    params = init_params(TINY, jax.random.key(0))
    save_params(params, str(tmp_path / "ckpt"))
    restored = restore_params(str(tmp_path / "ckpt"), TINY)
    assert jax.tree.structure(restored) == jax.tree.structure(params)
    assert _equal(restored, params)
    half = restore_params(str(tmp_path / "ckpt"), TINY, dtype=jnp.bfloat16)
    assert {x.dtype for x in jax.tree.leaves(half)} == {jnp.dtype(jnp.bfloat16)}
    assert _equal(half, jax.tree.map(lambda x: x.astype(jnp.bfloat16), params))
    with pytest.raises(ValueError, match="does not hold the params"):
        restore_params(str(tmp_path / "ckpt"), dataclasses.replace(TINY, num_layers=3))


def test_restore_onto_named_shardings(tmp_path):
    params = init_params(TINY, jax.random.key(1))
    save_params(params, str(tmp_path / "ckpt"))
    mesh = jax.make_mesh((1, 1), ("data", "model"))
    # Megatron-like specs per leaf (one device here, so each is trivially satisfiable, but each is honoured).
    specs = {"embed": PartitionSpec("model", None), "final_norm": PartitionSpec(), "lm_head": PartitionSpec(None, "model"),
             "layers": {k: PartitionSpec(*([None] * (len(s) - 1)), "model")
                        for k, s in param_shapes(TINY)["layers"].items()}}
    shardings = jax.tree.map(lambda p: NamedSharding(mesh, p), specs, is_leaf=lambda x: isinstance(x, PartitionSpec))
    restored = restore_params(str(tmp_path / "ckpt"), TINY, shardings=shardings)
    for got, want in zip(jax.tree.leaves(restored), jax.tree.leaves(shardings)):
        assert got.sharding == want
    assert _equal(restored, params)
    one = NamedSharding(mesh, PartitionSpec())
    assert all(x.sharding == one for x in jax.tree.leaves(restore_params(str(tmp_path / "ckpt"), TINY, shardings=one)))


def test_load_converted_writes_then_restores_orbax(tmp_path):
    model_dir = write_model(str(tmp_path / "converted"), TINY, seed=3)
    _, want = load_hf_dir(model_dir)
    config, first = load_converted(model_dir)  # no checkpoint yet: reads safetensors, writes one
    assert config == TINY and os.path.isdir(os.path.join(model_dir, ORBAX_DIR))
    _, second = load_converted(model_dir)  # restored from orbax
    assert _equal(first, want) and _equal(second, want)
    _, half = load_converted(model_dir, jnp.bfloat16)
    assert half["embed"].dtype == jnp.bfloat16
