"""The device mesh and the one table from logical axes to mesh axes.

This is the only module that names the mesh axes. Model code describes arrays in logical axes
("vocab", "heads", "mlp", ...) and asks here for the `PartitionSpec` or the collective's axis name.

Mesh: ("data", "model") = (dp, tp). The "model" axis is the innermost (fastest-varying) one, so that
tensor-parallel peers are neighbouring devices (one NVLink island, one host) and data-parallel replicas
are the outer axis, which may span hosts.
"""

from __future__ import annotations

from typing import Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec

DATA = "data"
MODEL = "model"
MESH_AXES = (DATA, MODEL)

# Logical axis -> mesh axis (None: replicated). Every sharded array in jlora is described with these names.
LOGICAL_AXES: dict[str, str | None] = {
    "batch": DATA,       # sequences of a step; rows of a contiguous KV cache
    "pages": DATA,       # a paged KV pool: each data replica owns its own pages (page tables hold local ids)
    "vocab": MODEL,      # embedding rows, LM head columns (vocab-parallel)
    "heads": MODEL,      # query heads: w_o rows, fused q|k|v columns (column-parallel), LoRA o A rows
    "kv_heads": MODEL,   # KV cache heads, k/v columns of w_qkv, LoRA B_k / B_v columns
    "mlp": MODEL,        # intermediate features: gate|up columns, w_down rows, LoRA down A rows
    "embed": None,       # the hidden size D: replicated, so a layer's input and output need no gather
    "layers": None,
    "seq": None,
    "page_slots": None,  # positions inside a page
    "head_dim": None,
    "slots": None,       # LoRA bank slots
    "lora_rank": None,   # r is never split: rank-8 adapters work at any tp
}


def spec(*logical: str | None) -> PartitionSpec:
    """The `PartitionSpec` of an array whose axes have these logical names (None: an unnamed, replicated axis)."""
    for name in logical:
        if name is not None and name not in LOGICAL_AXES:
            raise ValueError(f"unknown logical axis {name!r}; known: {sorted(LOGICAL_AXES)}")
    return PartitionSpec(*(None if name is None else LOGICAL_AXES[name] for name in logical))


def mesh_axis(logical: str) -> str | None:
    """The mesh axis a logical axis is split over, e.g. for `psum` / `all_gather` inside `shard_map`."""
    if logical not in LOGICAL_AXES:
        raise ValueError(f"unknown logical axis {logical!r}; known: {sorted(LOGICAL_AXES)}")
    return LOGICAL_AXES[logical]


def make_mesh(tp: int = 1, dp: int = 1, devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A ("data", "model") mesh of dp x tp devices.

    Args:
      tp: tensor-parallel degree (size of "model").
      dp: data-parallel degree (size of "data").
      devices: the devices to use, in order; default `jax.devices()`. With several processes every
        device must take part (tp * dp == jax.device_count()), since every process runs every step.
    """
    if tp < 1 or dp < 1:
        raise ValueError(f"tp and dp must be >= 1, got tp={tp}, dp={dp}")
    devices = list(jax.devices() if devices is None else devices)
    n = tp * dp
    if n > len(devices):
        raise ValueError(f"tp * dp = {tp} * {dp} = {n} devices, but only {len(devices)} are available")
    if jax.process_count() > 1 and n != len(devices):
        raise ValueError(f"with {jax.process_count()} processes, tp * dp ({n}) must equal the global device "
                         f"count ({len(devices)})")
    if n == len(devices) and devices == list(jax.devices()):
        # Topology-aware order (NVLink / ICI neighbours on the "model" axis).
        return jax.make_mesh((dp, tp), MESH_AXES, axis_types=(AxisType.Auto,) * 2)
    return Mesh(np.array(devices[:n]).reshape(dp, tp), MESH_AXES, axis_types=(AxisType.Auto,) * 2)


def named(mesh: Mesh, *logical: str | None) -> NamedSharding:
    return NamedSharding(mesh, spec(*logical))


def tp_size(mesh: Mesh) -> int:
    return mesh.shape[MODEL]


def dp_size(mesh: Mesh) -> int:
    return mesh.shape[DATA]
