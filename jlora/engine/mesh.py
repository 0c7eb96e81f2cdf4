"""The engine on a ("data", "model") mesh: placed weights and KV pages, the sharded paged step, and LoRA slot
writes in the shard layout.

Only the device side differs from the one-device runner: rows, page tables and buckets are built by
`ModelRunner` (with `dp` row blocks, one per data replica, and replica-local page ids), and the bank's slot
bookkeeping stays in `SlotTable`. With several processes every process runs the same engine on the same
requests; process 0's host arrays of each step are broadcast (`distributed.broadcast_step`), so inputs that a
process draws for itself (unseeded sampling seeds) cannot make the processes disagree.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from jlora import distributed
from jlora.config import ModelConfig
from jlora.engine.model_runner import ModelRunner
from jlora.engine.sampler import decode_loop, step_sample
from jlora.lora import bank as bank_lib
from jlora.lora.bank import BucketBank, LoraBank
from jlora.model.llama import split_layers_enabled
from jlora.model.sharded import ShardedModel, bank_to_shard_layout
from jlora.sampling_penalties import write_slots
from jlora.sharding import make_mesh


def sharded_model(config: ModelConfig, tp: int, dp: int) -> ShardedModel:
    """The model on a dp x tp mesh of the first tp * dp devices (every device of every process when several)."""
    return ShardedModel(config, make_mesh(tp, dp))


class MeshBankLayout:
    """The LoRA bank placed in shard layout (`ShardedModel.place_bank`), written one slot at a time.

    An adapter's host a / b (logical columns, `jlora.lora.peft.LoraAdapter`) go through `bank_to_shard_layout`
    (B_k / B_v copied per kv head when num_kv_heads < tp) and into the placed bucket by a jitted write whose
    `out_shardings` are the bucket's own: the bank never changes placement, and the write compiles once per
    bucket, never per adapter.
    """

    def __init__(self, model: ShardedModel):
        self.model = model
        self._writers = []

    def place(self, bank: LoraBank) -> LoraBank:
        placed = self.model.place_bank(bank)
        self._writers = [jax.jit(bank_lib.write_bucket_slot, donate_argnums=(0,),
                                 out_shardings=jax.tree.map(lambda x: x.sharding, b)) for b in placed.buckets]
        return placed

    def write_slot(self, bank: LoraBank, global_slot: int, a: dict, b: dict) -> LoraBank:
        """`bank` with one slot set to an adapter given in logical columns (a[group] [L, d_in, n r], b[group] tuple
        of [L, r, d_j])."""
        i, _ = bank_lib.locate(bank, global_slot)
        a, b = bank_lib.fill_absent(bank.buckets[i], a, b, zeros=_host_zeros)
        one = LoraBank(buckets=(BucketBank(a=a, b=b, rank=bank.buckets[i].rank, offset=0),))
        laid = bank_to_shard_layout(one, self.model.plan).buckets[0]  # the same columns as `place_bank`
        return self._write(bank, global_slot, laid.a, laid.b)

    def clear_slot(self, bank: LoraBank, global_slot: int) -> LoraBank:
        """Zeroes one slot (host zeros in the bank's dtype, like an adapter's: the same compiled write)."""
        bucket = bank.buckets[bank_lib.locate(bank, global_slot)[0]]
        a = {g: _host_zeros(x) for g, x in bucket.a.items()}
        b = {g: tuple(_host_zeros(x) for x in xs) for g, xs in bucket.b.items()}
        return self._write(bank, global_slot, a, b)

    def _write(self, bank: LoraBank, global_slot: int, a: dict, b: dict) -> LoraBank:
        i, local = bank_lib.locate(bank, global_slot)
        buckets = list(bank.buckets)
        buckets[i] = self._writers[i](buckets[i], np.int32(local), a, b)
        return LoraBank(buckets=tuple(buckets))


@functools.partial(jax.jit, static_argnames=("model", "runtime", "num_logprobs"), donate_argnames=("cache", "penalty"))
def _mesh_step(params, bank, cache, penalty, tokens, positions, lora_ids, page_table, logit_index, sampling,
               bitmask=None, *, model: ShardedModel, runtime, num_logprobs):
    """`model_runner._paged_step` through `ShardedModel.forward`; the sampling keys are derived inside the
    program (`sampler.step_sample`), so no per-process array enters it."""
    logits, cache = model.forward(params, bank, tokens, positions, lora_ids, cache, logit_index=logit_index,
                                  runtime=runtime, page_table=page_table)
    out, penalty = step_sample(logits, sampling, penalty, num_logprobs, bitmask)
    return out, cache, penalty


@functools.partial(jax.jit, static_argnames=("model", "runtime", "max_steps", "greedy", "num_logprobs"),
                   donate_argnames=("cache", "penalty"))
def _mesh_decode(params, bank, cache, penalty, tokens, positions, lora_ids, page_table, row_steps, sampling, *,
                 model: ShardedModel, runtime, max_steps, greedy, num_logprobs):
    """`model_runner._paged_decode` through `ShardedModel.forward`."""
    def fwd(tok, pos, cache):
        return model.forward(params, bank, tok, pos, lora_ids, cache, logit_index=jnp.zeros_like(tok[:, 0]),
                             runtime=runtime, page_table=page_table)

    return decode_loop(fwd, cache, penalty, tokens, positions, row_steps, sampling, max_steps, greedy, num_logprobs)


class MeshRunner(ModelRunner):
    """`ModelRunner` on a mesh: params by `place_params`, KV pages by `pages_zeros` (data replica r holds pages
    [r P / dp, (r + 1) P / dp)), the step through `ShardedModel.forward`.

    Args:
      model: the sharded model (its mesh); the other arguments are `ModelRunner`'s, `num_pages` a multiple of dp.
    """

    def __init__(self, config: ModelConfig, params, *, model: ShardedModel, num_pages: int, **kw):
        if num_pages % model.dp:
            raise ValueError(f"num_pages={num_pages} must be a multiple of dp={model.dp}")
        self.model = model
        super().__init__(config, params, num_pages=num_pages, **kw)

    @property
    def dp(self) -> int:
        return self.model.dp

    @property
    def processes(self) -> int:
        return jax.process_count()

    def _place(self, params, num_pages: int, page_size: int, dtype):
        return self.model.place_params(params, split=split_layers_enabled(self.runtime)), self._new_cache()

    def _new_cache(self):
        return self.model.pages_zeros(self.num_pages, self.page_size, self.dtype)

    def _place_state(self, make):
        """Penalty state, replicated over the mesh (every row of a step may name any slot); made on the devices,
        so that every process holds the same zeros."""
        return jax.jit(make, out_shardings=NamedSharding(self.model.mesh, P()))()

    def _write_state(self, slot, counts, flags, bias_ids, bias):
        return _write_replicated(self.penalty, slot, counts, flags, bias_ids, bias, mesh=self.model.mesh)

    overlap_masks = False  # one program: a process's bitmask reaches the others with the step's arrays

    def _run(self, bank, a: dict, fill_mask=None):
        if fill_mask is not None:
            fill_mask()
        program, args, kwargs = self._step_call(bank, distributed.broadcast_step(a))  # process 0's batch, everywhere
        out, self.cache, penalty = program(*args, **kwargs)
        self.penalty = self.penalty if penalty is None else penalty
        return jax.tree.map(distributed.to_host, out)

    def _programs(self):
        return _mesh_step, _mesh_decode, {"model": self.model, "runtime": self.runtime}


@functools.partial(jax.jit, static_argnames=("mesh",), donate_argnums=(0,))
def _write_replicated(state, slot, counts, flags, bias_ids, bias, *, mesh):
    """`sampling_penalties.write_slots`, its result kept replicated over `mesh`."""
    out = write_slots(state, slot, counts, flags, bias_ids, bias)
    return jax.lax.with_sharding_constraint(out, NamedSharding(mesh, P()))


def _host_zeros(x) -> np.ndarray:
    """Host zeros shaped like one slot of bank array `x`, in its dtype."""
    return np.zeros(x.shape[:1] + x.shape[2:], x.dtype)
