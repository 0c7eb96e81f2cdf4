"""A Llama-family decoder (Llama 2/3, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2, Gemma 3 text, SmolLM) as a
Flax NNX module over a pure forward.

Layers are stacked on a leading [L] axis and run with `lax.scan`, so a model compiles once per shape,
whatever its depth; on GPU the engine splits them into per-layer arrays first (`split_layers`), which a Python
loop reads in place. Every linear goes `x @ W` with W stored [d_in, d_out]; q|k|v and gate|up are fused.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx

from jlora.config import ModelConfig, RuntimeConfig
from jlora.lora.bank import LoraBank
from jlora.lora.ops import LoraBatch, lora_project, make_lora_batch
from jlora.model import attention, blocks, quant, rope
from jlora.model.kv_cache import KVCache

Params = dict[str, Any]


def param_shapes(config: ModelConfig) -> Params:
    """The shape of every parameter, keyed as in `Llama`'s state."""
    L, D, F, V = config.num_layers, config.hidden_size, config.intermediate_size, config.vocab_size
    qkv = config.q_dim + 2 * config.kv_dim
    layers = {"attn_norm": (L, D), "mlp_norm": (L, D), "w_qkv": (L, D, qkv), "w_o": (L, config.q_dim, D),
              "w_gate_up": (L, D, 2 * F), "w_down": (L, F, D)}
    if config.qkv_bias:
        layers["b_qkv"] = (L, qkv)
    if config.o_bias:
        layers["b_o"] = (L, D)
    if config.qk_norm:
        layers["q_norm"] = layers["k_norm"] = (L, config.head_dim)
    if config.post_norms:
        layers["post_attn_norm"] = layers["post_mlp_norm"] = (L, D)
    shapes = {"embed": (V, D), "layers": layers, "final_norm": (D,)}
    if not config.tie_word_embeddings:
        shapes["lm_head"] = (D, V)
    return shapes


def init_params(config: ModelConfig, key: jax.Array, dtype=jnp.float32, std: float = 0.02) -> Params:
    """Random weights (norms near 1), for tests and benchmarks. Works under `jax.eval_shape`."""
    shapes = param_shapes(config)
    leaves, treedef = jax.tree_util.tree_flatten(shapes, is_leaf=lambda s: isinstance(s, tuple))
    paths = [jax.tree_util.keystr(p) for p, _ in
             jax.tree_util.tree_flatten_with_path(shapes, is_leaf=lambda s: isinstance(s, tuple))[0]]
    keys = jax.random.split(key, len(leaves))
    out = []
    for path, shape, k in zip(paths, leaves, keys):
        noise = jax.random.normal(k, shape, jnp.float32) * std
        out.append((1.0 + noise if "norm" in path else noise).astype(dtype))
    return jax.tree_util.tree_unflatten(treedef, out)


rms_norm = blocks.rms_norm


def _identity(y):
    return y


