"""Tensor- and data-parallel forward: the whole model inside one `shard_map` (Megatron + S-LoRA TP).

Layout on a ("data", "model") mesh of dp x tp devices (axis names come from `jlora.sharding`):
  - qkv and gate_up are column-parallel, o and down row-parallel; the KV cache is split over kv heads.
  - The fused columns are permuted into shard-major order when the weights are placed,
    [q_0|k_0|v_0 | q_1|k_1|v_1 | ...] and [gate_0|up_0 | gate_1|up_1 | ...], so that each shard's local
    slice is exactly the layout `llama._layer` expects. With fewer kv heads than shards, each kv head is
    copied to the shards whose query heads use it (K' = tp kv heads in the placed weights and cache).
  - LoRA: on qkv / gate_up, A is replicated and each B_j is split along d_out (the same head copies as the
    base weights); on o / down, A is split along d_in and B replicated. The rank is never split, so a
    rank-8 adapter works at any tp. The row-parallel LoRA delta is added to the base partial sum before the
    one all-reduce, so LoRA adds no collective.
  - Embedding and LM head are vocab-parallel (vocab padded to a multiple of tp): one all-reduce after the
    lookup, one all-gather of the logits.
  - Data parallelism splits the batch (and a paged KV pool) over "data"; weights are replicated over it.

Per step that is 2 all-reduces per layer plus one all-reduce and one all-gather, with or without LoRA.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding

from jlora import sharding
from jlora.config import ModelConfig, RuntimeConfig
from jlora.lora.bank import BucketBank, LoraBank
from jlora.lora.ops import make_lora_batch
from jlora.model.kv_cache import KVCache
from jlora.model import blocks
from jlora.model.llama import Params, decoder_stack, split_layers

# Logical axes of every placed (shard-major) parameter.
_LAYER_AXES = {
    "attn_norm": ("layers", "embed"),
    "mlp_norm": ("layers", "embed"),
    "post_attn_norm": ("layers", "embed"),  # applied to the reduced (whole) outputs: replicated
    "post_mlp_norm": ("layers", "embed"),
    "w_qkv": ("layers", "embed", "heads"),  # [L, D, (N + 2K') H], shard-major q|k|v
    "b_qkv": ("layers", "heads"),
    "w_o": ("layers", "heads", "embed"),  # row-parallel
    "b_o": ("layers", "embed"),  # added after the all-reduce
    "q_norm": ("layers", "head_dim"),  # one weight per head_dim feature, shared by every head: replicated
    "k_norm": ("layers", "head_dim"),
    "w_gate_up": ("layers", "embed", "mlp"),  # [L, D, 2F], shard-major gate|up
    "w_down": ("layers", "mlp", "embed"),  # row-parallel
    # FP8 weights' scales, one per output column (`quant`): split like those columns; a row-parallel weight's
    # output columns are whole on every shard, so its scale is replicated (it scales each partial sum alike).
    "w_qkv_scale": ("layers", "heads"),
    "w_o_scale": ("layers", "embed"),
    "w_gate_up_scale": ("layers", "mlp"),
    "w_down_scale": ("layers", "embed"),
}
_TOP_AXES = {"embed": ("vocab", "embed"), "final_norm": ("embed",), "lm_head": ("embed", "vocab")}
# LoRA bank: A [L, S, d_in, n*r] and each B_j [L, S, r, d_j].
_BANK_A_AXES = {"qkv": ("layers", "slots", "embed", "lora_rank"), "o": ("layers", "slots", "heads", "lora_rank"),
                "gate_up": ("layers", "slots", "embed", "lora_rank"), "down": ("layers", "slots", "mlp", "lora_rank")}
_B = ("layers", "slots", "lora_rank")
_BANK_B_AXES = {"qkv": (_B + ("heads",), _B + ("kv_heads",), _B + ("kv_heads",)), "o": (_B + ("embed",),),
                "gate_up": (_B + ("mlp",), _B + ("mlp",)), "down": (_B + ("embed",),)}
CACHE_AXES = ("layers", "batch", "seq", "kv_heads", "head_dim")  # [L, B, S, K', H]
PAGED_CACHE_AXES = ("kv_heads", "layers", "pages", "page_slots", "head_dim")  # [K', L, P, page_size, H]


@dataclasses.dataclass(frozen=True)
class ShardPlan:
    """Shape arithmetic of a tp-way split (no devices involved).

    Attributes:
      config: the model.
      tp: the tensor-parallel degree.
    """

    config: ModelConfig
    tp: int

    def __post_init__(self):
        c, tp = self.config, self.tp
        if tp < 1:
            raise ValueError(f"tp must be >= 1, got {tp}")
        if c.num_heads % tp:
            raise ValueError(f"tp={tp} must divide num_heads={c.num_heads}")
        if c.num_kv_heads % tp and tp % c.num_kv_heads:
            raise ValueError(f"tp={tp} must divide num_kv_heads={c.num_kv_heads} or be a multiple of it")
        if c.intermediate_size % tp:
            raise ValueError(f"tp={tp} must divide intermediate_size={c.intermediate_size}")

    @property
    def kv_heads(self) -> int:
        """K': kv heads after copying, so that every shard holds at least one."""
        return max(self.config.num_kv_heads, self.tp)

    @property
    def vocab_padded(self) -> int:
        return -(-self.config.vocab_size // self.tp) * self.tp

    def kv_columns(self) -> np.ndarray:
        """[K' H] indices into a [K H] k (or v) block: placed kv head j holds original head j * K // K'."""
        H, K = self.config.head_dim, self.config.num_kv_heads
        heads = np.arange(self.kv_heads) * K // self.kv_heads
        return (heads[:, None] * H + np.arange(H)).reshape(-1)

    def qkv_columns(self) -> np.ndarray:
        """[(N + 2K') H] indices into the logical [q | k | v] columns, shard-major: [q_0|k_0|v_0 | q_1|...]."""
        N, H, K = self.config.num_heads, self.config.head_dim, self.config.num_kv_heads
        q = np.arange(N * H).reshape(self.tp, -1)
        kv = self.kv_columns().reshape(self.tp, -1)
        return np.concatenate([q, N * H + kv, (N + K) * H + kv], axis=1).reshape(-1)

    def gate_up_columns(self) -> np.ndarray:
        """[2F] indices into the logical [gate | up] columns, shard-major: [gate_0|up_0 | gate_1|up_1 | ...]."""
        F = self.config.intermediate_size
        g = np.arange(F).reshape(self.tp, -1)
        return np.concatenate([g, F + g], axis=1).reshape(-1)


def _xp(x):
    return np if isinstance(x, np.ndarray) else jnp


def _pad_axis(x, axis: int, size: int):
    pad = [(0, 0)] * x.ndim
    pad[axis] = (0, size - x.shape[axis])
    return _xp(x).pad(x, pad) if size != x.shape[axis] else x


def to_shard_layout(params: Params, plan: ShardPlan) -> Params:
    """Permutes the fused columns shard-major (and an FP8 weight's scales with them), copies kv heads, pads the
    vocab. NumPy or jax arrays."""
    layers = dict(params["layers"])
    for name in ("w_qkv", "b_qkv", "w_qkv_scale"):  # the bias and an FP8 scale: one value per column
        if name in layers:
            layers[name] = layers[name][..., plan.qkv_columns()]
    for name in ("w_gate_up", "w_gate_up_scale"):
        if name in layers:
            layers[name] = layers[name][..., plan.gate_up_columns()]
    out = {**params, "layers": layers, "embed": _pad_axis(params["embed"], 0, plan.vocab_padded)}
    if "lm_head" in params:
        out["lm_head"] = _pad_axis(params["lm_head"], 1, plan.vocab_padded)
    return out


def bank_to_shard_layout(bank: LoraBank, plan: ShardPlan) -> LoraBank:
    """Copies the LoRA B_k / B_v columns like the base kv heads (a no-op unless num_kv_heads < tp)."""
    if plan.kv_heads == plan.config.num_kv_heads:
        return bank
    cols = plan.kv_columns()
    buckets = []
    for bucket in bank.buckets:
        bq, bk, bv = bucket.b["qkv"]
        b = {**bucket.b, "qkv": (bq, bk[..., cols], bv[..., cols])}
        buckets.append(BucketBank(a=bucket.a, b=b, rank=bucket.rank, offset=bucket.offset))
    return LoraBank(buckets=tuple(buckets))


def param_specs(params: Params):
    """`PartitionSpec` of every placed parameter, keyed like `params`."""
    specs = {k: sharding.spec(*_TOP_AXES[k]) for k in params if k != "layers"}
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):  # split per layer (`split_layers`): no leading L axis
        specs["layers"] = tuple({k: sharding.spec(*_LAYER_AXES[k][1:]) for k in layer} for layer in layers)
    else:
        specs["layers"] = {k: sharding.spec(*_LAYER_AXES[k]) for k in layers}
    return specs


