"""Loads and saves Hugging Face Llama-family directories (config.json + safetensors, sharded or not); Phi-3's fused
qkv_proj and gate_up_proj load as jlora's fused weights."""

from __future__ import annotations

import glob
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
from safetensors import safe_open
from safetensors.numpy import save_file

from jlora.checkpoint import fp8
from jlora.config import FUSED_CHECKPOINTS, ModelConfig
from jlora.errors import ModelLoadError
from jlora.model import quant
from jlora.model.llama import Params, param_shapes

_LAYER_KEYS = {  # HF suffix -> (our key, slice index within a fused weight, or None)
    "self_attn.q_proj": ("w_qkv", 0), "self_attn.k_proj": ("w_qkv", 1), "self_attn.v_proj": ("w_qkv", 2),
    "self_attn.o_proj": ("w_o", None), "mlp.gate_proj": ("w_gate_up", 0), "mlp.up_proj": ("w_gate_up", 1),
    "mlp.down_proj": ("w_down", None),
}
_NORMS = {"attn_norm": "input_layernorm", "mlp_norm": "post_attention_layernorm"}
_POST_NORMS = {"attn_norm": "input_layernorm", "post_attn_norm": "post_attention_layernorm",
               "mlp_norm": "pre_feedforward_layernorm", "post_mlp_norm": "post_feedforward_layernorm"}
# Phi-3 stores q|k|v and gate|up fused, in jlora's order: each is the whole fused weight, transposed.
_FUSED_LAYER_KEYS = {"self_attn.qkv_proj": ("w_qkv", None), "self_attn.o_proj": ("w_o", None),
                     "mlp.gate_up_proj": ("w_gate_up", None), "mlp.down_proj": ("w_down", None)}


def _weight_files(path: str) -> list[str]:
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        with open(index) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        return [os.path.join(path, f) for f in files]
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        pickles = glob.glob(os.path.join(path, "*.bin"))
        hint = " (only pickle .bin files found; jlora reads safetensors only)" if pickles else ""
        raise ModelLoadError(f"no *.safetensors weights in {path!r}{hint}")
    return files


def read_tensors(path: str) -> dict[str, np.ndarray]:
    """Every tensor of an HF checkpoint as float32 numpy, by HF name."""
    out = {}
    for file in _weight_files(path):
        float8 = _fp8_entries(file)
        with safe_open(file, framework="flax") as f:
            for key in f.keys():
                if key not in float8:
                    out[key] = np.asarray(f.get_tensor(key).astype(jnp.float32))
        out.update(_read_fp8(file, float8))
    return out


def _fp8_entries(file: str) -> dict[str, dict]:
    """The float8_e4m3 tensors of a safetensors file, from its header (the safetensors reader cannot make them)."""
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        header = json.loads(f.read(n))
    return {k: dict(v, data_start=8 + n) for k, v in header.items() if k != "__metadata__" and v["dtype"] == "F8_E4M3"}


def _read_fp8(file: str, entries: dict[str, dict]) -> dict[str, np.ndarray]:
    out = {}
    for key, e in entries.items():
        begin, end = e["data_offsets"]
        raw = np.fromfile(file, np.uint8, count=end - begin, offset=e["data_start"] + begin)
        out[key] = raw.view(jnp.float8_e4m3fn).reshape(e["shape"]).astype(np.float32)
    return out


