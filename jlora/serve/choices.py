"""OpenAI response choices: completion and chat bodies and streamed chunks, with logprobs and echo, for n choices
of each of several prompts (choice i * n + j is prompt i's j-th), and starting their sequences (`start_choices`).

What a request asks to see (`Wants`, from its body) decides the `SamplingParams` logprob counts and how each
choice shows them: the completions API's legacy object ({tokens, token_logprobs, top_logprobs, text_offset}, the
echoed prompt first, its first token with null), or chat's {content: [{token, logprob, bytes, top_logprobs}]}.
Logprobs are the engine's: float32 log-softmax of the raw logits (`jlora.engine.logprobs`). A token's text is its
lone decoding (`token_text`). Legacy top_logprobs hold the k most likely and the chosen token
(as vLLM's), so up to k + 1 entries.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time

from jlora.engine.outputs import RequestOutput
from jlora.errors import RequestError
from jlora.sampling import MAX_LOGPROBS
from jlora.serve.protocol import Completion, show

MAX_SEQUENCES = 256  # prompts x best_of (or n) of one request


@dataclasses.dataclass(frozen=True)
class Wants:
    """What a body asks to see: `logprobs` top entries per token (None: no logprobs), `echo` the prompt."""

    chat: bool
    logprobs: int | None = None
    echo: bool = False

    @property
    def prompt_logprobs(self) -> int | None:
        return self.logprobs if self.echo else None


def _count(body: dict, key: str):
    value = body.get(key)
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or
                              not 0 <= value <= MAX_LOGPROBS):
        raise RequestError(f"{key} must be an integer in [0, {MAX_LOGPROBS}] or null, got {show(value)}")
    return value


def wants(body: dict, chat: bool) -> Wants:
    """Checks the logprobs and echo fields of a completions (chat=False) or chat body."""
    echo = body.get("echo", False)
    if chat:
        if echo not in (None, False):
            raise RequestError(f"echo={show(echo)} is not supported for chat completions (only for completions)")
        on = body.get("logprobs", False)
        if on is not None and not isinstance(on, bool):
            raise RequestError(f"logprobs must be true or false for chat completions, got {show(on)}")
        top = _count(body, "top_logprobs")
        if top is not None and not on:
            raise RequestError("top_logprobs needs logprobs: true")
        return Wants(True, (top or 0) if on else None)
    if not isinstance(echo, bool) and echo is not None:
        raise RequestError(f"echo must be true or false, got {show(echo)}")
    if body.get("top_logprobs") is not None:
        raise RequestError("top_logprobs is a chat completions field; completions take logprobs: <count>")
    return Wants(False, _count(body, "logprobs"), bool(echo))


def token_text(tokenizer, token: int) -> str:
    """A token's lone decoding; "token_id:N" without a tokenizer, or for an id past the tokenizer's vocabulary
    (the model's may be padded)."""
    if tokenizer is None or token >= tokenizer.vocab_size:
        return f"token_id:{token}"
    return tokenizer.decode([token])


def legacy_logprobs(ids, entries, tokenizer, offset: int) -> dict:
    """The completions API's logprobs of tokens `ids` (entries aligned with them, None for none), text offsets
    counted from `offset`."""
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    for token, e in zip(ids, entries):
        text = token_text(tokenizer, token)
        out["tokens"].append(text)
        out["text_offset"].append(offset)
        offset += len(text)
        out["token_logprobs"].append(None if e is None else e["logprob"])
        if e is None:
            out["top_logprobs"].append(None)
            continue
        top = {token_text(tokenizer, i): lp for i, lp in e["top"].items()}
        top.setdefault(text, e["logprob"])
        out["top_logprobs"].append(top)
    return out


def chat_logprobs(entries, tokenizer) -> dict:
    def item(token, lp):
        text = token_text(tokenizer, token)
        return {"token": text, "logprob": lp, "bytes": list(text.encode("utf-8", "replace"))}

    return {"content": [{**item(e["token"], e["logprob"]),
                         "top_logprobs": [item(i, lp) for i, lp in e["top"].items()]} for e in entries]}


def usage(prompt_tokens: int, outs: list[RequestOutput]) -> dict:
    """`prompt_tokens` (each prompt once, whatever n) and the tokens of the choices returned (not echoed)."""
    c = sum(len(o.token_ids) for o in outs)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": c, "total_tokens": prompt_tokens + c}


class PromptGroup:
    """What the choices of one prompt share: the echoed text, and its logprobs (only the first choice asks the
    engine for them; the others show the same)."""

    def __init__(self, echo_text: str | None = None):
        self.echo_text, self.prompt_logprobs = echo_text, None


class ChoiceView:
    """One choice of a response: its index, its prompt's group, and what of it was streamed so far."""

    def __init__(self, index: int, want: Wants, tokenizer, group: PromptGroup | None = None):
        self.index, self.want, self.tokenizer = index, want, tokenizer
        self.group = group or PromptGroup()
        self.echo_text = self.group.echo_text if want.echo else None
        self.sent_entries = 0  # output logprobs entries streamed
        self.offset = 0  # text characters streamed (legacy text_offset)
        self.started = False

    def _prompt_part(self, out: RequestOutput) -> tuple[str, dict | None]:
        """The echoed prompt text and, when logprobs are asked, its logprobs (the first token's null)."""
        text = self.echo_text or ""
        lps = None
        if self.want.logprobs is not None:
            entries = out.prompt_logprobs or self.group.prompt_logprobs or [None] * len(out.prompt_token_ids)
            lps = legacy_logprobs(out.prompt_token_ids, entries, self.tokenizer, 0)
        return text, lps

    def _logprobs(self, out: RequestOutput, start: int, offset: int):
        entries = (out.logprobs or [])[start:]
        if self.want.chat:
            return chat_logprobs(entries, self.tokenizer)
        return legacy_logprobs([e["token"] for e in entries], entries, self.tokenizer, offset)

    def final(self, out: RequestOutput) -> dict:
        """The choice of a non-streamed body."""
        finish = out.finish_reason
        if self.want.chat:
            lp = None if self.want.logprobs is None else self._logprobs(out, 0, 0)
            return {"index": self.index, "message": {"role": "assistant", "content": out.text}, "logprobs": lp,
                    "finish_reason": finish}
        text, lp = out.text, None
        if self.echo_text is not None:
            prompt_text, prompt_lp = self._prompt_part(out)
            text = prompt_text + text
            if prompt_lp is not None:
                rest = self._logprobs(out, 0, len(prompt_text))
                lp = {k: prompt_lp[k] + rest[k] for k in prompt_lp}
        elif self.want.logprobs is not None:
            lp = self._logprobs(out, 0, 0)
        return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": finish}

    def chunk_choice(self, out: RequestOutput) -> dict:
        """The choice of a streamed chunk: the text and logprobs new since the last one."""
        finish = out.finish_reason if out.finished else None
        new = out.logprobs[self.sent_entries:] if out.logprobs else []
        lp = None
        if self.want.logprobs is not None:
            lp = self._logprobs(out, self.sent_entries, self.offset)
        self.sent_entries += len(new)
        if self.want.chat:
            delta = {"role": "assistant", "content": out.delta} if not self.started else {"content": out.delta}
            self.started = True
            return {"index": self.index, "delta": delta, "logprobs": lp, "finish_reason": finish}
        text = out.delta
        if not self.started and self.echo_text is not None:
            prompt_text, prompt_lp = self._prompt_part(out)
            text = prompt_text + text
            if prompt_lp is not None:
                lp = {k: prompt_lp[k] + [x + len(prompt_text) if k == "text_offset" else x for x in lp[k]]
                      for k in prompt_lp}
        self.started = True
        self.offset += sum(map(len, lp["tokens"])) if lp else 0
        return {"index": self.index, "text": text, "logprobs": lp, "finish_reason": finish}


def note(out: RequestOutput, group: PromptGroup) -> None:
    """Keeps the prompt logprobs of a prompt's first choice for the others of its group."""
    if out.prompt_logprobs and group.prompt_logprobs is None:
        group.prompt_logprobs = out.prompt_logprobs


def body(outs: list[RequestOutput], views: list[ChoiceView], model: str, chat: bool, prompt_tokens: int) -> dict:
    """A non-streamed response of choices outs[i] shown by views[i]."""
    kind = ("chatcmpl", "chat.completion") if chat else ("cmpl", "text_completion")
    return {"id": f"{kind[0]}-{outs[0].request_id}", "object": kind[1], "created": int(time.time()), "model": model,
            "choices": [v.final(o) for o, v in zip(outs, views)], "usage": usage(prompt_tokens, outs)}


def best(outs: list[RequestOutput], n: int, group: PromptGroup) -> list[RequestOutput]:
    """The n of one prompt's outputs of highest cumulative logprob (best_of), best first; all of them when there
    are n. The group keeps the prompt logprobs, whichever choices are picked."""
    for out in outs:
        note(out, group)
    return outs if len(outs) <= n else sorted(outs, key=lambda o: -(o.cumulative_logprob or 0.0))[:n]


def chunk(out: RequestOutput, view: ChoiceView, rid: str, model: str, created: int) -> dict:
    note(out, view.group)
    chat = view.want.chat
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": created, "model": model,
            "choices": [view.chunk_choice(out)]}