def bank_specs(bank: LoraBank) -> LoraBank:
    """`PartitionSpec` of every bank array, as a `LoraBank` of specs."""
    return LoraBank(buckets=tuple(
        BucketBank(a={g: sharding.spec(*_BANK_A_AXES[g]) for g in b.a},
                   b={g: tuple(sharding.spec(*axes) for axes in _BANK_B_AXES[g]) for g in b.b},
                   rank=b.rank, offset=b.offset)
        for b in bank.buckets))


def cache_spec(paged: bool = False):
    return sharding.spec(*(PAGED_CACHE_AXES if paged else CACHE_AXES))


def _place(x, target: NamedSharding):
    """Puts a whole (global) array onto a sharding. Every process passes the same value."""
    if isinstance(x, jax.Array) and jax.process_count() == 1:
        return jax.device_put(x, target)
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, target, lambda idx: x[idx])


def _place_tree(tree, specs, mesh: Mesh):
    return jax.tree.map(lambda x, s: _place(x, NamedSharding(mesh, s)), tree, specs)


def _embed_lookup(embed_shard, tokens, axis):
    """Vocab-parallel lookup: each shard fills the tokens of its vocab range, then one all-reduce."""
    rows = embed_shard.shape[0]
    local = tokens - jax.lax.axis_index(axis) * rows
    ok = (local >= 0) & (local < rows)
    h = jnp.take(embed_shard, jnp.where(ok, local, 0), axis=0)  # [B, T, D]
    return jax.lax.psum(jnp.where(ok[..., None], h, jnp.zeros_like(h)), axis)


