"""Converts a llama.cpp GGUF file (Llama architecture) into an HF-layout checkpoint jlora loads.

Quantized tensors (Q4_1, Q8_0, ...) are dequantized to float32 with the `gguf` package; llama.cpp's
row permutation of the Q and K projections is undone; the tokenizer and chat template come from the metadata.
"""

from __future__ import annotations

import numpy as np
from tqdm import tqdm

from jlora.config import ModelConfig
from jlora.errors import ModelLoadError
from jlora.tokenizer import Tokenizer

_NAMES = {  # GGUF name -> HF name ("{i}" is the layer)
    "token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head",
    "blk.{i}.attn_norm": "model.layers.{i}.input_layernorm",
    "blk.{i}.ffn_norm": "model.layers.{i}.post_attention_layernorm",
    "blk.{i}.attn_q": "model.layers.{i}.self_attn.q_proj", "blk.{i}.attn_k": "model.layers.{i}.self_attn.k_proj",
    "blk.{i}.attn_v": "model.layers.{i}.self_attn.v_proj",
    "blk.{i}.attn_output": "model.layers.{i}.self_attn.o_proj",
    "blk.{i}.ffn_gate": "model.layers.{i}.mlp.gate_proj", "blk.{i}.ffn_up": "model.layers.{i}.mlp.up_proj",
    "blk.{i}.ffn_down": "model.layers.{i}.mlp.down_proj",
}
_TOKEN_CONTROL = 3


def _field(reader, key, default=None):
    f = reader.fields.get(key)
    if f is None:
        return default
    return f.contents()


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    parts = base.split(".")
    if parts[0] == "blk":
        key, layer = ".".join(["blk", "{i}"] + parts[2:]), parts[1]
    else:
        key, layer = base, None
    if key not in _NAMES:
        raise ModelLoadError(f"GGUF tensor {gguf_name!r} has no Llama counterpart")
    return _NAMES[key].format(i=layer) + "." + suffix


def unpermute_qk(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undoes llama.cpp's interleaving of rotary halves in the rows of a Q or K weight [out, in]."""
    return w.reshape(n_head, w.shape[0] // n_head // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_config(reader) -> ModelConfig:
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(f"GGUF architecture {arch!r} is not supported (only llama)")
    g = lambda k, d=None: _field(reader, f"llama.{k}", d)  # noqa: E731
    heads = int(g("attention.head_count"))
    hidden = int(g("embedding_length"))
    vocab = g("vocab_size") or len(reader.fields["tokenizer.ggml.tokens"].data)
    has_output = any(t.name == "output.weight" for t in reader.tensors)
    return ModelConfig(
        vocab_size=int(vocab), hidden_size=hidden, intermediate_size=int(g("feed_forward_length")),
        num_layers=int(g("block_count")), num_heads=heads, num_kv_heads=int(g("attention.head_count_kv", heads)),
        head_dim=int(g("rope.dimension_count", hidden // heads)),
        rms_norm_eps=float(g("attention.layer_norm_rms_epsilon", 1e-5)), rope_theta=float(g("rope.freq_base", 1e4)),
        max_position_embeddings=int(g("context_length", 4096)), tie_word_embeddings=not has_output,
        model_type="llama")


def read_tensors(reader, config: ModelConfig, progress: bool = True) -> dict[str, np.ndarray]:
    """Every tensor, dequantized to float32, by HF name, with Q/K rows back in HF order."""
    from gguf import quants  # the gguf package's reference dequantizers

    out = {}
    for t in tqdm(reader.tensors, desc="dequantizing GGUF", disable=not progress, leave=False):
        name = _hf_name(t.name)
        w = np.asarray(quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        if name.endswith("q_proj.weight"):
            w = unpermute_qk(w, config.num_heads)
        elif name.endswith("k_proj.weight"):
            w = unpermute_qk(w, config.num_kv_heads)
        out[name] = w
    return out


def read_tokenizer(reader) -> Tokenizer:
    """Builds a byte-level BPE tokenizer from `tokenizer.ggml.*` the way transformers' GGUF loader does."""
    from tokenizers import AddedToken, decoders, pre_tokenizers
    from tokenizers import Tokenizer as HFTokenizer
    from tokenizers.models import BPE

    model = _field(reader, "tokenizer.ggml.model")
    if model != "gpt2":
        raise ModelLoadError(f"GGUF tokenizer model {model!r} is not supported (only byte-level BPE 'gpt2')")
    tokens = list(_field(reader, "tokenizer.ggml.tokens"))
    types = list(_field(reader, "tokenizer.ggml.token_type", [1] * len(tokens)))
    merges = [tuple(m.split(" ", 1)) for m in _field(reader, "tokenizer.ggml.merges")]
    # The same pipeline transformers builds for a GGUF byte-level BPE: no normalizer, GPT-2 regex split,
    # no byte fallback; control tokens are special and match whole even inside text.
    tok = HFTokenizer(BPE({t: i for i, t in enumerate(tokens)}, merges))
    tok.add_special_tokens([AddedToken(t, normalized=False, special=True)
                            for t, ty in zip(tokens, types) if ty == _TOKEN_CONTROL])
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    bos, eos = _field(reader, "tokenizer.ggml.bos_token_id"), _field(reader, "tokenizer.ggml.eos_token_id")
    return Tokenizer(tok, bos_token=tokens[bos] if bos is not None else None,
                     eos_token=tokens[eos] if eos is not None else None,
                     chat_template=_field(reader, "tokenizer.chat_template"),
                     add_bos_token=bool(_field(reader, "tokenizer.ggml.add_bos_token", False)))


def convert_gguf(path: str, out_dir: str, progress: bool = True) -> ModelConfig:
    """Writes config.json, model.safetensors, tokenizer.json and tokenizer_config.json under `out_dir`."""
    import gguf

    from jlora.checkpoint.hf import save_hf_dir

    try:
        reader = gguf.GGUFReader(path)
    except (OSError, ValueError) as e:
        raise ModelLoadError(f"cannot read GGUF file {path!r}: {e}") from None
    config = read_config(reader)
    tensors = read_tensors(reader, config, progress)
    save_hf_dir(tensors, config, out_dir)
    read_tokenizer(reader).save(out_dir)
    return config
