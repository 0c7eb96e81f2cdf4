"""Logits processors as transformers applies them, on the tiny models' own step logits (tests/fixtures/processors/).

Each case takes one row of a tiny model's `step_logits` (the real logits after prompt + greedy[:step]) with that
history: the prompt ids and greedy[:step] as the output so far. It applies, as transformers 5 generate() orders
them, `SequenceBiasLogitsProcessor` (one-token sequences: OpenAI's logit_bias), `RepetitionPenaltyLogitsProcessor`
(over input_ids = prompt + output) and `MinNewTokensLengthLogitsProcessor` (min_tokens over the stop ids), then
the presence and frequency penalties, then `TemperatureLogitsWarper` and `MinPLogitsWarper`.

transformers has no presence or frequency processor (none in transformers.generation.logits_process): those are
OpenAI's documented formula, written here in torch, after the repetition penalty as vLLM applies them:
  mu[j] -= c[j] * frequency_penalty + (c[j] > 0) * presence_penalty,  c[j] = times token j is in the output.
transformers' order (bias, repetition, min_new_tokens) and vLLM's (bias, min_tokens, repetition) agree: the -inf
min_tokens writes stays -inf under the repetition penalty, and the bias comes first in both.
"""

from __future__ import annotations

import os

import numpy as np
import torch

# (name, source case, step, penalties, temperature, min_p); the output is greedy[:step] of the source case.
CASES = [
    ("repetition_1.3", "llama_gqa/v_r8/p1", 4, {"repetition_penalty": 1.3}, 1.0, 0.1),
    ("repetition_0.7", "llama_tied/base/p2", 4, {"repetition_penalty": 0.7}, 0.7, 0.05),
    ("frequency_presence", "qwen2/base/p1", 7, {"frequency_penalty": 0.7, "presence_penalty": -0.4}, 1.5, 0.3),
    ("frequency_-2_presence_2", "mistral/base/p2", 7, {"frequency_penalty": -2.0, "presence_penalty": 2.0},
     1.0, 1.0),
    ("bias_then_repetition", "llama_tied/base/p2", 6,
     {"logit_bias": {0: 3.0, 16: -100.0, 52: -0.5, 235: 7.25, 255: 1.5}, "repetition_penalty": 1.2}, 0.5, 0.02),
    ("min_tokens_masking", "llama_gqa/base/p1", 3,
     {"min_tokens": 5, "stop_token_ids": [2, 17, 45, 200], "presence_penalty": 0.5}, 1.0, 0.2),
    ("min_tokens_reached", "llama_gqa/base/p1", 5,
     {"min_tokens": 5, "stop_token_ids": [2, 17, 45, 200], "presence_penalty": 0.5}, 2.0, 0.5),
    ("everything", "mistral/base/p2", 6,
     {"logit_bias": {7: 4.0, 41: 2.0, 49: -1.0}, "min_tokens": 8, "stop_token_ids": [2, 118],
      "repetition_penalty": 1.15, "frequency_penalty": 0.3, "presence_penalty": 0.2}, 1.0, 0.1),
    ("prompt_only", "qwen2/base/p2", 0, {"repetition_penalty": 1.5, "presence_penalty": 1.0}, 0.8, 0.15),
    ("adapter_row", "llama_gqa/all_r8_patterns/p2", 5,
     {"repetition_penalty": 0.9, "frequency_penalty": 0.5, "logit_bias": {2: 1.0}}, 1.2, 0.01),
    ("min_p_only", "llama_gqa/base/p0", 2, {}, 1.0, 0.1),
    ("min_p_only_cold", "qwen2/base/p0", 5, {}, 0.6, 0.25),
]
MIN_P_MARGIN = 1e-3  # |log p_v - log p_max - log min_p| must exceed this for every token but the top one