def usage_chunk(outs: list[RequestOutput], rid: str, model: str, created: int, chat: bool,
                prompt_tokens: int) -> dict:
    return {"id": f"{'chatcmpl' if chat else 'cmpl'}-{rid}",
            "object": "chat.completion.chunk" if chat else "text_completion", "created": created,
            "model": model, "choices": [], "usage": usage(prompt_tokens, outs)}


def check_choices(completions: list[Completion], stream: bool) -> None:
    """Refuses what no response can hold: too many sequences, or a stream that best_of would have to cut."""
    sp = completions[0].sampling
    count = len(completions) * (sp.best_of or sp.n)
    if count > MAX_SEQUENCES:
        raise RequestError(f"{len(completions)} prompts x {sp.best_of or sp.n} sequences each is {count}; at "
                           f"most {MAX_SEQUENCES} per request")
    if stream and (sp.best_of or sp.n) > sp.n:
        raise RequestError(f"best_of={sp.best_of} > n={sp.n} cannot be streamed: the best are known at the end")


async def start_choices(service, completions: list[Completion], deadline: float | None = None) -> list[list]:
    """Per prompt, the streams of its sequences (`SamplingParams.choices`), the others following the first (so the
    prompt is prefilled once), which alone asks for prompt logprobs. If one cannot start, those started are
    aborted and the error raised."""
    groups: list[list] = []
    try:
        for c in completions:
            group = []
            groups.append(group)
            for j, sp in enumerate(c.sampling.choices()):
                sp = sp if j == 0 else dataclasses.replace(sp, prompt_logprobs=None)
                group.append(await service.start(dataclasses.replace(c, sampling=sp), deadline=deadline,
                                                 follows=group[0].request_id if group else None))
    except BaseException:
        for stream in (s for g in groups for s in g):
            stream.abort()
        raise
    return groups


async def merged(streams):
    """(k, output) of every output of streams[k], in the order they arrive, until all have finished."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump(k, stream):
        try:
            async for out in stream:
                await queue.put((k, out))
        finally:
            await queue.put((k, None))

    tasks = [asyncio.ensure_future(pump(k, s)) for k, s in enumerate(streams)]
    try:
        left = len(streams)
        while left:
            k, out = await queue.get()
            if out is None:
                left -= 1
            else:
                yield k, out
    finally:
        for t in tasks:
            t.cancel()
        for s in streams:
            s.abort()
