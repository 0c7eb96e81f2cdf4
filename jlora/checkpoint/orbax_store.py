"""Base weights as an orbax checkpoint, restored straight onto their target devices and shardings.

The GGUF path dequantizes and re-lays out every tensor, and the safetensors path builds host arrays
before copying them; an orbax restore reads each array (or each shard of it) directly into device
buffers laid out as asked. `jlora.checkpoint.resolve.load_model` keeps one beside a converted model.
"""

from __future__ import annotations

import os
from typing import Any

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp

from jlora.config import ModelConfig
from jlora.model.llama import Params, param_shapes

ShardingTree = Any  # a `jax.sharding.Sharding` for every leaf, or a pytree of them shaped like the params


def save_params(params: Params, path: str) -> str:
    """Writes `params` (any pytree of arrays) as an orbax checkpoint at `path`, which must not exist yet.

    Orbax writes into a temporary directory and renames it when complete, so `path` never holds half a
    checkpoint.
    """
    path = os.path.abspath(path)
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(path, params)
        ckptr.wait_until_finished()
    return path


def abstract_params(config: ModelConfig, dtype=jnp.float32, shardings: ShardingTree | None = None) -> Params:
    """`jax.ShapeDtypeStruct`s of the model's params, each carrying its target sharding.

    Args:
      shardings: one sharding for every leaf, a pytree of shardings like `param_shapes(config)`, or None
        for the default device.
    """
    shapes = param_shapes(config)
    is_shape = lambda s: isinstance(s, tuple)  # noqa: E731
    if shardings is None:
        shardings = jax.sharding.SingleDeviceSharding(jax.devices()[0])
    if isinstance(shardings, jax.sharding.Sharding):
        shardings = jax.tree.map(lambda _: shardings, shapes, is_leaf=is_shape)
    return jax.tree.map(lambda s, sh: jax.ShapeDtypeStruct(s, jnp.dtype(dtype), sharding=sh), shapes, shardings,
                        is_leaf=is_shape)


def restore_params(path: str, config: ModelConfig, shardings: ShardingTree | None = None,
                   dtype=jnp.float32) -> Params:
    """The params saved at `path`, cast to `dtype` and placed on `shardings` (see `abstract_params`).

    Shapes are checked against `config`: a checkpoint of another model raises `ValueError`.
    """
    target = abstract_params(config, dtype, shardings)
    path = os.path.abspath(path)
    with ocp.Checkpointer(ocp.StandardCheckpointHandler()) as ckptr:
        saved = ckptr.metadata(path).item_metadata.tree
        if jax.tree.map(lambda m: tuple(m.shape), saved) != jax.tree.map(lambda s: tuple(s.shape), target):
            raise ValueError(f"orbax checkpoint {path!r} does not hold the params of this model ({config})")
        return ckptr.restore(path, args=ocp.args.StandardRestore(target))