def _layer(h, layer, cache_k, cache_v, positions, lora_bank, lora_batch, config: ModelConfig, inv_freq,
           runtime: RuntimeConfig, reduce=_identity, page_table=None, layer_index=None):
    """One decoder layer.

    Head counts come from the local shapes, so the same code runs on a tensor-parallel shard (inside
    `shard_map`), where `reduce` sums the row-parallel (o, down) partial outputs across shards. LoRA deltas
    are added to the partial sums before that reduction, so LoRA adds no collective.

    Args:
      h: [B, T, D]; layer: this layer's params.
      lora_bank: the whole stacked [L, ...] bank or None; the kernels read layer `layer_index` of it in place.
      cache_k, cache_v: [B, S, K, H] rows of this layer, or every layer's pages [K, L, P, page_size, H] when
        `page_table` [B, max_pages] is given, of which layer `layer_index` is used.
      layer_index: int32 scalar, this layer's index.
      runtime: the resolved kernel and layout switches (static).
    """
    B, T, D = h.shape
    H = config.head_dim
    K = cache_k.shape[-2] if page_table is None else cache_k.shape[0]
    N = layer["w_qkv"].shape[-1] // H - 2 * K

    # Without a tensor-parallel reduce, a row-parallel projection adds the residual before the LoRA delta: XLA then
    # fuses the residual add into the base matmul, as it does with LoRA off, and the expand kernel adds the delta in
    # place; adding it after the kernel took one more elementwise kernel per projection (H100 decode profile).
    fold_residual = runtime.fold_residual and reduce is _identity

    def project(x2d, name, group, bias=None, residual=None, row=False):
        """x2d @ layer[name] (FP8 weights with their scale: `quant`) + LoRA delta (+ bias). Row-parallel projections
        (o, down) pass the residual stream [B*T, d_out] and get it added, after the tensor-parallel reduce when there
        is one; or `row` alone: reduced, no residual (a post-norm comes between them)."""
        y = quant.matmul(x2d, layer[name], layer.get(quant.scale_name(name)), runtime.fp8_compute)
        fold = residual is not None and fold_residual
        if fold:
            y = y + residual
        if lora_bank is not None:
            y = lora_project(x2d, y, group, lora_bank, lora_batch, runtime, layer_index)
        if residual is not None or row:
            y = reduce(y)  # the identity when folded
        if bias is not None:
            y = y + bias
        return y if fold or residual is None else residual + y

    def row_out(x2d, name, group, bias, post_norm):
        """h + the row-parallel projection of x2d, through the post-norm first if the family has one: [B, T, D]."""
        if not config.post_norms:
            return project(x2d, name, group, bias, residual=h.reshape(B * T, D)).reshape(B, T, D)
        return h + blocks.norm(project(x2d, name, group, bias, row=True).reshape(B, T, D), layer[post_norm], config)

    # Which layers slide comes from a static pattern indexed by the (traced) layer index: one program for all.
    sliding = None if config.sliding_layers is None else jnp.asarray(config.sliding_layers)[layer_index]
    x = blocks.norm(h, layer["attn_norm"], config).reshape(B * T, D)
    qkv = project(x, "w_qkv", "qkv", layer.get("b_qkv"))  # [B*T, (N + 2K) * H]
    q, k, v = jnp.split(qkv, [N * H, (N + K) * H], axis=-1)
    q, k = q.reshape(B, T, N, H), k.reshape(B, T, K, H)
    if config.qk_norm:  # per head, over head_dim, before RoPE (Qwen3)
        q = blocks.norm(q, layer["q_norm"], config)
        k = blocks.norm(k, layer["k_norm"], config)
    if config.rope_local_theta is not None:  # Gemma 3: sliding layers rotate with their own base
        inv_freq = jnp.where(sliding, rope.inverse_frequencies(config, local=True), inv_freq)
    q = rope.apply_rope(q, positions, inv_freq)
    k = rope.apply_rope(k, positions, inv_freq)
    attn, cache_k, cache_v = attention.attend(q, k, v.reshape(B, T, K, H), cache_k, cache_v, positions, page_table,
                                              config, layer_index, runtime, sliding=sliding)
    h = row_out(attn.reshape(B * T, N * H), "w_o", "o", layer.get("b_o"), "post_attn_norm")

    x = blocks.norm(h, layer["mlp_norm"], config).reshape(B * T, D)
    gate, up = jnp.split(project(x, "w_gate_up", "gate_up"), 2, axis=-1)
    h = row_out(blocks.activation(gate, config.hidden_act) * up, "w_down", "down", None, "post_mlp_norm")
    return h, cache_k, cache_v


# The split loop calls every layer through this one nested jit: the layers' arrays share their shapes, so a program
# traces and lowers the layer once and calls it L times (XLA inlines the calls), where tracing each layer in turn
# lowered L copies of it. The layer index is an array argument, as in the scan.
_layer_call = jax.jit(_layer, static_argnames=("config", "runtime", "reduce"))


def split_layers_enabled(runtime: RuntimeConfig = RuntimeConfig()) -> bool:
    """Whether `runtime.layer_loop` (resolved by platform) runs per-layer weight arrays ("split": a Python loop over
    layers) rather than stacked [L, ...] weights ("scan": one compiled layer body). "auto" splits on GPU only.

    On the H100 a scanned layer slices its weights out of the stacked arrays into fresh buffers before each
    cuBLAS call, so every decode step reads the weights twice and writes them once: an 8B decode step at batch 64
    took 21.6 ms scanned and 12.1 ms split. TPUs are untested, so they keep the scan.
    """
    return runtime.resolved().layer_loop == "split"


