"""Structured output on the host: grammars (JSON object, JSON schema, regex, Lark) compiled with llguidance, one
matcher per request, and the allowed-token bitmask of each step.

A bitmask row holds one bit per vocabulary id (bit `i % 32` of word `i // 32`; 1 = allowed), the layout llguidance
fills in place. The device applies it to the logits before sampling (`apply_bitmask`); the host advances each
request's matcher with the token it sampled. Pure host code: the only JAX here is `apply_bitmask`.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from jlora.errors import RequestError

KINDS = ("json_object", "json_schema", "regex", "grammar")
MAX_SPEC_BYTES = 256 * 1024  # a schema, regex or grammar larger than this is refused before compiling
# JSON is generated with fixed separators and no free whitespace: with any whitespace allowed between tokens, sampling
# can emit whitespace without end (the grammar never forces it to stop).
JSON_OPTIONS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


@dataclasses.dataclass(frozen=True)
class StructuredOutput:
    """What a request's output must match: `kind` one of KINDS, `spec` the JSON schema (text), regex, or grammar in
    Lark or GBNF syntax (llama.cpp's, which vLLM and SGLang take; unused for json_object)."""

    kind: str
    spec: str = ""

    def __post_init__(self):
        if self.kind not in KINDS:
            raise RequestError(f"structured output kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if not isinstance(self.spec, str):
            raise RequestError(f"the {self.kind} must be given as text")
        if len(self.spec.encode("utf-8", "surrogatepass")) > MAX_SPEC_BYTES:
            raise RequestError(f"the {self.kind} is larger than {MAX_SPEC_BYTES // 1024} KiB")
        if self.kind != "json_object" and not self.spec:
            raise RequestError(f"a {self.kind} constraint needs its {self.kind.replace('json_', '')}")


def bitmask_words(vocab_size: int) -> int:
    return (vocab_size + 31) // 32


class GrammarCompiler:
    """Compiles `StructuredOutput`s for one tokenizer (building the token trie costs about a second, once).

    Args:
      tokenizer: a `jlora.tokenizer.Tokenizer` (its `tokenizers` backend is what llguidance reads).
      vocab_size: the model's vocabulary (the logits' width; may exceed the tokenizer's).
      eos_ids: the ids that end a request; the grammar allows them once its output is complete.
    """

    def __init__(self, tokenizer, vocab_size: int, eos_ids):
        import llguidance

        self._ll = llguidance
        self.vocab_size = vocab_size
        self.words = bitmask_words(vocab_size)
        eos = sorted(set(eos_ids))
        if not eos:
            raise ValueError("structured output needs an end-of-sequence token to end a completed output")
        self.tokenizer = llguidance.LLTokenizer(tokenizer.backend.to_str(), n_vocab=vocab_size, eos_token=eos)
        self._grammars: dict[StructuredOutput, str] = {}
        self._executor = None  # llguidance's thread pool, made at the first batch of masks

    def grammar(self, spec: StructuredOutput) -> str:
        """llguidance's grammar for `spec`, validated; raises `RequestError` naming what is wrong."""
        if spec in self._grammars:
            return self._grammars[spec]
        M = self._ll.LLMatcher
        try:
            if spec.kind == "json_object":
                grammar = M.grammar_from_json_schema({"type": "object"}, overrides=JSON_OPTIONS)
            elif spec.kind == "json_schema":
                schema = json.loads(spec.spec)
                if not isinstance(schema, dict):
                    raise RequestError("a JSON schema must be a JSON object")
                grammar = M.grammar_from_json_schema(schema, overrides=JSON_OPTIONS)
            elif spec.kind == "regex":
                grammar = M.grammar_from_regex(spec.spec)
            else:
                grammar = M.grammar_from_lark(self._lark(spec.spec))
        except (ValueError, TypeError) as e:  # json.JSONDecodeError is a ValueError
            raise RequestError(f"invalid {spec.kind}: {e}") from None
        error, messages = M.validate_grammar_with_warnings(grammar, self.tokenizer)
        if error:
            raise RequestError(f"invalid {spec.kind}: {messages[0] if messages else 'rejected'}")
        if len(self._grammars) < 256:
            self._grammars[spec] = grammar
        return grammar

    def _lark(self, text: str) -> str:
        """Lark text as it is; GBNF converted to Lark."""
        from llguidance.gbnf_to_lark import GbnfToLarkError, any_to_lark

        try:
            return any_to_lark(text)
        except GbnfToLarkError as e:
            raise ValueError(f"not Lark, and not GBNF either: {e}") from None

    def matcher(self, spec: StructuredOutput) -> "Matcher":
        return Matcher(self._ll.LLMatcher(self.tokenizer, self.grammar(spec), log_level=0), self.words)

    def fill(self, bitmask: np.ndarray, rows: list[tuple[int, "Matcher"]]) -> None:
        """Writes each (row, matcher)'s allowed next tokens into bitmask[row] (int32 [B, words], C-contiguous);
        several rows in parallel on llguidance's thread pool."""
        if bitmask.dtype != np.int32 or bitmask.ndim != 2 or bitmask.shape[1] != self.words or \
                not bitmask.flags["C_CONTIGUOUS"] or not all(0 <= r < bitmask.shape[0] for r, _ in rows):
            raise ValueError(f"a bitmask is int32 [B, {self.words}], C-contiguous, with every row in [0, B)")
        if len(rows) == 1:
            rows[0][1].fill(bitmask[rows[0][0]])
            return
        if self._executor is None:
            self._executor = self._ll.LLExecutor()
        self._executor.unsafe_compute_mask_ptr([(m._m, r) for r, m in rows], bitmask.ctypes.data, self.words * 4,
                                               bitmask.shape[0])


class Matcher:
    """One request's position in its grammar."""

    def __init__(self, matcher, words: int):
        self._m, self.words = matcher, words

    def fill(self, row: np.ndarray) -> None:
        """Writes the allowed next tokens into `row` (int32 [words], C-contiguous)."""
        if row.dtype != np.int32 or row.shape != (self.words,) or not row.flags["C_CONTIGUOUS"]:
            raise ValueError(f"a bitmask row is int32 [{self.words}], C-contiguous")
        self._m.unsafe_compute_mask_ptr(row.ctypes.data, row.nbytes)

    def mask(self) -> np.ndarray:
        row = np.zeros((self.words,), np.int32)
        self.fill(row)
        return row

    def advance(self, token: int) -> bool:
        """Consumes a sampled token; False if the grammar rejects it (the matcher is then in error)."""
        return bool(self._m.consume_token(int(token)))

    @property
    def done(self) -> bool:
        """The grammar is complete and allows nothing more (only end of sequence)."""
        return bool(self._m.is_stopped())

    @property
    def accepting(self) -> bool:
        """The output so far is complete (it may still go on)."""
        return bool(self._m.is_accepting())

    @property
    def error(self) -> str | None:
        return self._m.get_error() if self._m.is_error() else None


def unpack(bitmask, vocab_size: int, xp=np):
    """bool [B, vocab_size] from int32 [B, words]; `xp` numpy (host) or jax.numpy (device)."""
    bits = (bitmask[:, :, None].astype(xp.uint32) >> xp.arange(32, dtype=xp.uint32)) & 1
    return bits.reshape(bitmask.shape[0], -1)[:, :vocab_size].astype(bool)


def apply_bitmask(logits, bitmask):
    """Logits [B, V] with the disallowed ids at -inf; `bitmask` int32 [B, ceil(V / 32)] (all ones: no constraint)."""
    import jax.numpy as jnp

    return jnp.where(unpack(bitmask, logits.shape[-1], jnp), logits, -jnp.inf)
