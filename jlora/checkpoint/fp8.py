"""FP8 checkpoints as users have them: compressed-tensors `float-quantized` weights (float8_e4m3fn with a scale per
output channel or per tensor). They are read back to float32 values (`dequantize`) and quantized again per output
channel by `jlora.model.quant`; a per-channel checkpoint made by absmax comes back bit for bit, a per-tensor one
within FP8 rounding. Activation scales (W8A8 static) are dropped: jlora serves FP8 weights with 16-bit activations.
"""

from __future__ import annotations

import numpy as np

from jlora.errors import ModelLoadError


def is_fp8_checkpoint(hf_config: dict) -> bool:
    """Whether config.json's `quantization_config` says FP8 weights; raises ModelLoadError, naming it, for a
    quantization jlora does not read."""
    q = hf_config.get("quantization_config")
    if not q:
        return False
    method = q.get("quant_method")
    if method == "fp8" and q.get("weight_block_size"):
        raise ModelLoadError(f"block-wise FP8 (weight_block_size {q['weight_block_size']}) is not supported; "
                             "per-channel or per-tensor FP8 (compressed-tensors) is")
    if method != "compressed-tensors":
        raise ModelLoadError(f"quantization_config quant_method {method!r} is not supported; FP8 compressed-tensors "
                             "checkpoints are")
    for name, group in (q.get("config_groups") or {}).items():
        w = group.get("weights") or {}
        if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") not in ("channel", "tensor"):
            raise ModelLoadError(f"quantization group {name!r} has weights {w}; only 8-bit float weights per "
                                 "channel or per tensor are supported")
    return True


def dequantize(tensors: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """float32 weights from FP8 ones (`X.weight * X.weight_scale`); scale and activation-scale tensors dropped."""
    out = {}
    for key, t in tensors.items():
        if key.endswith(("weight_scale", "input_scale", "weight_zero_point")):
            continue
        scale = tensors.get(key + "_scale") if key.endswith(".weight") else None
        if scale is not None:
            scale = np.asarray(scale, np.float32)
            t = t * (scale.reshape(-1, 1) if scale.size == t.shape[0] else scale.reshape(()))
        out[key] = t
    return out