@torch.no_grad()
def transformers_processed(logits: np.ndarray, prompt: list[int], output: list[int], pen: dict) -> torch.Tensor:
    """The row after bias, repetition, min_new_tokens (transformers' processors) and presence/frequency."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinNewTokensLengthLogitsProcessor,
                                                        RepetitionPenaltyLogitsProcessor,
                                                        SequenceBiasLogitsProcessor)
    V = logits.shape[-1]
    chain = LogitsProcessorList()
    if pen.get("logit_bias"):
        chain.append(SequenceBiasLogitsProcessor([[[i], b] for i, b in sorted(pen["logit_bias"].items())]))
    if pen.get("repetition_penalty", 1.0) != 1.0:
        chain.append(RepetitionPenaltyLogitsProcessor(pen["repetition_penalty"]))
    if pen.get("min_tokens", 0) > 0:
        chain.append(MinNewTokensLengthLogitsProcessor(len(prompt), pen["min_tokens"], pen["stop_token_ids"]))
    input_ids = torch.tensor([prompt + output], dtype=torch.long)
    scores = chain(input_ids, torch.from_numpy(logits.copy())[None])
    counts = torch.bincount(torch.tensor(output, dtype=torch.long), minlength=V).to(scores.dtype)[None]
    return scores - pen.get("frequency_penalty", 0.0) * counts - pen.get("presence_penalty", 0.0) * (counts > 0)


@torch.no_grad()
def transformers_min_p(scores: torch.Tensor, temperature: float, min_p: float) -> torch.Tensor:
    """The row after `TemperatureLogitsWarper` and `MinPLogitsWarper` (dropped tokens are -inf)."""
    from transformers.generation.logits_process import (LogitsProcessorList, MinPLogitsWarper,
                                                        TemperatureLogitsWarper)
    chain = LogitsProcessorList([TemperatureLogitsWarper(temperature), MinPLogitsWarper(min_p)])
    return chain(torch.zeros((1, 0), dtype=torch.long), scores)


def min_p_margin(scores: np.ndarray, temperature: float, min_p: float) -> float:
    """The closest any token but the top one comes to min_p's cut, in log space (float64)."""
    s = scores.astype(np.float64) / temperature
    s = s[np.isfinite(s)]
    d = np.delete(s - s.max(), np.argmax(s)) - np.log(min_p)
    return float(np.abs(d).min())


def generate(out: str, manifest: dict, log) -> dict:
    """Writes processors/cases.json and processors/reference.npz from `manifest`'s cases and the logits files under
    `out`; returns the manifest entry."""
    from golden.fileio import reset_dir, save_json, save_npz

    by_id = {c["id"]: c for c in manifest["cases"]}
    rows = {"logits": [], "processed": [], "kept": [], "probs": []}
    cases = []
    for name, source, step, pen, temperature, min_p in CASES:
        case = by_id[source]
        steps = np.load(os.path.join(out, case["step_logits"]["file"]))[case["step_logits"]["key"]]
        logits = steps[step].astype(np.float32)
        prompt, output = case["prompt_ids"], case["greedy_tokens"][:step]
        processed = transformers_processed(logits, prompt, output, pen)
        margin = min_p_margin(processed[0].numpy(), temperature, min_p)
        if margin < MIN_P_MARGIN:
            raise RuntimeError(f"processors/{name}: a token lies {margin:.2e} from min_p's cut; pick another min_p")
        warped = transformers_min_p(processed, temperature, min_p)
        kept = torch.isfinite(warped)
        if pen and torch.equal(processed[0], torch.from_numpy(logits)):
            raise RuntimeError(f"processors/{name}: the penalties change nothing")
        rows["logits"].append(logits)
        rows["processed"].append(processed[0].numpy())
        rows["kept"].append(kept[0].numpy())
        rows["probs"].append(torch.softmax(warped, dim=-1)[0].numpy())
        cases.append({"name": name, "source": source, "step": step, "prompt_ids": prompt, "output_ids": output,
                      "penalties": {k: ({str(i): b for i, b in v.items()} if k == "logit_bias" else v)
                                    for k, v in pen.items()},
                      "temperature": temperature, "min_p": min_p, "min_p_margin": round(margin, 6),
                      "kept": int(kept.sum())})
        log(f"  processors/{name}: {source} step {step}, min_p keeps {int(kept.sum())} (margin {margin:.4f})")
    folder = os.path.join(out, "processors")
    reset_dir(folder)
    save_json(os.path.join(folder, "cases.json"), cases)
    save_npz(os.path.join(folder, "reference.npz"),
             {k: np.stack(v).astype(np.bool_ if k == "kept" else np.float32) for k, v in rows.items()})
    return {"dir": "processors", "files": sorted(os.listdir(folder)), "cases": len(cases),
            "reference": "transformers' SequenceBias, RepetitionPenalty, MinNewTokensLength, Temperature and MinP "
                         "processors; presence/frequency as OpenAI's formula in torch (transformers has none)"}
