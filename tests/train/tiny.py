"""A tiny character-level tokenizer with a ChatML template, and tiny training data, for the TINY model."""

from __future__ import annotations

import json
import os

from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models

from jlora.tokenizer import Tokenizer

CHATML = ("{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + "
          "'<|im_end|>' + '\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}")
SPECIALS = ["<unk>", "<|im_start|>", "<|im_end|>"]
CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789 .,!?'\n:{}\"+"


def tiny_tokenizer() -> Tokenizer:
    """One token per character (78 tokens, so ids fit TINY's vocab of 97); <|im_end|> is EOS. The decoder
    (byte fallback, then fuse) is one llguidance reads, so structured output runs on the tiny model too."""
    vocab = {t: i for i, t in enumerate(SPECIALS + list(CHARS))}
    backend = HFTokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.add_special_tokens(SPECIALS[1:])
    backend.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Fuse()])
    return Tokenizer(backend, bos_token=None, eos_token="<|im_end|>", chat_template=CHATML)


def write_tiny_tokenizer(model_dir: str) -> str:
    tiny_tokenizer().save(model_dir)
    return model_dir


def write_tiny_data(path: str, n: int = 32) -> str:
    """Chat and prompt/completion records whose answers follow a fixed pattern: easy to learn fast."""
    with open(path, "w") as f:
        for i in range(n):
            x, y = i % 7, (3 * i) % 5
            if i % 2:
                rec = {"messages": [{"role": "user", "content": f"add {x} and {y}"},
                                    {"role": "assistant", "content": f"arr {x + y} matey"}]}
            else:
                rec = {"prompt": f"Q: add {x} and {y}\nA:", "completion": f" arr {x + y} matey"}
            f.write(json.dumps(rec) + "\n")
    return path
