"""The base model: config-driven Llama family decoder, RoPE, and its KV cache."""

from jlora.model.kv_cache import KVCache
from jlora.model.llama import Llama, forward, init_params, param_shapes

__all__ = ["KVCache", "Llama", "forward", "init_params", "param_shapes"]
