"""Tokenizer, chat template and incremental detokenization, matching transformers' rendering."""

from __future__ import annotations

import json
import os
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as HFTokenizer

from jlora.errors import ModelLoadError, RequestError


def _raise(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _compile_template(source: str) -> jinja2.Template:
    # The same environment transformers renders chat templates in, so outputs agree byte for byte.
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env.from_string(source)


class Tokenizer:
    """A `tokenizers` tokenizer plus the special tokens and chat template of one model."""

    def __init__(self, tokenizer: HFTokenizer, *, bos_token: str | None, eos_token: str | None,
                 chat_template: str | None, add_bos_token: bool = False, extra_eos_ids: tuple[int, ...] = ()):
        self.backend = tokenizer
        self.bos_token, self.eos_token = bos_token, eos_token
        self.bos_id = tokenizer.token_to_id(bos_token) if bos_token else None
        self.eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
        self.chat_template = chat_template
        self.add_bos_token = add_bos_token
        self.stop_ids = tuple(sorted({i for i in (self.eos_id, *extra_eos_ids) if i is not None}))
        self._template = _compile_template(chat_template) if chat_template else None

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        if add_special_tokens and self.add_bos_token and self.bos_id is not None:
            ids = [self.bos_id] + ids
        return ids

    def decode(self, ids, skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True) -> str:
        """Renders a conversation to text exactly as `transformers`' `apply_chat_template(tokenize=False)`."""
        if self._template is None:
            raise RequestError("this model has no chat template; send a plain prompt instead")
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m for m in messages):
            raise RequestError("messages must be a list of objects with 'role' and 'content'")
        try:
            return self._template.render(messages=messages, add_generation_prompt=add_generation_prompt,
                                         bos_token=self.bos_token or "", eos_token=self.eos_token or "")
        except jinja2.exceptions.TemplateError as e:
            raise RequestError(f"chat template rejected the messages: {e}") from None

    def save(self, path: str) -> None:
        os.makedirs(path, exist_ok=True)
        self.backend.save(os.path.join(path, "tokenizer.json"))
        cfg = {"bos_token": self.bos_token, "eos_token": self.eos_token, "chat_template": self.chat_template,
               "add_bos_token": self.add_bos_token, "extra_eos_ids": [i for i in self.stop_ids if i != self.eos_id]}
        with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
            json.dump(cfg, f, indent=2, ensure_ascii=False)

    @classmethod
    def from_dir(cls, path: str, chat_template: str | None = None) -> "Tokenizer":
        """Reads tokenizer.json, tokenizer_config.json and, if present, chat_template.jinja and
        generation_config.json.

        The chat template is, as transformers picks it: `chat_template.jinja` (where transformers 5 saves it),
        else tokenizer_config.json's "chat_template" (the older place; of several named templates, "default").
        `chat_template`, if given, replaces both: a template file's path or the template text
        (`load_chat_template`).
        """
        tok_file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(tok_file):
            raise ModelLoadError(f"{path!r} has no tokenizer.json")
        backend = HFTokenizer.from_file(tok_file)
        cfg = _read_json(os.path.join(path, "tokenizer_config.json"))
        gen = _read_json(os.path.join(path, "generation_config.json"))
        eos = gen.get("eos_token_id", [])
        extra = tuple(eos if isinstance(eos, list) else [eos]) + tuple(cfg.get("extra_eos_ids", ()))
        if chat_template is not None:
            template = load_chat_template(chat_template)
        else:
            template = _dir_chat_template(path, cfg.get("chat_template"))
        return cls(backend, bos_token=_token_str(cfg.get("bos_token")), eos_token=_token_str(cfg.get("eos_token")),
                   chat_template=template, add_bos_token=bool(cfg.get("add_bos_token", False)),
                   extra_eos_ids=extra)


CHAT_TEMPLATE_FILE = "chat_template.jinja"


def load_chat_template(source: str) -> str:
    """A chat template given by the user: the text of the file at `source`, or `source` itself when it reads as a
    template (it holds "{", "}" or a newline; vLLM's `--chat-template` rule). Raises `ModelLoadError` naming the
    path when `source` looks like a path to a file that is not there."""
    if not isinstance(source, str) or not source:
        raise ModelLoadError(f"chat_template must be a template file's path or the template text, got {source!r}")
    if os.path.isfile(source):
        with open(source, encoding="utf-8") as f:
            return f.read()
    if any(c in source for c in "{}\n"):
        return source
    raise ModelLoadError(f"chat template file {source!r} does not exist")


def _dir_chat_template(path: str, config_template) -> str | None:
    """The chat template of a model directory: its chat_template.jinja clobbers tokenizer_config.json's."""
    jinja = os.path.join(path, CHAT_TEMPLATE_FILE)
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as f:
            return f.read()
    if isinstance(config_template, list):  # named templates, [{"name": ..., "template": ...}]
        named = {t.get("name"): t.get("template") for t in config_template if isinstance(t, dict)}
        return named.get("default")
    return config_template


def _read_json(path: str) -> dict:
    if not os.path.isfile(path):
        return {}
    with open(path) as f:
        return json.load(f)


def _token_str(tok) -> str | None:
    return tok.get("content") if isinstance(tok, dict) else tok


class IncrementalDetokenizer:
    """Turns a growing list of token ids into text deltas, holding back incomplete UTF-8 sequences."""

    def __init__(self, tokenizer: Tokenizer, prompt_ids: list[int] | None = None, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip = skip_special_tokens
        # A few prompt tokens of context, so that a leading space or a merged byte decodes as in the full text.
        self.ids: list[int] = list(prompt_ids or [])[-6:]
        self.prefix_offset = 0
        self.read_offset = len(self.ids)

    def step(self, new_ids) -> str:
        """Adds tokens and returns the newly completed text (possibly "")."""
        self.ids.extend(int(i) for i in new_ids)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset:self.read_offset], skip_special_tokens=self.skip)
        full = decode(self.ids[self.prefix_offset:], skip_special_tokens=self.skip)
        if full.endswith("\ufffd") or len(full) <= len(prefix):
            return ""  # an unfinished multi-byte character: wait for the next token
        delta = full[len(prefix):]
        self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return delta
