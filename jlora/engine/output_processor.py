"""A step's sampled tokens into their requests: logprob entries, incremental text, grammar matchers, stop checks,
and the `RequestOutput`s handed back. Pure Python: it reads a step's host arrays (`model_runner.StepOutput`).

The engine calls `advance` for each row of a step; a request that stops is finished by the engine (which frees its
pages and references) and its last output built here (`finish`).
"""

from __future__ import annotations

from jlora.engine.grammars import Grammars
from jlora.engine.logprobs import entry
from jlora.engine.outputs import RequestOutput, held_back
from jlora.engine.sequence import Sequence
from jlora.tokenizer import IncrementalDetokenizer


class OutputProcessor:
    """Per request: its text so far (cut at a stop string), how much of it was given out, and its logprob entries.

    Args:
      tokenizer: a `jlora.tokenizer.Tokenizer`, or None (token ids only: no text, no stop strings).
      grammars: the structured requests' matchers, advanced by every token they sample.
    """

    def __init__(self, tokenizer, grammars: Grammars):
        self.tokenizer, self.grammars = tokenizer, grammars
        self._detok: dict[str, IncrementalDetokenizer] = {}
        self._text: dict[str, str] = {}
        self._sent: dict[str, int] = {}  # characters of the text given out in outputs
        self._logprobs: dict[str, list] = {}
        self.tokens_generated = 0

    def add(self, seq: Sequence) -> None:
        rid = seq.request_id
        self._text[rid], self._sent[rid], self._logprobs[rid] = "", 0, []
        if self.tokenizer is not None:
            self._detok[rid] = IncrementalDetokenizer(self.tokenizer, seq.prompt_ids)

    def remove(self, request_id: str) -> None:
        """Forgets a request (nothing is kept once it finished); a no-op for an unknown one."""
        for table in (self._detok, self._text, self._sent, self._logprobs):
            table.pop(request_id, None)

    def stop_ids(self, sp) -> set[int]:
        """The tokens that end a request: its stop_token_ids, and the tokenizer's EOS ids unless ignore_eos."""
        stop_ids = set(sp.stop_token_ids)
        if not sp.ignore_eos and self.tokenizer is not None:
            stop_ids |= set(self.tokenizer.stop_ids)
        return stop_ids

    def advance(self, seq: Sequence, chunk: int, out, i: int, now: float) -> tuple[str | None, int] | None:
        """Takes row i of a step's outputs into `seq`. None for a prompt chunk short of the end (nothing was
        sampled); else (the finish reason, or None while it runs; `before`, the characters of its text given out
        before this step)."""
        seq.num_computed += chunk
        if seq.num_computed < seq.num_tokens:
            return None
        before = self._sent[seq.request_id]
        for k in range(int(out.num_steps[i])):  # a multi-step decode's tokens, up to the first stop
            if k:
                seq.num_computed += 1  # the step that sampled token k cached token k - 1
            token = int(out.tokens[i, k])
            seq.output_ids.append(token)
            self.tokens_generated += 1
            seq.first_token_time = seq.first_token_time or now
            if seq.want_logprobs:
                self._logprobs[seq.request_id].append(entry(token, out.logprobs[i, k], out.top_ids[i, k],
                                                            out.top_logprobs[i, k], seq.num_top))
            reason = self.after_token(seq)
            if reason is not None:
                return reason, before
        return None, before

    def after_token(self, seq: Sequence) -> str | None:
        """Stop checks after a new token: "stop", "length", or None while the request runs. A structured request
        stops once its grammar is complete; a token outside it raises `grammars.GrammarError`."""
        sp, rid, token = seq.sampling, seq.request_id, seq.output_ids[-1]
        stopping = len(seq.output_ids) > sp.min_tokens  # before min_tokens nothing stops it (as in vLLM)
        if stopping and token in self.stop_ids(sp):
            self._drop_last(seq)  # like the text, token_ids (and logprobs) end before the stop token
            return "stop"
        complete = rid in self.grammars and self.grammars.advance(seq, token)
        if complete and token in self.tokenizer.stop_ids:  # ignore_eos: the grammar's end, not part of the output
            self._drop_last(seq)
            return "stop"
        if rid in self._detok:
            old = len(self._text[rid])
            self._text[rid] += self._detok[rid].step([token])
            if sp.stop and stopping:  # a stop string can only end in the new text: search from its reach
                text = self._text[rid]
                start = max(0, old - max(map(len, sp.stop)) + 1)
                hits = [i for i in (text.find(s, start) for s in sp.stop) if i >= 0]
                if hits:
                    self._text[rid] = text[:min(hits)]
                    return "stop"
        if complete:
            return "stop"
        if len(seq.output_ids) >= sp.max_tokens:
            return "length"
        return None

    def _drop_last(self, seq: Sequence) -> None:
        seq.output_ids.pop()
        if seq.want_logprobs:
            self._logprobs[seq.request_id].pop()

    def output(self, seq: Sequence, before: int | None = None, error: str | None = None,
               error_kind: str | None = None) -> RequestOutput:
        """The request's output, with the delta since character `before` of its text (None: since what was last
        given out). While it runs, text that could still become the start of a stop string is held back, so that
        what streams is always a prefix of the final text."""
        rid, text = seq.request_id, self._text[seq.request_id]
        if not seq.is_finished:
            text = text[:len(text) - held_back(text, seq.sampling.stop)]
        before = min(self._sent[rid] if before is None else before, len(text))
        self._sent[rid] = len(text)
        lps = list(self._logprobs[rid]) if seq.want_logprobs else None
        return RequestOutput(rid, seq.adapter_name, seq.prompt_ids, list(seq.output_ids), text, text[before:],
                             seq.is_finished, seq.finish_reason, error, error_kind, lps, seq.arrival_time,
                             seq.first_token_time, seq.finish_time, prompt_logprobs=seq.prompt_logprobs,
                             cumulative_logprob=None if lps is None else sum(e["logprob"] for e in lps))

    def finish(self, seq: Sequence, before: int | None = None, error: str | None = None,
               error_kind: str | None = None) -> RequestOutput:
        """The last output of a finished request (`output`); the request is forgotten."""
        out = self.output(seq, before, error, error_kind)
        self.remove(seq.request_id)
        return out