@functools.lru_cache(maxsize=None)
def _unstacker(num_layers: int, shardings):
    """One jitted [L, ...] -> L arrays split per (L, target shardings), so later engines compile nothing new."""
    return jax.jit(lambda x: tuple(x[i] for i in range(num_layers)), out_shardings=shardings)


def split_layers(params: Params, donate=False, shardings=None) -> Params:
    """`params` with "layers" as a tuple of per-layer dicts of [d...] arrays instead of stacked [L, d...] arrays.

    `forward` takes either form. Already split params are returned as they are.

    Args:
      donate: delete each stacked array once it is split (the caller's arrays become unusable), so the weights
        are never held twice; or a predicate on the stacked array that says whether to delete it.
      shardings: optional {name: sharding} of one layer's arrays (a mesh's placement, less the L axis).
    """
    layers = params["layers"]
    if isinstance(layers, (tuple, list)):
        return params
    num_layers = next(iter(layers.values())).shape[0]
    out = [{} for _ in range(num_layers)]
    for name, stacked in layers.items():
        target = None if shardings is None else (shardings[name],) * num_layers
        parts = _unstacker(num_layers, target)(stacked)
        for layer, part in zip(out, parts):
            layer[name] = part
        if isinstance(stacked, jax.Array) and (donate(stacked) if callable(donate) else donate):
            stacked.delete()
    return {**params, "layers": tuple(out)}


def decoder_stack(h, layers, cache_k, cache_v, positions, lora_bank, lora_batch, config: ModelConfig, *,
                  runtime: RuntimeConfig = RuntimeConfig(), reduce=_identity, page_table=None):
    """Every decoder layer: scanned over the leading [L] axis of stacked `layers` and the caches, or a Python loop
    over split `layers` (a tuple of per-layer dicts, `split_layers`).

    The bank is not scanned: each layer's kernels read their layer of the stacked bank in place.

    Returns (h, new cache_k, new cache_v). Runs unchanged on one tensor-parallel shard (see `_layer`).
    """
    inv_freq = rope.inverse_frequencies(config)
    runtime = runtime.resolved()
    if isinstance(layers, (tuple, list)):  # split weights (`split_layers`): a Python loop, no weight slicing
        for i, layer in enumerate(layers):
            i = jnp.int32(i)
            if page_table is not None:
                h, cache_k, cache_v = _layer_call(h, layer, cache_k, cache_v, positions, lora_bank, lora_batch,
                                                  config, inv_freq, runtime, reduce, page_table, i)
            else:
                h, ck, cv = _layer_call(h, layer, cache_k[i], cache_v[i], positions, lora_bank, lora_batch, config,
                                        inv_freq, runtime, reduce, layer_index=i)
                cache_k, cache_v = cache_k.at[i].set(ck), cache_v.at[i].set(cv)
        return h, cache_k, cache_v

    layer_ids = jnp.arange(jax.tree_util.tree_leaves(layers)[0].shape[0], dtype=jnp.int32)
    if page_table is not None:
        # Paged: the whole pool rides in the carry and each layer scatters into it in place.
        def paged_step(carry, xs):
            h, ck, cv = carry
            layer, i = xs
            h, ck, cv = _layer(h, layer, ck, cv, positions, lora_bank, lora_batch, config, inv_freq, runtime,
                               reduce, page_table, i)
            return (h, ck, cv), None

        (h, new_k, new_v), _ = jax.lax.scan(paged_step, (h, cache_k, cache_v), (layers, layer_ids))
        return h, new_k, new_v

    def step(h, xs):
        layer, ck, cv, i = xs
        h, ck, cv = _layer(h, layer, ck, cv, positions, lora_bank, lora_batch, config, inv_freq, runtime, reduce,
                           layer_index=i)
        return h, (ck, cv)

    h, (new_k, new_v) = jax.lax.scan(step, h, (layers, cache_k, cache_v, layer_ids))
    return h, new_k, new_v


