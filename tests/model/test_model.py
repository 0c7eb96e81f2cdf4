"""The model against independent computations: merged-weight LoRA, incremental decode, padding, shapes."""

import dataclasses
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, rel_err, write_adapter, write_model

from jlora.checkpoint.hf import load_hf_dir, params_from_hf, read_tensors
from jlora.config import LoraBankConfig, ModelConfig, RopeScaling, RuntimeConfig
from jlora.errors import ModelLoadError
from jlora.lora.peft import read_spec
from jlora.lora.loader import bank_from_peft
from jlora.model import KVCache, forward, init_params, param_shapes
from jlora.model.llama import split_layers, split_layers_enabled

fwd = jax.jit(forward, static_argnames=("config", "runtime"))


def _inputs(rng, B, T, V):
    tokens = jnp.asarray(rng.integers(0, V, (B, T)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    return tokens, positions


def _merged_params(tensors, adapter_path, config):
    """The HF tensors with W += scale * B @ A folded in: an independent route to the adapted model."""
    from safetensors.numpy import load_file
    spec = read_spec(adapter_path)
    merged = dict(tensors)
    for key, a in load_file(f"{adapter_path}/adapter_model.safetensors").items():
        if ".lora_A." not in key:
            continue
        b = load_file(f"{adapter_path}/adapter_model.safetensors")[key.replace("lora_A", "lora_B")]
        module = key.split(".lora_A")[0].replace("base_model.model.", "")
        merged[module + ".weight"] = merged[module + ".weight"] + spec.scale(module) * (b @ a)
    return params_from_hf(merged, config)


@pytest.mark.parametrize("rank,rslora", [(3, False), (8, True), (12, False)])
def test_lora_equals_merged_weights(tmp_path, rank, rslora):
    model_dir = write_model(str(tmp_path / "m"))
    config, params = load_hf_dir(model_dir)
    ad = write_adapter(str(tmp_path / "a"), r=rank, alpha=16.0, seed=rank, use_rslora=rslora)
    bank, slot = bank_from_peft(config, {"a": ad}, bank_config=LoraBankConfig(buckets=(4, 8, 16), slots=(1, 1, 1)))
    tokens, positions = _inputs(np.random.default_rng(0), 2, 7, config.vocab_size)
    ids = jnp.full((2, 7), slot["a"], jnp.int32)
    cache = KVCache.zeros(config, 2, 16)
    got, _ = fwd(params, bank, tokens, positions, ids, cache, config=config)
    per_row, _ = fwd(params, bank, tokens, positions, ids[:, 0], cache, config=config)  # one id per row
    np.testing.assert_array_equal(per_row, got)
    want, _ = fwd(_merged_params(read_tensors(model_dir), ad, config), None, tokens, positions, None, cache,
                  config=config)
    base, _ = fwd(params, None, tokens, positions, None, cache, config=config)
    assert rel_err(got, want) < 1e-5
    assert rel_err(base, want) > 1e-3  # the adapter really changes the output


def test_bucket_padding_is_exact(tmp_path):
    config, params = load_hf_dir(write_model(str(tmp_path / "m")))
    ad = write_adapter(str(tmp_path / "a"), r=5)
    outs = []
    for buckets in [(8,), (64,)]:
        bank, slot = bank_from_peft(config, {"a": ad}, bank_config=LoraBankConfig(buckets=buckets, slots=(2,)))
        tokens, positions = _inputs(np.random.default_rng(1), 1, 5, config.vocab_size)
        ids = jnp.full((1, 5), slot["a"], jnp.int32)
        outs.append(fwd(params, bank, tokens, positions, ids, KVCache.zeros(config, 1, 8), config=config)[0])
    assert rel_err(outs[0], outs[1]) < 1e-6


def test_mixed_batch_rows_match_single_rows(tmp_path):
    config, params = load_hf_dir(write_model(str(tmp_path / "m")))
    bank, slot = bank_from_peft(config, {
        "small": write_adapter(str(tmp_path / "s"), r=2, targets=("q_proj", "v_proj"), seed=3),
        "big": write_adapter(str(tmp_path / "b"), r=16, seed=4)}, bank_config=LoraBankConfig(buckets=(4, 16), slots=(2, 1)))
    names = ["big", None, "small", None]
    slots = [-1 if n is None else slot[n] for n in names]
    assert slots[0] == 2 and slots[2] == 0  # bucket 16's slot follows bucket 4's two
    tokens, positions = _inputs(np.random.default_rng(2), 4, 6, config.vocab_size)
    ids = jnp.asarray(np.repeat(np.array(slots)[:, None], 6, 1), jnp.int32)
    batch, _ = fwd(params, bank, tokens, positions, ids, KVCache.zeros(config, 4, 8), config=config)
    for i in range(4):
        row, _ = fwd(params, bank, tokens[i:i + 1], positions[i:i + 1], ids[i:i + 1],
                     KVCache.zeros(config, 1, 8), config=config)
        assert rel_err(batch[i], row[0]) < 1e-6
    assert rel_err(batch[0], batch[1]) > 1e-3


def test_incremental_decode_equals_full_forward(tmp_path):
    config = dataclasses.replace(TINY, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 16), sliding_window=5)
    params = init_params(config, jax.random.key(0), std=0.3)
    bank, slot = bank_from_peft(config, {"a": write_adapter(str(tmp_path / "a"), config=config, r=8)},
                                bank_config=LoraBankConfig(buckets=(8,), slots=(1,)))
    tokens, positions = _inputs(np.random.default_rng(3), 2, 9, config.vocab_size)
    ids = jnp.asarray([[slot["a"]] * 9, [-1] * 9], jnp.int32)
    full, _ = fwd(params, bank, tokens, positions, ids, KVCache.zeros(config, 2, 16), config=config)
    cache = KVCache.zeros(config, 2, 16)
    steps = []
    logits, cache = fwd(params, bank, tokens[:, :4], positions[:, :4], ids[:, :4], cache, config=config)
    steps.append(logits)
    for t in range(4, 9):
        logits, cache = fwd(params, bank, tokens[:, t:t + 1], positions[:, t:t + 1], ids[:, t:t + 1], cache,
                            config=config)
        steps.append(logits)
    assert rel_err(jnp.concatenate(steps, axis=1), full) < 1e-5


def test_padding_positions_change_nothing():
    params = init_params(TINY, jax.random.key(1), std=0.3)
    tokens, positions = _inputs(np.random.default_rng(4), 1, 5, TINY.vocab_size)
    ref, _ = fwd(params, None, tokens, positions, None, KVCache.zeros(TINY, 1, 8), config=TINY)
    padded_tokens = jnp.concatenate([tokens, jnp.full((1, 3), 7, jnp.int32)], axis=1)
    padded_pos = jnp.concatenate([positions, jnp.full((1, 3), -1, jnp.int32)], axis=1)
    got, cache = fwd(params, None, padded_tokens, padded_pos, None, KVCache.zeros(TINY, 1, 8), config=TINY)
    assert rel_err(got[:, :5], ref) < 1e-6
    assert float(jnp.abs(cache.k[:, :, 5:]).max()) == 0.0  # padding wrote nothing to the cache


def test_8b_shapes_without_allocating():
    cfg = ModelConfig(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32,
                      num_kv_heads=8, head_dim=128, rope_scaling=RopeScaling(8.0, 1.0, 4.0, 8192))
    abstract = jax.eval_shape(lambda k: init_params(cfg, k, jnp.bfloat16), jax.random.key(0))
    n = sum(x.size for x in jax.tree_util.tree_leaves(abstract))
    assert n == pytest.approx(8.03e9, rel=0.01)
    assert abstract["layers"]["w_qkv"].shape == (32, 4096, 6144)
    assert jax.tree_util.tree_map(lambda x: x.shape, abstract) == jax.tree_util.tree_map(
        tuple, param_shapes(cfg), is_leaf=lambda s: isinstance(s, tuple))


def test_bf16_loading_tracks_fp32(tmp_path):
    model_dir = write_model(str(tmp_path / "m"))
    c32, p32 = load_hf_dir(model_dir)
    c16, p16 = load_hf_dir(model_dir, dtype=jnp.bfloat16)
    assert p16["layers"]["w_qkv"].dtype == jnp.bfloat16
    tokens, positions = _inputs(np.random.default_rng(5), 2, 6, c32.vocab_size)
    ref, _ = fwd(p32, None, tokens, positions, None, KVCache.zeros(c32, 2, 8), config=c32)
    got, _ = fwd(p16, None, tokens, positions, None, KVCache.zeros(c16, 2, 8, jnp.bfloat16), config=c16)
    err = rel_err(got, ref)
    assert 1e-5 < err < 5e-2  # bf16 rounding, not garbage, and really bf16


def test_split_layers_lower_their_layer_once():
    """The split loop's program holds one lowered layer called once per layer (`llama._layer_call`), not L inlined
    copies: tracing and lowering a step costs one layer, as the scan does."""
    config = dataclasses.replace(TINY, num_layers=4)
    params = split_layers(init_params(config, jax.random.key(0), jnp.float32))
    tokens = jnp.zeros((2, 3), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(3, dtype=jnp.int32), (2, 3))
    text = jax.jit(lambda p, c: forward(p, None, tokens, positions, None, c, config=config)).lower(
        params, KVCache.zeros(config, 2, 4)).as_text()
    defs = [line for line in text.splitlines() if "func.func private @_layer" in line]
    assert len(defs) == 1, defs
    name = defs[0].split("@")[1].split("(")[0]
    assert text.count(f"call @{name}(") == config.num_layers


@pytest.mark.parametrize("backend", ["xla", "interpret"])
def test_split_layers_equal_the_scan(tmp_path, monkeypatch, backend):
    """Per-layer weights (`split_layers`, a Python layer loop) give the scan's logits and cache, paged or not, with
    LoRA through the XLA path or the Triton kernels (interpret mode) reading the stacked bank in place."""
    config, params = load_hf_dir(write_model(str(tmp_path / "m")))
    bank, slot = bank_from_peft(config, {"a": write_adapter(str(tmp_path / "a"), r=3, seed=1, std=0.3),
                                         "b": write_adapter(str(tmp_path / "b"), r=8, seed=2, std=0.3)},
                                bank_config=LoraBankConfig(buckets=(4, 8), slots=(1, 1)))
    rng = np.random.default_rng(5)
    tokens, positions = _inputs(rng, 3, 6, config.vocab_size)
    ids = jnp.asarray(np.repeat(np.array([slot["a"], slot["b"], -1])[:, None], 6, 1), jnp.int32)
    split = split_layers(params)
    assert isinstance(split["layers"], tuple) and len(split["layers"]) == config.num_layers
    assert split["layers"][1]["w_qkv"].shape == params["layers"]["w_qkv"].shape[1:]
    table = jnp.asarray(rng.permutation(12)[:6].reshape(3, 2), jnp.int32)
    for cache, page_table in [(KVCache.zeros(config, 3, 8), None), (KVCache.pages(config, 12, 4), table)]:
        run = jax.jit(lambda p, c: forward(p, bank, tokens, positions, ids, c, config=config,
                                           runtime=RuntimeConfig(lora_backend=backend), page_table=page_table))
        want, want_cache = run(params, cache)
        got, got_cache = run(split, cache)
        assert rel_err(got, want) < 1e-5 and rel_err(got_cache.k, want_cache.k) < 1e-6
        assert float(jnp.abs(got_cache.v).max()) > 0.01  # the cache was written
    base, _ = fwd(params, None, tokens, positions, None, KVCache.zeros(config, 3, 8), config=config)
    assert rel_err(base[:2], got[:2]) > 1e-3  # the adapters change the output
    assert split_layers_enabled(RuntimeConfig(layer_loop="split"))
    assert not split_layers_enabled(RuntimeConfig(layer_loop="scan"))
    with pytest.raises(ValueError, match="JLORA_LAYER_LOOP"):
        RuntimeConfig.from_env({"JLORA_LAYER_LOOP": "unroll"})


def test_runtime_config_is_part_of_the_jit_key(monkeypatch):
    """Changing the runtime config after a compile compiles a new program; the environment, read only by
    `RuntimeConfig.from_env`, changes nothing once traced."""
    params = init_params(TINY, jax.random.key(0))
    tokens, positions = _inputs(np.random.default_rng(0), 2, 4, TINY.vocab_size)
    bank, _ = bank_from_peft(TINY, {}, bank_config=LoraBankConfig(buckets=(4,), slots=(2,)))
    ids = jnp.zeros((2, 4), jnp.int32)
    cache = KVCache.zeros(TINY, 2, 4)

    @functools.partial(jax.jit, static_argnames=("config", "runtime"))
    def step(params, bank, tokens, positions, ids, cache, *, config, runtime):
        return forward(params, bank, tokens, positions, ids, cache, config=config, runtime=runtime)

    def hlo(runtime):
        return step.lower(params, bank, tokens, positions, ids, cache, config=TINY, runtime=runtime).as_text()

    xla_rt, ref_rt = RuntimeConfig(lora_backend="xla"), RuntimeConfig(lora_backend="reference")
    step(params, bank, tokens, positions, ids, cache, config=TINY, runtime=xla_rt)
    assert step._cache_size() == 1
    step(params, bank, tokens, positions, ids, cache, config=TINY, runtime=ref_rt)
    assert step._cache_size() == 2  # a new program, not the cached one
    step(params, bank, tokens, positions, ids, cache, config=TINY, runtime=RuntimeConfig(lora_backend="xla"))
    assert step._cache_size() == 2  # an equal config is the same key
    assert hlo(xla_rt) != hlo(ref_rt)
    assert hash(xla_rt) == hash(RuntimeConfig(lora_backend="xla")) and xla_rt == RuntimeConfig(lora_backend="xla")
    monkeypatch.setenv("JLORA_LORA_BACKEND", "reference")  # ignored by traced code
    assert hlo(RuntimeConfig()) == hlo(RuntimeConfig().resolved()) != hlo(ref_rt)  # "auto" is the platform's
    assert RuntimeConfig.from_env().lora_backend == "reference"
    with pytest.raises(dataclasses.FrozenInstanceError):
        xla_rt.lora_backend = "reference"


QWEN3_CONFIG = os.path.join(os.path.dirname(__file__), "..", "fixtures", "models", "qwen3", "config.json")


@pytest.mark.parametrize("change,named", [
    ({"model_type": "falcon"}, "'falcon'"),
    ({"rope_parameters": {"rope_type": "yarn", "factor": 4.0, "rope_theta": 1e6}}, "'yarn'"),
    ({"hidden_act": "relu"}, "'relu'"),
    ({"partial_rotary_factor": 0.75}, "partial_rotary_factor 0.75"),  # Phi-4-mini's
    ({"model_type": "phi3", "rope_parameters": {"rope_type": "longrope", "rope_theta": 1e4}}, "'longrope'"),
    ({"use_sliding_window": True, "sliding_window": 4, "layer_types": ["sliding_attention", "banded"]}, "'banded'"),
])
def test_unsupported_config_features_are_refused_by_name(change, named):
    with open(QWEN3_CONFIG) as f:
        d = {**json.load(f), **change}
    with pytest.raises(ModelLoadError, match=named):
        ModelConfig.from_hf_dict(d)


def test_gemma2_config_reads_its_features():
    with open(os.path.join(os.path.dirname(QWEN3_CONFIG), "..", "gemma2", "config.json")) as f:
        d = json.load(f)
    config = ModelConfig.from_hf_dict(d)
    assert (config.sliding_window, config.sliding_layers) == (4, (True, False))
    assert (config.attn_logit_softcap, config.final_logit_softcap, config.attn_scale) == (1.0, 2.0, 24 ** -0.5)
    assert config.hidden_act == "gelu_pytorch_tanh" and config.tie_word_embeddings and config.post_norms
    # Uniform layer_types need no per-layer pattern: one window, or none.
    assert ModelConfig.from_hf_dict({**d, "layer_types": ["sliding_attention"] * 2}).sliding_layers is None
    assert ModelConfig.from_hf_dict({**d, "layer_types": ["full_attention"] * 2}).sliding_window is None
    for bad, named in (({"use_bidirectional_attention": True}, "use_bidirectional_attention"),
                       ({"attn_logit_softcapping": -1}, "attn_logit_softcapping"),
                       ({"hidden_activation": "gelu"}, "'gelu'")):
        with pytest.raises(ModelLoadError, match=named):
            ModelConfig.from_hf_dict({**d, **bad})


def test_gemma3_config_reads_its_rope_per_layer_type():
    with open(os.path.join(os.path.dirname(QWEN3_CONFIG), "..", "gemma3", "config.json")) as f:
        d = json.load(f)
    config = ModelConfig.from_hf_dict(d)
    assert config.qk_norm and config.norm_unit_offset and config.attn_logit_softcap is None
    assert (config.rope_theta, config.rope_local_theta, config.rope_scaling.factor) == (1e6, 1e4, 4.0)
    slid = ModelConfig.from_hf_dict({**d, "layer_types": ["sliding_attention"] * 2})  # every layer local
    assert (slid.rope_theta, slid.rope_scaling, slid.rope_local_theta) == (1e4, None, None)
    yarn = {**d["rope_parameters"], "sliding_attention": {"rope_type": "yarn", "factor": 2.0, "rope_theta": 1e4}}
    with pytest.raises(ModelLoadError, match="'yarn' of the sliding layers"):
        ModelConfig.from_hf_dict({**d, "rope_parameters": yarn})
    with pytest.raises(ModelLoadError, match="'gemma3'"):  # the multimodal config: its text model is gemma3_text
        ModelConfig.from_hf_dict({**d, "model_type": "gemma3"})


def test_qwen3_config_reads_its_features():
    with open(QWEN3_CONFIG) as f:
        d = json.load(f)
    config = ModelConfig.from_hf_dict(d)
    assert config.qk_norm and not config.qkv_bias and config.sliding_window is None
    # transformers keeps Qwen3's window off unless use_sliding_window; then layer_types (here all full) say which
    # layers slide.
    slid = ModelConfig.from_hf_dict({**d, "use_sliding_window": True, "sliding_window": 4,
                                     "layer_types": ["sliding_attention"] * 2})
    assert slid.sliding_window == 4
    assert ModelConfig.from_hf_dict({**d, "use_sliding_window": True, "sliding_window": 4}).sliding_window is None
    assert ModelConfig.from_hf_dict({**d, "attention_bias": True}).o_bias
