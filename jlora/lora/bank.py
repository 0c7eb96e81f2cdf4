"""The device LoRA bank: fixed slots per rank bucket, fused qkv and gate_up.

Shapes depend only on the model and `LoraBankConfig`, so writing an adapter into a slot never recompiles.
Global slot ids number the slots of every bucket in order: bucket 0 holds [0, s0), bucket 1 [s0, s0+s1), ...
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp

from jlora.config import LORA_GROUPS, LoraBankConfig, ModelConfig


def group_dims(config: ModelConfig) -> dict[str, tuple[int, tuple[int, ...]]]:
    """(d_in, (d_out of each fused slice)) for every LoRA group."""
    d, f = config.hidden_size, config.intermediate_size
    return {
        "qkv": (d, (config.q_dim, config.kv_dim, config.kv_dim)),
        "o": (config.q_dim, (d,)),
        "gate_up": (d, (f, f)),
        "down": (f, (d,)),
    }


@functools.partial(jax.tree_util.register_dataclass, data_fields=("a", "b"), meta_fields=("rank", "offset"))
@dataclasses.dataclass
class BucketBank:
    """The slots of one rank bucket.

    Attributes:
      a: group -> [L, S, d_in, n * rank], the n fused slices' A side by side.
      b: group -> tuple of n arrays [L, S, rank, d_j]; the adapter scale is folded in.
      rank: the bucket's rank (static).
      offset: the global id of this bucket's slot 0 (static).
    """

    a: dict[str, jax.Array]
    b: dict[str, tuple[jax.Array, ...]]
    rank: int
    offset: int

    @property
    def num_slots(self) -> int:
        return next(iter(self.a.values())).shape[1]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class LoraBank:
    """Every bucket's slots. Pass it to `forward`; index [layer] slices come from `layer_slice`."""

    buckets: tuple[BucketBank, ...]

    @property
    def num_slots(self) -> int:
        return sum(b.num_slots for b in self.buckets)

    @classmethod
    def from_peft(cls, config: ModelConfig, adapters, *, bank_config: LoraBankConfig | None = None,
                  dtype=jnp.float32) -> tuple["LoraBank", dict[str, int]]:
        """A bank holding PEFT adapter directories, one slot each: `jlora.lora.loader.bank_from_peft`.

        Args:
          config: the base model's (`jlora.load_model(...)[0].config`).
          adapters: {name: PEFT directory}.
          bank_config: buckets and slots; default: one slot per adapter in the smallest default rank bucket that
            holds it.
          dtype: the bank's (the base weights', usually).

        Returns:
          (bank, {name: global slot id}); pass ids as `forward`'s `lora_ids`, per row [B] or per token [B, T],
          -1 for the base model alone.
        """
        from jlora.lora.loader import bank_from_peft  # loader builds on this module: imported on call, not at load

        return bank_from_peft(config, adapters, bank_config=bank_config, dtype=dtype)


def init_bank(config: ModelConfig, bank_config: LoraBankConfig, dtype=jnp.float32) -> LoraBank:
    """An all-zero bank (every slot empty)."""
    buckets, offset = [], 0
    dims = group_dims(config)
    L = config.num_layers
    for rank, slots in bank_config.active:
        a, b = {}, {}
        for group in bank_config.groups:
            d_in, d_outs = dims[group]
            a[group] = jnp.zeros((L, slots, d_in, len(d_outs) * rank), dtype)
            b[group] = tuple(jnp.zeros((L, slots, rank, d), dtype) for d in d_outs)
        buckets.append(BucketBank(a=a, b=b, rank=rank, offset=offset))
        offset += slots
    return LoraBank(buckets=tuple(buckets))


def bank_nbytes(bank: LoraBank) -> int:
    return sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(bank))


def locate(bank: LoraBank, global_slot: int) -> tuple[int, int]:
    """(bucket index, local slot) of a global slot id."""
    for i, bucket in enumerate(bank.buckets):
        if bucket.offset <= global_slot < bucket.offset + bucket.num_slots:
            return i, global_slot - bucket.offset
    raise IndexError(f"slot {global_slot} is outside the bank's {bank.num_slots} slots")


def write_bucket_slot(bucket: BucketBank, slot: jax.Array, a: dict, b: dict) -> BucketBank:
    """`bucket` with local slot `slot` set to one adapter's a / b (shaped like one slot). Unjitted: callers jit it
    (with donation, and on a mesh with the bucket's shardings as `out_shardings`)."""
    new_a = {g: bucket.a[g].at[:, slot].set(a[g].astype(bucket.a[g].dtype)) for g in bucket.a}
    new_b = {g: tuple(old.at[:, slot].set(new.astype(old.dtype)) for old, new in zip(bucket.b[g], b[g]))
             for g in bucket.b}
    return BucketBank(a=new_a, b=new_b, rank=bucket.rank, offset=bucket.offset)


_write_slot = jax.jit(write_bucket_slot, donate_argnums=(0,))


_ZEROS: dict[tuple, jax.Array] = {}


def _slot_zeros(x: jax.Array) -> jax.Array:
    """Device zeros shaped like one slot of bank array `x` (made once per shape; never sent from the host)."""
    key = (x.shape[:1] + x.shape[2:], x.dtype)
    if key not in _ZEROS:
        _ZEROS[key] = jnp.zeros(*key)
    return _ZEROS[key]


def fill_absent(bucket: BucketBank, a: dict, b: dict, zeros=_slot_zeros) -> tuple[dict, dict]:
    """An adapter's (a, b) with `zeros(bank array)` for every group it does not target (given as None)."""
    a = {g: zeros(bucket.a[g]) if a[g] is None else a[g] for g in bucket.a}
    b = {g: tuple(zeros(x) for x in bucket.b[g]) if b[g] is None else b[g] for g in bucket.b}
    return a, b


def write_slot(bank: LoraBank, global_slot: int, a: dict, b: dict) -> LoraBank:
    """Returns `bank` with one slot overwritten. The slot index is traced, so this compiles once per bucket.

    Args:
      a, b: host arrays shaped like one slot of the target bucket: a[group] [L, d_in, n*rank],
        b[group] tuple of [L, rank, d_j] (see `jlora.lora.peft.load_adapter`); None for a group the adapter
        does not target, which is zeroed on the device.
    """
    i, local = locate(bank, global_slot)
    buckets = list(bank.buckets)
    buckets[i] = _write_slot(buckets[i], jnp.int32(local), *fill_absent(buckets[i], a, b))
    return LoraBank(buckets=tuple(buckets))


def clear_slot(bank: LoraBank, global_slot: int) -> LoraBank:
    """Zeroes one slot, so stale weights can never leak into a later adapter."""
    i, _ = locate(bank, global_slot)
    bucket = bank.buckets[i]
    a = {g: jnp.zeros(x.shape[:1] + x.shape[2:], x.dtype) for g, x in bucket.a.items()}
    b = {g: tuple(jnp.zeros(x.shape[:1] + x.shape[2:], x.dtype) for x in xs) for g, xs in bucket.b.items()}
    return write_slot(bank, global_slot, a, b)