def forward(params: Params, lora_bank: LoraBank | None, tokens: jax.Array, positions: jax.Array,
            lora_ids: jax.Array | None, cache: KVCache, *, config: ModelConfig,
            logit_index: jax.Array | None = None, runtime: RuntimeConfig = RuntimeConfig(),
            page_table: jax.Array | None = None):
    """The model as a pure function; jit it with `config` and `runtime` static.

    Args:
      params: the `Llama` state as a plain dict (`Llama.params()`).
      lora_bank: the adapter bank, or None for the base model alone.
      tokens: [B, T] int32.
      positions: [B, T] int32 absolute positions; -1 marks padding (neither cached nor attended).
      lora_ids: [B, T] int32 global slot ids per token, or [B] per row; -1 for no adapter (ignored without a
        bank). `jlora.lora.loader.bank_from_peft` returns each adapter's id.
      cache: the KV cache: rows [L, B, S, K, H] indexed by position, or pages [K, L, P, page_size, H].
      logit_index: optional [B] int32; if given, logits only at tokens[b, logit_index[b]].
      page_table: [B, max_pages] int32 physical page of each logical page, for a paged cache.
      runtime: the kernel and layout switches (`RuntimeConfig`); "auto" fields are resolved by platform.
    Returns:
      (logits [B, T, V] or [B, V] float32, the updated cache).
    """
    B, T = tokens.shape
    h = blocks.scale_embeddings(jnp.take(params["embed"], tokens, axis=0), config)
    lora_batch: LoraBatch | None = None
    if lora_bank is not None:
        ids = lora_ids if lora_ids is not None else jnp.full((B, T), -1, jnp.int32)
        if ids.ndim == 1:  # one adapter per row
            ids = jnp.broadcast_to(ids[:, None], (B, T))
        lora_batch = make_lora_batch(lora_bank, ids.reshape(B * T).astype(jnp.int32), runtime.lora_backend)

    h, new_k, new_v = decoder_stack(h, params["layers"], cache.k, cache.v, positions, lora_bank, lora_batch,
                                    config, runtime=runtime, page_table=page_table)
    if logit_index is not None:
        h = jnp.take_along_axis(h, logit_index[:, None, None].astype(jnp.int32), axis=1)[:, 0]
    h = blocks.norm(h, params["final_norm"], config)
    # A tied head is used as stored ([V, D]): no transposed copy of the embedding per step.
    if config.tie_word_embeddings:
        logits = jnp.einsum("...d,vd->...v", h, params["embed"], preferred_element_type=jnp.float32)
    else:
        logits = jnp.einsum("...d,dv->...v", h, params["lm_head"], preferred_element_type=jnp.float32)
    return blocks.soft_cap(logits, config.final_logit_softcap), KVCache(k=new_k, v=new_v)


class Llama(nnx.Module):
    """Flax NNX container of the base weights. Call it like `forward`, or split it and jit `forward`."""

    def __init__(self, config: ModelConfig, params: Params):
        self.config = config
        self.embed = nnx.Param(params["embed"])
        self.layers = nnx.Dict({k: nnx.Param(v) for k, v in params["layers"].items()})
        self.final_norm = nnx.Param(params["final_norm"])
        self.lm_head = nnx.Param(params["lm_head"]) if "lm_head" in params else None

    @classmethod
    def random(cls, config: ModelConfig, seed: int = 0, dtype=jnp.float32, std: float = 0.02) -> "Llama":
        return cls(config, init_params(config, jax.random.key(seed), dtype, std))

    def params(self) -> Params:
        return nnx.to_pure_dict(nnx.state(self, nnx.Param))

    @property
    def dtype(self):
        return self.embed[...].dtype

    def __call__(self, tokens, positions, lora_ids=None, cache=None, lora_bank=None, logit_index=None):
        if cache is None:
            cache = KVCache.zeros(self.config, tokens.shape[0], tokens.shape[1], self.dtype)
        fn = functools.partial(forward, config=self.config, logit_index=logit_index)
        return fn(self.params(), lora_bank, tokens, positions, lora_ids, cache)
