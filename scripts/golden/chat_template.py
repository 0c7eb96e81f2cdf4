"""Tokenizer directories saved by transformers 5, whose `save_pretrained` writes the chat template to
chat_template.jinja (not into tokenizer_config.json), and transformers' own renderings of conversations with them:
the reference for jlora reading that layout (tests/test_tokenizer.py).

A small word-level tokenizer stands in for a real one (the template is what is under test, and the directory stays a
few KB). Two templates: SmolLM2's, as its GGUF carries it (from tests/fixtures/gguf_smollm2/tokenizer.json), and a
Qwen-style one that uses a system default, `loop` variables, a `namespace`, filters and `raise_exception`.

  .golden-venv/bin/python scripts/golden/chat_template.py      # writes tests/fixtures/chat_template/
"""

from __future__ import annotations

import json
import os
import shutil
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
OUT = os.path.join(ROOT, "tests", "fixtures", "chat_template")

QWEN_STYLE = (
    "{%- if messages[0]['role'] == 'system' %}{%- set system = messages[0]['content'] | trim %}"
    "{%- set rest = messages[1:] %}{%- else %}{%- set system = 'You are a helpful assistant.' %}"
    "{%- set rest = messages %}{%- endif %}"
    "{{- '<|im_start|>system\\n' + system + '<|im_end|>\\n' }}"
    "{%- set ns = namespace(turns=0) %}"
    "{%- for message in rest %}"
    "{%- if message['role'] not in ['user', 'assistant'] %}"
    "{{- raise_exception('unknown role ' + message['role']) }}{%- endif %}"
    "{%- if message['role'] == 'user' %}{%- set ns.turns = ns.turns + 1 %}{%- endif %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] }}"
    "{%- if loop.last and message['role'] == 'assistant' %}{{- '' }}{%- else %}{{- '<|im_end|>\\n' }}{%- endif %}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

CONVERSATIONS = {
    "no_system": [{"role": "user", "content": "What is the capital of France?"}],
    "with_system": [{"role": "system", "content": "  You are a terse assistant.  "},
                    {"role": "user", "content": "Name a color."}],
    "multi_turn": [{"role": "user", "content": "Hi!"},
                   {"role": "assistant", "content": "Hello! How can I help?"},
                   {"role": "user", "content": "Tell me a joke.\nKeep it short."}],
    "ends_with_assistant": [{"role": "user", "content": "Say yes."}, {"role": "assistant", "content": "Yes"}],
    "unicode": [{"role": "user", "content": "Ça va ? 日本語 🙂"}],
}


def small_tokenizer():
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for msgs in CONVERSATIONS.values() for m in msgs for w in m["content"].split()})
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "[UNK]"]
    vocab = {t: i for i, t in enumerate(special + ["system", "user", "assistant"] + words)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<|im_start|>", eos_token="<|im_end|>",
                                   unk_token="[UNK]", additional_special_tokens=special[:3])


def main() -> int:
    import transformers

    smollm = json.load(open(os.path.join(ROOT, "tests", "fixtures", "gguf_smollm2", "tokenizer.json")))["chat_template"]
    shutil.rmtree(OUT, ignore_errors=True)
    cases = []
    for name, template in (("smollm2", smollm), ("qwen_style", QWEN_STYLE)):
        tok = small_tokenizer()
        tok.chat_template = template
        folder = os.path.join(OUT, name)
        tok.save_pretrained(folder)
        with open(os.path.join(folder, "tokenizer_config.json")) as f:
            if "chat_template" in json.load(f):
                raise RuntimeError("this transformers saved the template into tokenizer_config.json")
        if not os.path.isfile(os.path.join(folder, "chat_template.jinja")):
            raise RuntimeError("save_pretrained wrote no chat_template.jinja")
        for conv, msgs in CONVERSATIONS.items():
            for gen in (False, True):
                text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=gen)
                cases.append({"dir": name, "name": conv, "messages": msgs, "add_generation_prompt": gen,
                              "text": text})
    with open(os.path.join(OUT, "renderings.json"), "w", encoding="utf-8") as f:
        json.dump({"transformers": transformers.__version__, "cases": cases}, f, indent=1, ensure_ascii=False)
    print(f"wrote {len(cases)} renderings under {OUT} (transformers {transformers.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
