"""Structured output in the engine: one grammar matcher per structured request (`jlora.structured`), the bitmask
rows of a step, and each sampled token fed back to its matcher. Pure host code (NumPy and llguidance).

The grammar compiler (the tokenizer's token trie, about 0.4 s for a 49k vocabulary) is built at the first
structured request. A request's matcher is made when the engine takes it, so a bad grammar fails that request alone
(`RequestError`). Before a step, `bitmask` fills one row per sequence of the batch (all ones for those without a
grammar or that sample nothing; the structured rows in parallel on llguidance's threads); after it, `advance` feeds
each sampled token to its matcher.
"""

from __future__ import annotations

import numpy as np

from jlora.engine.sequence import Sequence
from jlora.errors import JloraError, RequestError
from jlora.structured import GrammarCompiler, StructuredOutput, bitmask_words


class GrammarError(JloraError):
    """A structured request's output left its grammar (a rejected token, or a point where no token fits)."""


class Grammars:
    """Args: tokenizer (a `jlora.tokenizer.Tokenizer`, or None: structured requests are refused), vocab_size (the
    logits' width)."""

    def __init__(self, tokenizer, vocab_size: int):
        self.tokenizer, self.vocab_size = tokenizer, vocab_size
        self.words = bitmask_words(vocab_size)
        self._compiler: GrammarCompiler | None = None
        self._matchers: dict = {}  # request id -> `structured.Matcher`
        self._stuck: set[str] = set()  # requests whose last mask allowed no token

    def compiler(self) -> GrammarCompiler:
        if self._compiler is None:
            if self.tokenizer is None:
                raise RequestError("structured output needs the model's tokenizer; this engine has none")
            try:
                self._compiler = GrammarCompiler(self.tokenizer, self.vocab_size, self.tokenizer.stop_ids)
            except (ValueError, ImportError) as e:
                raise RequestError(f"structured output is not available for this tokenizer: {e}") from None
        return self._compiler

    def add(self, request_id: str, spec: StructuredOutput) -> None:
        """Compiles a request's grammar into its matcher; raises `RequestError` naming what is wrong."""
        self._matchers[request_id] = self.compiler().matcher(spec)

    def remove(self, request_id: str) -> None:
        self._matchers.pop(request_id, None)
        self._stuck.discard(request_id)

    def _sampling_rows(self, seqs: list[Sequence], chunks: list[int]) -> list[int]:
        """The sequences of a step that sample a token under a grammar: structured, their chunk reaching the end."""
        return [i for i, (s, c) in enumerate(zip(seqs, chunks))
                if s.request_id in self._matchers and s.num_computed + c == s.num_tokens]

    def constrains(self, seqs: list[Sequence], chunks: list[int]) -> bool:
        """Whether a step of these sequences samples a token under a grammar (`bitmask` then returns rows)."""
        return bool(self._matchers) and bool(self._sampling_rows(seqs, chunks))

    def bitmask(self, seqs: list[Sequence], chunks: list[int]) -> np.ndarray | None:
        """int32 [len(seqs), words] rows of a step (1 = allowed), or None when no sequence samples under a grammar.
        A row is all ones unless its sequence is structured and its chunk reaches its end (it samples)."""
        if not self._matchers:
            return None
        rows = self._sampling_rows(seqs, chunks)
        if not rows:
            return None
        out = np.full((len(seqs), self.words), -1, np.int32)
        self.compiler().fill(out, [(i, self._matchers[seqs[i].request_id]) for i in rows])
        for i in rows:
            if not out[i].any():  # nothing fits: sample anything, and fail the request when its token comes back
                self._stuck.add(seqs[i].request_id)
                out[i] = -1
        return out

    def advance(self, seq: Sequence, token: int) -> bool:
        """Feeds a sampled token to the request's matcher; True once its grammar is complete (nothing may follow).
        Raises `GrammarError` if the token leaves the grammar."""
        rid = seq.request_id
        matcher = self._matchers[rid]
        if rid in self._stuck:
            raise GrammarError(f"structured output: after {len(seq.output_ids) - 1} tokens the grammar allows no "
                               "token of this vocabulary")
        if not matcher.advance(token):
            raise GrammarError(f"structured output: the grammar rejected token {token}: {matcher.error}")
        return matcher.done

    def __contains__(self, request_id: str) -> bool:
        return request_id in self._matchers
