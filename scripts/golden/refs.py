"""Reference computations: full-prompt logits and greedy continuations with per-step margins."""

from __future__ import annotations

import numpy as np
import torch


@torch.no_grad()
def prompt_logits(model, ids: list[int]) -> np.ndarray:
    """fp32 logits `[T, V]` for every prompt position: one forward, batch 1, no padding."""
    out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
    return out.logits[0].to(torch.float32).numpy().copy()


@torch.no_grad()
def greedy(model, ids: list[int], n: int) -> tuple[list[int], list[float], np.ndarray]:
    """Greedy continuation by full re-forwards (no KV cache, no EOS stop).

    Returns (tokens, per-step top1-top2 margins, step logits `[n, V]`): row i holds the logits of the
    last position after prompt + tokens[:i], i.e. the distribution tokens[i] was taken from.
    """
    seq = list(ids)
    tokens, margins, rows = [], [], []
    for _ in range(n):
        last = model(input_ids=torch.tensor([seq], dtype=torch.long), use_cache=False).logits[0, -1]
        last = last.to(torch.float32)
        top = torch.topk(last, 2)
        tok = int(top.indices[0])
        margins.append(float(top.values[0] - top.values[1]))
        rows.append(last.numpy().copy())
        tokens.append(tok)
        seq.append(tok)
    return tokens, margins, np.stack(rows)


@torch.no_grad()
def hf_generate(model, ids: list[int], n: int) -> list[int]:
    """`generate(do_sample=False)` with the KV cache and EOS stopping disabled, as a cross-check."""
    from transformers import GenerationConfig

    cfg = GenerationConfig(do_sample=False, max_new_tokens=n, min_new_tokens=0, eos_token_id=None,
                           pad_token_id=0, bos_token_id=None, use_cache=True)
    # generate() merges the model's own generation_config (eos_token_id=2) into `cfg`: clear it there too.
    inner = model.get_base_model() if hasattr(model, "get_base_model") else model
    saved = inner.generation_config.eos_token_id
    inner.generation_config.eos_token_id = None
    inp = torch.tensor([ids], dtype=torch.long)
    try:
        out = model.generate(input_ids=inp,
                             attention_mask=torch.ones_like(inp), generation_config=cfg)
    finally:
        inner.generation_config.eos_token_id = saved
    return [int(t) for t in out[0, len(ids):]]


def check_greedy(model, ids: list[int], tokens: list[int], what: str) -> None:
    got = hf_generate(model, ids, len(tokens))
    if got != tokens:
        raise RuntimeError(f"{what}: generate() gave {got}, the re-forward loop gave {tokens}")
