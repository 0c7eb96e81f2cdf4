"""FP8 base weights (W8A16, and W8A8 by `RuntimeConfig.fp8_compute`): quantizing at load, FP8 checkpoints
(compressed-tensors, written here with ml_dtypes), the forward against a float32 model of the same dequantized
values, and LoRA on top through the engine."""

import json
import os

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest
from helpers import TINY, random_hf_tensors, write_adapter

from jlora.checkpoint.hf import load_hf_dir, save_hf_dir
from jlora.config import RuntimeConfig
from jlora.errors import ModelLoadError
from jlora.generate import LLM
from jlora.lora.loader import bank_from_peft
from jlora.model import KVCache, forward, quant
from jlora.sampling import SamplingParams

LINEAR = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
FWD = jax.jit(forward, static_argnames=("config",))


def _quantize_hf(tensors, per_tensor=False):
    """HF tensors with FP8 linear weights and scales, quantized by numpy + ml_dtypes (not jlora): absmax per output
    row, or per tensor. Returns (fp8 tensors for the file, float32 dequantized twins)."""
    fp8, deq = {}, {}
    for key, w in tensors.items():
        if key.endswith(".weight") and key.split(".")[-2] in LINEAR:
            amax = np.abs(w).max() if per_tensor else np.abs(w).max(axis=1, keepdims=True)
            scale = (np.maximum(amax, 1e-12) / 448.0).astype(np.float32)
            q = (w / scale).astype(ml_dtypes.float8_e4m3fn)
            fp8[key], fp8[key + "_scale"] = q, np.asarray(scale, np.float32).reshape(-1 if per_tensor else (-1, 1))
            fp8[key.replace(".weight", ".input_scale")] = np.ones((1,), np.float32)  # W8A8 static: ignored
            deq[key] = q.astype(np.float32) * scale
        else:
            fp8[key] = deq[key] = w
    return fp8, deq


def _write(path, tensors, quantization_config=None):
    save_hf_dir(tensors, TINY, path)
    if quantization_config is not None:
        cfg_path = os.path.join(path, "config.json")
        cfg = json.load(open(cfg_path))
        json.dump({**cfg, "quantization_config": quantization_config}, open(cfg_path, "w"))
    return path


def _ct(strategy):
    return {"quant_method": "compressed-tensors", "format": "float-quantized", "config_groups": {"group_0": {
        "targets": ["Linear"], "weights": {"num_bits": 8, "type": "float", "strategy": strategy},
        "input_activations": {"num_bits": 8, "type": "float", "strategy": "tensor", "dynamic": False}}}}


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    fp8, deq = _quantize_hf(random_hf_tensors(TINY, seed=3))
    return {"fp8": _write(str(root / "fp8"), fp8, _ct("channel")), "deq": _write(str(root / "deq"), deq),
            "adapter": write_adapter(str(root / "a"), r=8, seed=5, std=0.3), "root": root}


def _logits(config, params, bank=None, lora=None):
    T = 12
    tokens = (jnp.arange(2 * T).reshape(2, T) * 7) % config.vocab_size
    ids = None if lora is None else jnp.asarray(lora)
    return np.asarray(FWD(params, bank, tokens, jnp.broadcast_to(jnp.arange(T), (2, T)), ids,
                          KVCache.zeros(config, 2, T), config=config)[0])


def test_a_per_channel_checkpoint_loads_bit_for_bit_and_runs_as_its_dequantized_twin(dirs):
    config, params = load_hf_dir(dirs["fp8"])
    _, twin = load_hf_dir(dirs["deq"])
    assert params["layers"]["w_o"].dtype == jnp.float8_e4m3fn and params["layers"]["w_o_scale"].dtype == jnp.float32
    # jlora's own absmax quantization of the dequantized values gives back the file's FP8 values
    again = quant.quantize_params(twin)
    for name in quant.LINEAR:
        assert np.array_equal(np.asarray(params["layers"][name]).view(np.uint8),
                              np.asarray(again["layers"][name]).view(np.uint8)), name
    bank, slots = bank_from_peft(config, {"a": dirs["adapter"]})
    lora = [-1, slots["a"]]
    got, want = _logits(config, params, bank, lora), _logits(config, twin, bank, lora)
    assert np.max(np.abs(got - want)) <= 1e-5 * np.max(np.abs(want))
    assert np.max(np.abs(got[1] - got[0])) > 1e-3  # the adapter row differs: the delta is on top


def test_quantize_at_load_bounds_the_error_per_weight(dirs):
    _, twin = load_hf_dir(dirs["deq"])
    q = quant.quantize_params(twin)
    for name in quant.LINEAR:
        w = np.asarray(twin["layers"][name])
        deq = np.asarray(q["layers"][name]).astype(np.float32) * np.asarray(q["layers"][quant.scale_name(name)])[:, None]
        scale = np.asarray(q["layers"][quant.scale_name(name)])[:, None]
        assert np.all(np.abs(deq - w) <= 2.0 ** -4 * np.abs(w) + 2.0 ** -10 * scale), name
        assert np.allclose(np.abs(deq).max(axis=1), np.abs(w).max(axis=1))  # absmax maps to 448 exactly


