"""Small frozen configs, validated on construction."""

from __future__ import annotations

import dataclasses
import json
import os
from typing import Any

from jlora.errors import ModelLoadError

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "phi3", "gemma2", "gemma3_text")
GEMMA_TYPES = ("gemma2", "gemma3_text")
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling: Llama 3 style (`rope_type == "llama3"`), or "linear" (every frequency / factor; the
    llama3 fields unused)."""

    factor: float
    low_freq_factor: float = 0.0
    high_freq_factor: float = 0.0
    original_max_position_embeddings: int = 0
    rope_type: str = "llama3"


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape and numerics of a Llama-family decoder.

    The family's features are fields, so a config is a jit key:
      qk_norm: RMSNorm of each query and key head (over head_dim, one weight shared by the heads) before RoPE (Qwen3).
      norm_unit_offset: every RMSNorm scales by (1 + weight) (Gemma).
      post_norms: RMSNorms of the attention and MLP outputs before their residual adds (Gemma's sandwich norms:
        `post_attn_norm`, `post_mlp_norm`; `mlp_norm` is then the pre-feedforward norm).
      embed_scale: embeddings times sqrt(hidden_size) (Gemma).
      hidden_act: the gate's activation, one of ACTIVATIONS (Gemma's GeGLU: "gelu_pytorch_tanh").
      query_pre_attn_scalar: attention scores scale by its -1/2 power instead of head_dim's (Gemma).
      attn_logit_softcap, final_logit_softcap: cap * tanh(x / cap) of attention scores, of output logits (Gemma 2).
      sliding_layers: which layers use `sliding_window` (the others attend globally); None: all of them.
      rope_local_theta: the RoPE base of sliding layers, unscaled (Gemma 3); `rope_theta` and `rope_scaling` are
        then the global layers'. Needs `sliding_layers`.
    """

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    qkv_bias: bool = False
    o_bias: bool = False
    sliding_window: int | None = None
    model_type: str = "llama"
    qk_norm: bool = False
    norm_unit_offset: bool = False
    post_norms: bool = False
    embed_scale: bool = False
    hidden_act: str = "silu"
    query_pre_attn_scalar: float | None = None
    attn_logit_softcap: float | None = None
    final_logit_softcap: float | None = None
    sliding_layers: tuple[bool, ...] | None = None
    rope_local_theta: float | None = None

    def __post_init__(self):
        for name in ("vocab_size", "hidden_size", "intermediate_size", "num_layers", "num_heads",
                     "num_kv_heads", "head_dim", "max_position_embeddings"):
            if getattr(self, name) <= 0:
                raise ValueError(f"ModelConfig.{name} must be positive, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads ({self.num_kv_heads})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"ModelConfig.hidden_act must be one of {ACTIVATIONS}, got {self.hidden_act!r}")
        for name in ("query_pre_attn_scalar", "attn_logit_softcap", "final_logit_softcap"):
            if getattr(self, name) is not None and not getattr(self, name) > 0:
                raise ValueError(f"ModelConfig.{name} must be positive or None, got {getattr(self, name)}")
        if self.sliding_layers is not None:
            object.__setattr__(self, "sliding_layers", tuple(bool(s) for s in self.sliding_layers))
            if len(self.sliding_layers) != self.num_layers or self.sliding_window is None:
                raise ValueError(f"sliding_layers needs a sliding_window and one entry per layer "
                                 f"({self.num_layers}), got {self.sliding_layers}")
        if self.rope_local_theta is not None and self.sliding_layers is None:
            raise ValueError("rope_local_theta needs sliding_layers (a uniform model has one RoPE base)")

    @property
    def attn_scale(self) -> float:
        """The factor of q . k in the attention scores."""
        return (self.query_pre_attn_scalar or self.head_dim) ** -0.5

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    @classmethod
    def from_hf_dict(cls, d: dict[str, Any]) -> "ModelConfig":
        """Builds a config from a Hugging Face `config.json` dict (Llama, Mistral, Qwen2, Qwen3, Phi-3, Gemma 2,
        Gemma 3 text, SmolLM).

        Raises `ModelLoadError` naming any setting jlora does not implement, rather than computing something else.
        """
        model_type = d.get("model_type", "llama")
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelLoadError(f"unsupported model_type {model_type!r}; supported: {SUPPORTED_MODEL_TYPES}")
        if d.get("mlp_bias"):
            raise ModelLoadError("mlp_bias=True is not supported")
        gemma = model_type in GEMMA_TYPES
        act = (d.get("hidden_activation") or d.get("hidden_act") or "gelu_pytorch_tanh") if gemma else \
            d.get("hidden_act", "silu")
        if d.get("use_bidirectional_attention"):
            raise ModelLoadError("use_bidirectional_attention=True is not supported (causal attention only)")
        if act not in ACTIVATIONS:
            raise ModelLoadError(f"hidden_act {act!r} is not supported (only {list(ACTIVATIONS)})")
        heads = d["num_attention_heads"]
        head_dim = d.get("head_dim") or d["hidden_size"] // heads
        partial = (d.get("rope_parameters") or {}).get("partial_rotary_factor", d.get("partial_rotary_factor", 1.0))
        if partial != 1.0:
            raise ModelLoadError(f"partial_rotary_factor {partial} is not supported (RoPE over the whole head only)")
        attention_bias = bool(d.get("attention_bias", False))
        window = d.get("sliding_window")
        if model_type in ("qwen2", "qwen3") and not d.get("use_sliding_window", False):
            window = None
        window, sliding_layers = _layer_windows(d, window, d["num_hidden_layers"])
        rope_theta, rope_scaling, local_theta = _rope_theta(d), d.get("rope_scaling") or d.get("rope_parameters"), None
        if model_type == "gemma3_text":  # RoPE per layer type: {"full_attention": {...}, "sliding_attention": {...}}
            full, local = _gemma3_rope(d)
            rope_theta, rope_scaling = float(full.get("rope_theta", 1e6)), full
            if window is not None and sliding_layers is None:  # every layer slides: the local RoPE for all
                rope_theta, rope_scaling = float(local.get("rope_theta", 1e4)), None
            elif sliding_layers is not None:
                local_theta = float(local.get("rope_theta", 1e4))
        return cls(
            vocab_size=d["vocab_size"],
            hidden_size=d["hidden_size"],
            intermediate_size=d["intermediate_size"],
            num_layers=d["num_hidden_layers"],
            num_heads=heads,
            num_kv_heads=d.get("num_key_value_heads") or heads,
            head_dim=head_dim,
            rms_norm_eps=d.get("rms_norm_eps", 1e-6),
            rope_theta=rope_theta,
            rope_scaling=_rope_scaling(rope_scaling),
            max_position_embeddings=d.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(d.get("tie_word_embeddings", gemma)),
            qkv_bias=model_type == "qwen2" or attention_bias,
            o_bias=model_type != "qwen2" and attention_bias,
            sliding_window=window,
            model_type=model_type,
            qk_norm=model_type in ("qwen3", "gemma3_text"),
            norm_unit_offset=gemma,
            post_norms=gemma,
            embed_scale=gemma,
            hidden_act=act,
            query_pre_attn_scalar=_positive(d, "query_pre_attn_scalar") if gemma else None,
            attn_logit_softcap=_positive(d, "attn_logit_softcapping"),
            final_logit_softcap=_positive(d, "final_logit_softcapping"),
            sliding_layers=sliding_layers,
            rope_local_theta=local_theta,
        )

    @classmethod
    def from_json(cls, path: str | os.PathLike) -> "ModelConfig":
        with open(path) as f:
            return cls.from_hf_dict(json.load(f))

    def to_hf_dict(self) -> dict[str, Any]:
        """The inverse of `from_hf_dict`, written next to converted checkpoints (Llama, Mistral, Qwen2 only)."""
        if self.model_type not in ("llama", "mistral", "qwen2"):
            raise ValueError(f"to_hf_dict writes llama, mistral and qwen2 configs, not {self.model_type!r}")
        d = {
            "model_type": self.model_type,
            "architectures": [{"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
                               "qwen2": "Qwen2ForCausalLM"}[self.model_type]],
            "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
            "intermediate_size": self.intermediate_size, "num_hidden_layers": self.num_layers,
            "num_attention_heads": self.num_heads, "num_key_value_heads": self.num_kv_heads,
            "head_dim": self.head_dim, "rms_norm_eps": self.rms_norm_eps, "rope_theta": self.rope_theta,
            "max_position_embeddings": self.max_position_embeddings,
            "tie_word_embeddings": self.tie_word_embeddings, "hidden_act": "silu",
            "sliding_window": self.sliding_window,
        }
        if self.model_type == "llama":
            d["attention_bias"] = self.qkv_bias
        if self.rope_scaling is not None:
            d["rope_scaling"] = {"rope_type": "llama3", **dataclasses.asdict(self.rope_scaling)}
        return d


def _layer_windows(d: dict[str, Any], window: int | None, num_layers: int):
    """(sliding_window, sliding_layers) from `sliding_window` and transformers' per-layer `layer_types` (absent:
    every layer slides when a window is set). Uniform patterns give sliding_layers None (one window or none)."""
    types = d.get("layer_types")
    if window is None or not types:
        return window, None
    unknown = sorted(set(types) - set(LAYER_TYPES))
    if unknown or len(types) != num_layers:
        raise ModelLoadError(f"layer_types must be {num_layers} of {LAYER_TYPES}, got {types}")
    sliding = tuple(t == "sliding_attention" for t in types)
    if not any(sliding):
        return None, None
    return window, None if all(sliding) else sliding


def _positive(d: dict[str, Any], key: str) -> float | None:
    value = d.get(key)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or value <= 0:
        raise ModelLoadError(f"{key} must be a positive number, got {value!r}")
    return float(value)


def _gemma3_rope(d: dict[str, Any]) -> tuple[dict, dict]:
    """Gemma 3's (global, local) RoPE parameters; the local layers' must be unscaled."""
    params = d.get("rope_parameters") or {}
    full = dict(params.get("full_attention") or {})
    if d.get("rope_scaling"):
        full.update(d["rope_scaling"])
    full.setdefault("rope_theta", d.get("rope_theta") or 1e6)
    local = dict(params.get("sliding_attention") or {})
    local.setdefault("rope_theta", d.get("rope_local_base_freq") or 1e4)
    if local.get("rope_type", "default") != "default":
        raise ModelLoadError(f"rope scaling {local['rope_type']!r} of the sliding layers is not supported")
    return full, local


def _rope_theta(d: dict[str, Any]) -> float:
    params = d.get("rope_parameters") or {}
    return float(d.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(s: dict[str, Any] | None) -> RopeScaling | None:
    if not s:
        return None
    kind = s.get("rope_type", s.get("type"))
    if kind in (None, "default"):
        return None
    if kind == "linear":
        return RopeScaling(factor=float(s["factor"]), rope_type="linear")
    if kind != "llama3":
        raise ModelLoadError(f"rope scaling {kind!r} is not supported (only llama3 and linear)")
    return RopeScaling(
        factor=float(s["factor"]),
        low_freq_factor=float(s["low_freq_factor"]),
        high_freq_factor=float(s["high_freq_factor"]),
        original_max_position_embeddings=int(s["original_max_position_embeddings"]),
    )


DEFAULT_RANK_BUCKETS = (8, 16, 32, 64, 128)
LORA_MODULES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
# Fused groups: projections that share an input share one shrink.
LORA_GROUPS = {"qkv": ("q_proj", "k_proj", "v_proj"), "o": ("o_proj",),
               "gate_up": ("gate_proj", "up_proj"), "down": ("down_proj",)}
# Checkpoints that store a group as one linear (Phi-3): PEFT adapters of such a model target the fused module.
FUSED_MODULES = {"qkv_proj": "qkv", "gate_up_proj": "gate_up"}
FUSED_CHECKPOINTS = ("phi3",)


def model_lora_modules(config: "ModelConfig") -> tuple[str, ...]:
    """The module names a PEFT adapter of this base model targets: its checkpoint's linears."""
    if config.model_type in FUSED_CHECKPOINTS:
        return ("qkv_proj", "o_proj", "gate_up_proj", "down_proj")
    return LORA_MODULES
ALL_LINEAR = "all-linear"
_SHORT = {m.removesuffix("_proj"): m for m in LORA_MODULES}  # "q" -> "q_proj", ...


def parse_lora_modules(spec: str | list[str] | tuple[str, ...]) -> tuple[str, ...]:
    """Modules from "all-linear" or a comma list ("q,v" or "q_proj,v_proj"), in canonical order."""
    if isinstance(spec, str):
        if spec.strip() == ALL_LINEAR:
            return LORA_MODULES
        spec = [s.strip() for s in spec.split(",") if s.strip()]
    names = {_SHORT.get(s, s) for s in spec}
    unknown = sorted(names - set(LORA_MODULES))
    if unknown or not names:
        raise ValueError(f"target_modules must be {ALL_LINEAR!r} or a comma list of {list(LORA_MODULES)} "
                         f"(or their short names {list(_SHORT)}), got {spec!r}")
    return tuple(m for m in LORA_MODULES if m in names)


@dataclasses.dataclass(frozen=True)
class LoraBankConfig:
    """Fixed device slots per rank bucket. Shapes depend only on this, never on which adapters are loaded.

    Attributes:
      buckets: rank buckets, ascending. An adapter is zero-padded to the smallest bucket >= its rank.
      slots: device slots per bucket (same length as `buckets`); a bucket with 0 slots is absent.
      modules: the projections the bank serves (default all 7). A fused group (qkv, o, gate_up, down) is in the
        bank when any of its modules is; groups left out cost no memory and no kernel time, and adapters that
        target them are refused.
    """

    buckets: tuple[int, ...] = DEFAULT_RANK_BUCKETS
    slots: tuple[int, ...] = (4, 4, 2, 2, 1)
    modules: tuple[str, ...] = LORA_MODULES

    def __post_init__(self):
        if len(self.buckets) != len(self.slots):
            raise ValueError(f"buckets {self.buckets} and slots {self.slots} must have the same length")
        if list(self.buckets) != sorted(set(self.buckets)) or self.buckets[0] < 1:
            raise ValueError(f"buckets must be strictly ascending positive ranks, got {self.buckets}")
        if any(s < 0 for s in self.slots) or sum(self.slots) == 0:
            raise ValueError(f"slots must be >= 0 with at least one slot, got {self.slots}")
        object.__setattr__(self, "modules", tuple(self.modules))
        unknown = sorted(set(self.modules) - set(LORA_MODULES))
        if unknown or not self.modules:
            raise ValueError(f"modules must be a non-empty subset of {LORA_MODULES}, got {self.modules}")

    @property
    def groups(self) -> tuple[str, ...]:
        """The fused groups in the bank, in LORA_GROUPS order."""
        return tuple(g for g, ms in LORA_GROUPS.items() if set(ms) & set(self.modules))

    @property
    def max_rank(self) -> int:
        return max(b for b, s in zip(self.buckets, self.slots) if s)

    @property
    def active(self) -> tuple[tuple[int, int], ...]:
        """(rank, slots) of the buckets that have slots."""
        return tuple((b, s) for b, s in zip(self.buckets, self.slots) if s)

    def bucket_for(self, rank: int) -> int:
        """The smallest active bucket rank that holds `rank`."""
        for b, _ in self.active:
            if rank <= b:
                return b
        raise ValueError(f"rank {rank} is above the largest bucket {self.max_rank}")


LORA_BACKENDS = ("auto", "xla", "reference", "interpret", "triton", "mosaic", "interpret_mosaic", "mosaic_gpu",
                 "interpret_mosaic_gpu")
ATTENTION_BACKENDS = ("auto", "xla", "mosaic", "interpret_mosaic", "pallas", "interpret")
LAYER_LOOPS = ("auto", "scan", "split")
DECODE_EXPANDS = ("gather", "triton")
FP8_COMPUTES = ("auto", "w8a16", "w8a8")
RUNTIME_ENV = {"lora_backend": "JLORA_LORA_BACKEND", "attention": "JLORA_ATTENTION", "layer_loop": "JLORA_LAYER_LOOP",
               "fp8_compute": "JLORA_FP8_COMPUTE"}


@dataclasses.dataclass(frozen=True)
class RuntimeConfig:
    """The switches that change compiled programs, in one frozen (hashable) value.

    Every jitted entry point takes it as a static argument, so it is part of the jit cache key: a different value
    compiles a different program, and nothing that shapes a program is read from the environment or a module global
    while tracing. Environment variables are parsed once, at the command-line edge (`from_env`).

    Attributes:
      lora_backend: the LoRA kernels: "auto" (Pallas Triton on GPU, Pallas Mosaic on TPU, dense XLA elsewhere),
        "xla", "reference" (the per-token gather oracle), "triton", "mosaic", "mosaic_gpu" (the Pallas Mosaic GPU
        kernels; not the GPU default until measured), or "interpret" / "interpret_mosaic" / "interpret_mosaic_gpu"
        (the Pallas kernels in interpret mode, for tests on the CPU).
      attention: paged attention: "auto" ("mosaic" on GPU, else "xla"); "mosaic" (jlora's Pallas Mosaic GPU decode
        and prefill kernels, `pallas_kernels.attention`), "pallas" (JAX's deprecated Pallas Triton paged decode
        kernel), "xla" (gather the pages, dense masked softmax: the reference and the CPU path), or
        "interpret_mosaic" / "interpret" (those kernels in interpret mode, for CPU tests). Steps a kernel cannot
        take (its dtype, head size or, for "pallas", prefill and sliding windows) run on XLA.
      layer_loop: "auto" ("split" on GPU, else "scan"), "scan" (stacked [L, ...] weights, one compiled layer body) or
        "split" (per-layer weight arrays, a Python loop over layers: no per-layer weight copies on GPU).
      fold_residual: row-parallel projections (o, down) add the residual before the LoRA delta, so XLA fuses it into
        the base matmul (without a tensor-parallel reduce only).
      decode_expand: how decode-sized GPU steps (<= 256 tokens) run the LoRA expand: "gather" (XLA's gather-einsum)
        or "triton" (the tiled kernel).
      decode_attention_programs: the paged decode kernel splits each row's pages until it has this many programs.
      fp8_compute: how FP8 base weights multiply: "auto" ("w8a8" on GPU, else "w8a16"), "w8a16" (the fp8 weight
        cast to the activations' dtype inside the dot) or "w8a8" (activations quantized to fp8 per token on the
        fly, an fp8 x fp8 dot with float32 accumulation: cuBLASLt's FP8 GEMM on Hopper). Unused for 16-bit weights.
    """

    lora_backend: str = "auto"
    attention: str = "auto"
    layer_loop: str = "auto"
    fold_residual: bool = True
    decode_expand: str = "gather"
    decode_attention_programs: int = 512
    fp8_compute: str = "auto"

    def __post_init__(self):
        for name, allowed in (("lora_backend", LORA_BACKENDS), ("attention", ATTENTION_BACKENDS),
                              ("layer_loop", LAYER_LOOPS), ("decode_expand", DECODE_EXPANDS),
                              ("fp8_compute", FP8_COMPUTES)):
            value = getattr(self, name)
            if value not in allowed:
                env = f" (${RUNTIME_ENV[name]})" if name in RUNTIME_ENV else ""
                raise ValueError(f"RuntimeConfig.{name}{env} must be one of {allowed}, got {value!r}")
        if not isinstance(self.fold_residual, bool):
            raise ValueError(f"RuntimeConfig.fold_residual must be a bool, got {self.fold_residual!r}")
        if not isinstance(self.decode_attention_programs, int) or self.decode_attention_programs < 1:
            raise ValueError("RuntimeConfig.decode_attention_programs must be a positive int, got "
                             f"{self.decode_attention_programs!r}")

    @classmethod
    def from_env(cls, environ=None, **overrides) -> "RuntimeConfig":
        """A config from $JLORA_LORA_BACKEND, $JLORA_ATTENTION, $JLORA_LAYER_LOOP and $JLORA_FP8_COMPUTE (unset or
        empty: "auto"), with
        `overrides` on top. Call it once, where the program starts (the command line, a script's main)."""
        environ = os.environ if environ is None else environ
        values = {field: environ.get(var) or "auto" for field, var in RUNTIME_ENV.items()}
        return cls(**{**values, **overrides})

    def resolved(self, platform: str | None = None) -> "RuntimeConfig":
        """This config with every "auto" replaced by the choice for `platform` (default: JAX's default backend)."""
        if platform is None:
            import jax  # the config layer needs jax only to name the platform
            platform = jax.default_backend()
        gpu = platform in ("gpu", "cuda", "rocm")
        lora = self.lora_backend
        if lora == "auto":
            lora = "triton" if gpu else "mosaic" if platform == "tpu" else "xla"
        attention = self.attention if self.attention != "auto" else ("mosaic" if gpu else "xla")
        loop = self.layer_loop if self.layer_loop != "auto" else ("split" if gpu else "scan")
        fp8 = self.fp8_compute if self.fp8_compute != "auto" else ("w8a8" if gpu else "w8a16")
        return dataclasses.replace(self, lora_backend=lora, attention=attention, layer_loop=loop, fp8_compute=fp8)
