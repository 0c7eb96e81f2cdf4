"""Incremental detokenization against full decoding (the default model's tokenizer); chat templates of a directory."""

import json
import os

import pytest

from jlora.checkpoint.resolve import resolve_model_dir
from jlora.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = ["Hello, world! ", "  leading spaces\nand lines", "naïve café — déjà vu", "日本語のテキスト",
         "emoji 🎉🚀 mixed 👩‍👩‍👧", "Ω≈ç√∫ and combining e\u0301"]


@pytest.fixture(scope="session")
def tokenizer():
    return Tokenizer.from_dir(resolve_model_dir("smollm2-135m-instruct", progress=False))


@pytest.mark.parametrize("text", TEXTS)
def test_streamed_text_equals_full_decode(tokenizer, text):
    prompt = tokenizer.encode("Q: ")
    ids = tokenizer.encode(text)
    detok = IncrementalDetokenizer(tokenizer, prompt)
    pieces = [detok.step([i]) for i in ids]
    assert "".join(pieces) == tokenizer.decode(ids) == text
    assert all("\ufffd" not in p for p in pieces)


def test_round_trip_and_special_tokens(tokenizer):
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.eos_id in tokenizer.stop_ids
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == tokenizer.backend.token_to_id("<|im_start|>")
    assert tokenizer.decode(ids, skip_special_tokens=True) == "user\nhi"


JINJA = ("{% for message in messages %}\n"
         "<{{ message['role'] }}>{{ message['content'] | trim }}</{{ message['role'] }}>{{ eos_token }}\n"
         "{% endfor %}\n"
         "{% if add_generation_prompt %}\n"
         "<assistant>\n"
         "{% endif %}\n")
CHAT = [{"role": "system", "content": " Be brief. "}, {"role": "user", "content": "Hi"}]
# By hand, with transformers' Jinja settings: block tags eat their newline (trim_blocks) and the file's last
# newline is dropped (keep_trailing_newline off).
RENDERED = "<system>Be brief.</system><|im_end|>\n<user>Hi</user><|im_end|>\n<assistant>\n"


def test_chat_template_jinja_file_clobbers_tokenizer_config(tmp_path):
    from jlora.errors import ModelLoadError
    from train.tiny import write_tiny_tokenizer

    d = write_tiny_tokenizer(str(tmp_path / "m"))  # tokenizer_config.json holds a ChatML template
    legacy = Tokenizer.from_dir(d).apply_chat_template(CHAT[1:])
    assert legacy == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    (tmp_path / "m" / "chat_template.jinja").write_text(JINJA)  # where transformers 5 saves it
    tok = Tokenizer.from_dir(d)
    assert tok.apply_chat_template(CHAT) == RENDERED
    assert tok.apply_chat_template(CHAT, add_generation_prompt=False) == RENDERED[:-len("<assistant>\n")]
    explicit = tmp_path / "other.jinja"
    explicit.write_text("{% for m in messages %}[{{ m['content'] }}]{% endfor %}")
    assert Tokenizer.from_dir(d, chat_template=str(explicit)).apply_chat_template(CHAT) == "[ Be brief. ][Hi]"
    assert Tokenizer.from_dir(d, chat_template="{{ messages | length }}").apply_chat_template(CHAT) == "2"
    with pytest.raises(ModelLoadError, match="missing.jinja"):
        Tokenizer.from_dir(d, chat_template=str(tmp_path / "missing.jinja"))
    # Several named templates in tokenizer_config.json (the form transformers saved before .jinja files): "default".
    (tmp_path / "m" / "chat_template.jinja").unlink()
    cfg = json.loads((tmp_path / "m" / "tokenizer_config.json").read_text())
    cfg["chat_template"] = [{"name": "tool_use", "template": "tools"}, {"name": "default", "template": "plain"}]
    (tmp_path / "m" / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert Tokenizer.from_dir(d).apply_chat_template(CHAT) == "plain"


CHAT_FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "chat_template")
RENDERINGS = json.load(open(os.path.join(CHAT_FIXTURES, "renderings.json"), encoding="utf-8"))["cases"]


@pytest.mark.parametrize("case", RENDERINGS, ids=[f"{c['dir']}-{c['name']}-{c['add_generation_prompt']}"
                                                  for c in RENDERINGS])
def test_a_transformers_5_directory_renders_chats_as_transformers(case):
    """Directories written by transformers 5's save_pretrained (scripts/golden/chat_template.py): the template only
    in chat_template.jinja. jlora's rendering equals transformers' own."""
    folder = os.path.join(CHAT_FIXTURES, case["dir"])
    assert "chat_template" not in json.load(open(os.path.join(folder, "tokenizer_config.json")))
    tok = Tokenizer.from_dir(folder)
    text = tok.apply_chat_template(case["messages"], add_generation_prompt=case["add_generation_prompt"])
    assert text == case["text"]