def sharded_forward(params: Params, lora_bank: LoraBank | None, tokens: jax.Array, positions: jax.Array,
                    lora_ids: jax.Array | None, cache: KVCache, *, config: ModelConfig, mesh: Mesh,
                    logit_index: jax.Array | None = None, runtime: RuntimeConfig = RuntimeConfig(),
                    page_table: jax.Array | None = None):
    """`llama.forward` on a ("data", "model") mesh; jit it with `config`, `mesh` and `runtime` static.

    Same arguments and results as `forward`, with params, bank and cache placed by `ShardedModel`
    (shard-major fused columns, K' = max(num_kv_heads, tp) kv heads in the cache). The batch B (or, for a
    paged cache, the page pool) must divide by dp; with dp > 1 a page table holds each replica's local ids.
    Returns (logits [B, T, V] or [B, V] float32 split over "data", the updated cache).
    """
    model_axis = sharding.mesh_axis("heads")
    tied = config.tie_word_embeddings
    B, T = tokens.shape
    if B % sharding.dp_size(mesh):
        raise ValueError(f"batch size {B} must be a multiple of dp={sharding.dp_size(mesh)}")
    if lora_bank is not None and lora_ids is None:
        lora_ids = jnp.full((B, T), -1, jnp.int32)
    if lora_ids is not None and lora_ids.ndim == 1:  # one adapter per row
        lora_ids = jnp.broadcast_to(lora_ids[:, None], (B, T))
    paged = page_table is not None
    args = {"params": params, "tokens": tokens, "positions": positions, "cache": cache}
    in_specs = {
        "params": param_specs(params),  # shard-major columns / vocab-parallel, replicated over "data"
        "tokens": sharding.spec("batch", "seq"),  # [B, T]
        "positions": sharding.spec("batch", "seq"),  # [B, T]
        "cache": KVCache(k=cache_spec(paged), v=cache_spec(paged)),  # rows [L, B, S, K', H]; pages [K', L, P, ps, H]
    }
    if lora_bank is not None:
        args.update(bank=lora_bank, lora_ids=lora_ids)
        in_specs["bank"] = bank_specs(lora_bank)  # A replicated / split on d_in, B split on d_out / replicated
        in_specs["lora_ids"] = sharding.spec("batch", "seq")  # [B, T]
    if logit_index is not None:
        args["logit_index"] = logit_index
        in_specs["logit_index"] = sharding.spec("batch")  # [B]
    if paged:
        args["page_table"] = page_table
        in_specs["page_table"] = sharding.spec("batch", None)  # [B, max_pages], replica-local page ids

    def shard(a):
        p, tok = a["params"], a["tokens"]
        b, t = tok.shape
        h = blocks.scale_embeddings(_embed_lookup(p["embed"], tok, model_axis), config)
        bank, lora_batch = a.get("bank"), None
        if bank is not None:
            lora_batch = make_lora_batch(bank, a["lora_ids"].reshape(b * t).astype(jnp.int32),
                                         runtime.lora_backend)
        paging = {"page_table": a["page_table"]} if paged else {}
        h, k, v = decoder_stack(h, p["layers"], a["cache"].k, a["cache"].v, a["positions"], bank, lora_batch,
                                config, runtime=runtime, reduce=lambda y: jax.lax.psum(y, model_axis), **paging)
        if "logit_index" in a:
            h = jnp.take_along_axis(h, a["logit_index"][:, None, None].astype(jnp.int32), axis=1)[:, 0]
        h = blocks.norm(h, p["final_norm"], config)
        head = p["embed"].T if tied else p["lm_head"]  # [D, V_pad / tp]
        logits = jnp.matmul(h.astype(jnp.float32), head.astype(jnp.float32))
        logits = blocks.soft_cap(logits, config.final_logit_softcap)
        return jax.lax.all_gather(logits, model_axis, axis=logits.ndim - 1, tiled=True), KVCache(k=k, v=v)

    out_specs = (sharding.spec("batch", *[None] * (1 if logit_index is not None else 2)),  # [B, (T,) V_pad]
                 in_specs["cache"])
    logits, new_cache = jax.shard_map(shard, mesh=mesh, in_specs=(in_specs,), out_specs=out_specs,
                                      check_vma=False)(args)
    return logits[..., :config.vocab_size], new_cache


