"""Training data: JSONL of `prompt`/`completion` pairs or chat `messages`, tokenized with a loss mask.

The mask marks the tokens the model learns to produce: the completion (plus EOS), or every assistant
turn of a conversation (its text and end-of-turn tokens). Prompts, system and user turns are context only.
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np

from jlora.tokenizer import Tokenizer


class DataError(ValueError):
    """A training file or record that cannot be used; the message names the line."""


@dataclasses.dataclass(frozen=True)
class Example:
    """One tokenized record. ids: [n] int32; mask: [n] bool, True where the token is a training target."""

    ids: np.ndarray
    mask: np.ndarray


def read_jsonl(path: str) -> list[dict]:
    records = []
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}:{n}: not valid JSON: {e}") from None
            if not isinstance(rec, dict):
                raise DataError(f"{path}:{n}: each line must be a JSON object")
            records.append(rec)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def chat_segments(messages: list[dict], tokenizer: Tokenizer) -> list[tuple[str, bool]]:
    """The rendered conversation cut into (text, is_target) pieces; assistant turns are the targets.

    Each assistant turn starts where the chat template's generation prompt ends, so the context the
    model trains on is exactly the prompt it sees when served with `apply_chat_template`.
    """
    if not any(m.get("role") == "assistant" for m in messages):
        raise DataError("a conversation needs at least one assistant message")
    segments, done = [], ""
    for i, message in enumerate(messages):
        if message.get("role") != "assistant":
            continue
        head = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[:i + 1], add_generation_prompt=False)
        if not (head.startswith(done) and full.startswith(head)):
            raise DataError("the chat template does not render conversations prefix by prefix, so assistant "
                            "turns cannot be located")
        segments += [(head[len(done):], False), (full[len(head):], True)]
        done = full
    rest = tokenizer.apply_chat_template(messages, add_generation_prompt=False)[len(done):]
    if rest:
        segments.append((rest, False))
    return [(text, target) for text, target in segments if text]


def mask_from_segments(lengths: list[int], targets: list[bool]) -> np.ndarray:
    """[sum(lengths)] bool: True over the tokens of target segments."""
    return np.concatenate([np.full(n, t, bool) for n, t in zip(lengths, targets)] or [np.zeros(0, bool)])


def tokenize_record(record: dict, tokenizer: Tokenizer) -> Example:
    """Tokenizes a `{"prompt", "completion"}` or `{"messages"}` record, piece by piece."""
    if "messages" in record:
        messages = record["messages"]
        if not isinstance(messages, list) or not all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                     for m in messages):
            raise DataError("'messages' must be a list of {role, content} objects")
        segments = chat_segments(messages, tokenizer)
        eos = []
    elif isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        segments = [(record["prompt"], False), (record["completion"], True)]
        eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    else:
        raise DataError("a record needs 'messages', or string 'prompt' and 'completion'")
    pieces = [tokenizer.encode(text, add_special_tokens=i == 0) for i, (text, _) in enumerate(segments)]
    pieces.append(eos)  # a plain completion ends with EOS, so the model learns to stop
    flags = [t for _, t in segments] + [True]
    ids = np.asarray([i for p in pieces for i in p], np.int32)
    return Example(ids=ids, mask=mask_from_segments([len(p) for p in pieces], flags))


@dataclasses.dataclass(frozen=True)
class Dataset:
    """Padded examples. tokens: [N, seq_len] int32; mask: [N, seq_len] bool; lengths: [N] real tokens."""

    tokens: np.ndarray
    mask: np.ndarray
    lengths: np.ndarray
    truncated: int  # how many records were cut to seq_len
    dropped: int  # how many records had no target token left within seq_len

    def __len__(self) -> int:
        return len(self.tokens)


def build_dataset(records: list[dict], tokenizer: Tokenizer, seq_len: int, pad_id: int = 0,
                  source: str = "data") -> Dataset:
    """Tokenizes, truncates to `seq_len` (keeping the start) and right-pads every record."""
    rows, truncated, dropped = [], 0, 0
    for n, rec in enumerate(records, 1):
        try:
            ex = tokenize_record(rec, tokenizer)
        except DataError as e:
            raise DataError(f"{source} record {n}: {e}") from None
        truncated += len(ex.ids) > seq_len
        ids, mask = ex.ids[:seq_len], ex.mask[:seq_len]
        if not mask[1:].any():  # token 0 is never predicted
            dropped += 1
            continue
        rows.append((ids, mask))
    if not rows:
        raise DataError(f"{source}: no record has a completion token within seq_len={seq_len}")
    tokens = np.full((len(rows), seq_len), pad_id, np.int32)
    mask = np.zeros((len(rows), seq_len), bool)
    lengths = np.zeros(len(rows), np.int32)
    for i, (ids, m) in enumerate(rows):
        tokens[i, :len(ids)], mask[i, :len(m)], lengths[i] = ids, m, len(ids)
    return Dataset(tokens=tokens, mask=mask, lengths=lengths, truncated=truncated, dropped=dropped)


def batch_indices(num_examples: int, batch_size: int, step: int, seed: int) -> np.ndarray:
    """The example indices of one step's batch: epochs of fresh permutations, read in order.

    Stateless in `step`, so a resumed run sees exactly the batches the uninterrupted run would.
    """
    epochs, within = np.divmod(np.arange(step * batch_size, (step + 1) * batch_size), num_examples)
    perms = {e: np.random.default_rng((seed, int(e))).permutation(num_examples) for e in np.unique(epochs)}
    return np.asarray([perms[e][i] for e, i in zip(epochs, within)], np.int64)