def params_from_hf(tensors: dict[str, np.ndarray], config: ModelConfig, dtype=jnp.float32) -> Params:
    """Stacks HF per-layer tensors ([out, in]) into jlora's fused [L, in, out] params."""
    shapes = param_shapes(config)
    layers = {k: np.zeros(s, np.float32) for k, s in shapes["layers"].items()}
    qkv_off = (0, config.q_dim, config.q_dim + config.kv_dim, config.q_dim + 2 * config.kv_dim)
    f = config.intermediate_size
    seen = set()
    keys = _FUSED_LAYER_KEYS if config.model_type in FUSED_CHECKPOINTS else _LAYER_KEYS

    def take(name):
        if name not in tensors:
            raise ModelLoadError(f"checkpoint is missing tensor {name!r}")
        seen.add(name)
        return tensors[name]

    # Gemma's post_attention_layernorm norms the attention output; its MLP input norm is pre_feedforward_layernorm.
    norms = _POST_NORMS if config.post_norms else _NORMS
    for i in range(config.num_layers):
        p = f"model.layers.{i}."
        for key, name in norms.items():
            layers[key][i] = take(p + name + ".weight")
        for suffix, (key, j) in keys.items():
            w = take(p + suffix + ".weight").T
            if j is None:
                layers[key][i] = w
            elif key == "w_qkv":
                layers[key][i, :, qkv_off[j]:qkv_off[j + 1]] = w
            else:
                layers[key][i, :, j * f:(j + 1) * f] = w
        if config.qkv_bias:
            for j, proj in enumerate("qkv"):
                layers["b_qkv"][i, qkv_off[j]:qkv_off[j + 1]] = take(p + f"self_attn.{proj}_proj.bias")
        if config.o_bias:
            layers["b_o"][i] = take(p + "self_attn.o_proj.bias")
        if config.qk_norm:
            layers["q_norm"][i] = take(p + "self_attn.q_norm.weight")
            layers["k_norm"][i] = take(p + "self_attn.k_norm.weight")
    params = {"embed": take("model.embed_tokens.weight"), "layers": layers, "final_norm": take("model.norm.weight")}
    if not config.tie_word_embeddings:
        params["lm_head"] = take("lm_head.weight").T
    seen.add("lm_head.weight")
    extra = sorted(k for k in tensors if k not in seen and "rotary_emb" not in k)
    if extra:
        raise ModelLoadError(f"checkpoint has tensors this architecture does not use: {extra[:5]}")
    for key, shape in [("embed", shapes["embed"]), ("final_norm", shapes["final_norm"])]:
        if params[key].shape != shape:
            raise ModelLoadError(f"{key} has shape {params[key].shape}, config implies {shape}")
    return _cast(params, dtype)


def _cast(tree, dtype):
    if isinstance(tree, dict):
        return {k: _cast(v, dtype) for k, v in tree.items()}
    return jnp.asarray(tree, dtype=dtype)


def load_hf_dir(path: str, dtype=jnp.float32, quantization: str | None = None) -> tuple[ModelConfig, Params]:
    """Config and params of an HF model directory. An FP8 checkpoint (`checkpoint.fp8`), or `quantization="fp8"`,
    gives FP8 linear weights with per-channel scales (`model.quant`); the rest is in `dtype`."""
    cfg = os.path.join(path, "config.json")
    if not os.path.isfile(cfg):
        raise ModelLoadError(f"{path!r} is not a model directory: config.json is missing")
    with open(cfg) as f:
        hf_config = json.load(f)
    config, fp8_checkpoint = ModelConfig.from_hf_dict(hf_config), fp8.is_fp8_checkpoint(hf_config)
    tensors = read_tensors(path)
    if fp8_checkpoint:
        tensors, quantization = fp8.dequantize(tensors), quantization or "fp8"
    try:
        if quantization is None:
            return config, params_from_hf(tensors, config, dtype)
        params = quant.quantize_params(params_from_hf(tensors, config, jnp.float32), quantization)
    except ValueError as e:  # numpy shape errors while stacking
        raise ModelLoadError(f"{path!r}: tensor shapes do not match config.json: {e}") from None
    return config, cast_unquantized(params, dtype)


def cast_unquantized(params: Params, dtype) -> Params:
    """`params` in `dtype`, except FP8 weights and their float32 scales."""
    def cast(path, x):
        name = path[-1].key
        return x if name in quant.LINEAR or name.endswith("_scale") else x.astype(dtype)
    return jax.tree_util.tree_map_with_path(cast, params)


def save_hf_dir(tensors: dict[str, np.ndarray], config: ModelConfig, path: str) -> None:
    """Writes HF-named tensors and config.json (the layout `load_hf_dir` and transformers read)."""
    os.makedirs(path, exist_ok=True)
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(config.to_hf_dict(), f, indent=2)