def test_a_per_tensor_checkpoint_loads_within_fp8_rounding(tmp_path):
    fp8, deq = _quantize_hf(random_hf_tensors(TINY, seed=4), per_tensor=True)
    config, params = load_hf_dir(_write(str(tmp_path / "t"), fp8, _ct("tensor")))
    _, twin = load_hf_dir(_write(str(tmp_path / "d"), deq))
    got, want = _logits(config, params), _logits(config, twin)
    assert np.max(np.abs(got - want)) <= 0.1 * np.max(np.abs(want))


def test_unsupported_quantizations_are_refused_by_name(tmp_path):
    tensors = random_hf_tensors(TINY, seed=1)
    block = {"quant_method": "fp8", "weight_block_size": [128, 128]}
    with pytest.raises(ModelLoadError, match=r"block-wise FP8 \(weight_block_size \[128, 128\]\)"):
        load_hf_dir(_write(str(tmp_path / "b"), tensors, block))
    with pytest.raises(ModelLoadError, match="quant_method 'gptq' is not supported"):
        load_hf_dir(_write(str(tmp_path / "g"), tensors, {"quant_method": "gptq", "bits": 4}))
    int8 = _ct("channel")
    int8["config_groups"]["group_0"]["weights"]["type"] = "int"
    with pytest.raises(ModelLoadError, match="only 8-bit float weights"):
        load_hf_dir(_write(str(tmp_path / "i"), tensors, int8))
    with pytest.raises(ValueError, match="quantization must be one of fp8"):
        quant.quantize_params(load_hf_dir(_write(str(tmp_path / "ok"), tensors))[1], "int4")


def test_the_engine_serves_an_fp8_checkpoint_with_adapters_like_its_twin(dirs):
    """Greedy tokens with and without an adapter, through LLM (paged engine), equal those of the dequantized
    float32 twin."""
    sp = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)
    prompts, adapters = [[3, 5, 7, 11], [2, 4, 6, 8, 10]], [None, "a"]
    outs = {}
    for name in ("fp8", "deq"):
        with LLM(dirs[name], adapters={"a": dirs["adapter"]}, progress=False) as llm:
            outs[name] = [o.token_ids for o in llm.generate(prompts, adapter=adapters, sampling=sp)]
    assert outs["fp8"] == outs["deq"]  # on a mesh: tests/sharding/test_engine_sharded.py


def test_w8a8_quantizes_activations_per_token_and_scales_after_the_fp8_dot():
    """quant.matmul(compute="w8a8") against numpy + ml_dtypes: x quantized per row by absmax, the fp8 x fp8 product
    in float64, then the row and column scales; W8A16 of the same weight keeps x unquantized (a different value)."""
    rng = np.random.default_rng(7)
    x = (rng.standard_normal((5, 64)) * rng.uniform(0.1, 10, (5, 1))).astype(np.float32)
    x[3] = 0.0  # an all-zero row gets scale 1, not a division by zero
    w = (rng.standard_normal((64, 48)) * 0.05).astype(np.float32)
    q, s = quant.quantize_weight(jnp.asarray(w))
    got = np.asarray(quant.matmul(jnp.asarray(x), q, s, "w8a8"))
    amax = np.abs(x).max(axis=1, keepdims=True)
    xs = np.where(amax > 0, amax / 448.0, 1.0).astype(np.float32)
    xq = (x / xs).astype(ml_dtypes.float8_e4m3fn).astype(np.float64)
    want = (xq @ np.asarray(q).astype(np.float64)) * xs * np.asarray(s)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6 * np.abs(want).max())
    assert np.all(got[3] == 0.0)
    w8a16 = np.asarray(quant.matmul(jnp.asarray(x), q, s, "w8a16"))
    assert np.abs(w8a16 - want).max() > 1e-3 * np.abs(want).max()  # the activations' rounding shows


def test_the_forward_takes_w8a8_from_the_runtime_config(dirs):
    """RuntimeConfig(fp8_compute=...) reaches the layers: W8A8 logits differ from W8A16's, within FP8 rounding."""
    config, params = load_hf_dir(dirs["fp8"])
    tokens = jnp.asarray(np.random.default_rng(3).integers(0, config.vocab_size, (2, 8)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(8), (2, 8))
    fwd = jax.jit(forward, static_argnames=("config", "runtime"))
    out = {c: np.asarray(fwd(params, None, tokens, positions, None, KVCache.zeros(config, 2, 8), config=config,
                             runtime=RuntimeConfig(fp8_compute=c))[0]) for c in ("w8a16", "w8a8")}
    diff = np.abs(out["w8a8"] - out["w8a16"]).max() / np.abs(out["w8a16"]).max()
    assert 1e-4 < diff < 0.1, diff
    assert RuntimeConfig().resolved("gpu").fp8_compute == "w8a8"
    assert RuntimeConfig().resolved("cpu").fp8_compute == "w8a16"