@dataclasses.dataclass(frozen=True)
class ShardedModel:
    """Places a model, its LoRA bank and KV caches on a mesh, and runs `sharded_forward` there.

    Hashable, so it can be a static argument of `jax.jit`.
    """

    config: ModelConfig
    mesh: Mesh

    def __post_init__(self):
        ShardPlan(self.config, self.tp)  # validates divisibility

    @property
    def tp(self) -> int:
        return sharding.tp_size(self.mesh)

    @property
    def dp(self) -> int:
        return sharding.dp_size(self.mesh)

    @property
    def plan(self) -> ShardPlan:
        return ShardPlan(self.config, self.tp)

    def place_params(self, params: Params, split: bool = False) -> Params:
        """Logical params (NumPy or jax arrays; the same on every process) -> placed, shard-major params, split per
        layer (`split_layers`, the placed stacked copies freed) if `split`."""
        laid = to_shard_layout(params, self.plan)
        placed = _place_tree(laid, param_specs(laid), self.mesh)
        if not split:
            return placed
        one = {k: NamedSharding(self.mesh, sharding.spec(*_LAYER_AXES[k][1:])) for k in placed["layers"]}
        given = {id(x) for x in jax.tree_util.tree_leaves(params)}  # device_put may hand back the caller's array
        return split_layers(placed, donate=lambda x: id(x) not in given, shardings=one)

    def place_bank(self, bank: LoraBank) -> LoraBank:
        laid = bank_to_shard_layout(bank, self.plan)
        return _place_tree(laid, bank_specs(laid), self.mesh)

    def cache_zeros(self, batch: int, max_len: int, dtype=jnp.float32) -> KVCache:
        shape = (self.config.num_layers, batch, max_len, self.plan.kv_heads, self.config.head_dim)
        return self._zeros(shape, cache_spec(False), dtype)

    def pages_zeros(self, num_pages: int, page_size: int, dtype=jnp.float32) -> KVCache:
        shape = (self.plan.kv_heads, self.config.num_layers, num_pages, page_size, self.config.head_dim)
        return self._zeros(shape, cache_spec(True), dtype)

    def _zeros(self, shape, spec, dtype) -> KVCache:
        zeros = jax.jit(functools.partial(jnp.zeros, shape, dtype), out_shardings=NamedSharding(self.mesh, spec))
        return KVCache(k=zeros(), v=zeros())

    def put_batch(self, x) -> jax.Array:
        """A host array of one step (the same on every process), split over "data" on its leading axis."""
        x = np.asarray(x)
        return _place(x, NamedSharding(self.mesh, sharding.spec("batch", *[None] * (x.ndim - 1))))

    def forward(self, params, lora_bank, tokens, positions, lora_ids, cache, *, logit_index=None,
                runtime=RuntimeConfig(), page_table=None):
        return sharded_forward(params, lora_bank, tokens, positions, lora_ids, cache, config=self.config,
                               mesh=self.mesh, logit_index=logit_index, runtime=runtime,
                               page_table=page_table)
