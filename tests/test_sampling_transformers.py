"""jlora's device logit processors and min_p against transformers' logits processors (tests/fixtures/processors/,
written by `scripts/make_golden.py --processors` in the golden environment; no torch here).

The inputs are the tiny golden models' real step logits with their history (prompt + greedy[:step]). Where the
definitions agree the values must match in float32:
  logit_bias = SequenceBiasLogitsProcessor of one-token sequences;
  min_tokens = MinNewTokensLengthLogitsProcessor over the stop ids (EOS and stop_token_ids);
  repetition_penalty = RepetitionPenaltyLogitsProcessor over input_ids = prompt + output (vLLM's tokens too; the
    one rule, `l / p if l > 0 else l * p`, differs only at l = 0, where both leave 0);
  temperature + min_p = TemperatureLogitsWarper + MinPLogitsWarper (the kept set, and its renormalized probs).
Where they differ, and so what is not compared:
  presence/frequency_penalty: transformers has no processor; the fixture holds OpenAI's formula computed in torch
    (counts over the output only, after the repetition penalty, as vLLM applies them);
  min_p's cut: transformers compares probabilities (p < min_p * p_max), jlora log-probabilities
    (s - s_max >= log min_p): they agree except within rounding of the cut, so every fixture token lies at least
    1e-3 (in log space) from it;
  order: transformers' generate() runs min_p after top_k and top_p, vLLM (and jlora) before, so top_p's renormalized
    mass differs; top_k and top_p are not part of these cases.
"""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jlora import sampling_penalties as pen
from jlora.engine.penalty_slots import host_row
from jlora.sampling import SamplingParams, candidates

FOLDER = os.path.join(os.path.dirname(__file__), "fixtures", "processors")
NB = 8  # logit_bias entries per slot


@pytest.fixture(scope="module")
def fixture():
    with open(os.path.join(FOLDER, "cases.json")) as f:
        cases = json.load(f)
    with np.load(os.path.join(FOLDER, "reference.npz")) as z:
        arrays = {k: z[k] for k in z.files}
    return cases, arrays


def _sampling(case) -> SamplingParams:
    p = dict(case["penalties"])
    bias = {int(i): b for i, b in p.pop("logit_bias", {}).items()}
    stops = p.pop("stop_token_ids", ())
    min_tokens = p.get("min_tokens", 0)
    # ignore_eos: the stop ids are exactly the fixture's list (EOS 2 is in each one that masks)
    return SamplingParams(**p, logit_bias=bias, stop_token_ids=stops, ignore_eos=True,
                          temperature=case["temperature"], min_p=case["min_p"], max_tokens=max(16, min_tokens))


@pytest.fixture(scope="module")
def jlora_rows(fixture):
    """(processed logits [N, V], min_p weights [N, V]) from jlora's device functions, all cases in one batch, each
    row on its own penalty slot as the engine writes it."""
    cases, arrays = fixture
    N, V = arrays["logits"].shape
    sps = [_sampling(c) for c in cases]
    state = pen.PenaltyState.zeros(N, V, NB)
    written = [host_row(sp, c["prompt_ids"], c["output_ids"], sp.stop_token_ids, V, NB) for sp, c in zip(sps, cases)]
    state = pen.write_slots(state, np.arange(N, dtype=np.int32), *(np.stack(col) for col in zip(*written)))
    params = {"presence": jnp.asarray([sp.presence_penalty for sp in sps], jnp.float32),
              "frequency": jnp.asarray([sp.frequency_penalty for sp in sps], jnp.float32),
              "repetition": jnp.asarray([sp.repetition_penalty for sp in sps], jnp.float32),
              "min_tokens": jnp.asarray([sp.min_tokens for sp in sps], jnp.int32)}
    num_output = jnp.asarray([len(c["output_ids"]) for c in cases], jnp.int32)
    rows = pen.gather(state, jnp.arange(N, dtype=jnp.int32))
    processed = jax.jit(pen.apply)(jnp.asarray(arrays["logits"]), rows, params, num_output)
    temperature = jnp.asarray([sp.temperature for sp in sps], jnp.float32)
    min_p = jnp.asarray([sp.min_p for sp in sps], jnp.float32)
    _, _, _, full = jax.jit(candidates)(processed, temperature, jnp.zeros((N,), jnp.int32),
                                        jnp.ones((N,), jnp.float32), min_p)
    return np.asarray(processed), np.asarray(full)


def test_fixture_cases_exercise_each_processor(fixture):
    cases, arrays = fixture
    used = {k for c in cases for k in c["penalties"]}
    assert used >= {"logit_bias", "repetition_penalty", "min_tokens", "presence_penalty", "frequency_penalty"}
    for i, c in enumerate(cases):
        changed = not np.array_equal(arrays["processed"][i], arrays["logits"][i])
        assert changed == bool(c["penalties"]), c["name"]
        assert arrays["kept"][i].sum() == c["kept"] and c["min_p_margin"] >= 1e-3
    assert sum(c["kept"] == 1 for c in cases) == 1 and all(c["kept"] < 256 for c in cases)


def test_penalties_bias_and_min_tokens_equal_transformers(fixture, jlora_rows):
    cases, arrays = fixture
    processed, _ = jlora_rows
    for i, c in enumerate(cases):
        want = arrays["processed"][i]
        assert np.array_equal(np.isneginf(processed[i]), np.isneginf(want)), c["name"]
        np.testing.assert_allclose(processed[i], want, rtol=1e-5, atol=1e-6, err_msg=c["name"])
    masking = next(i for i, c in enumerate(cases) if c["name"] == "min_tokens_masking")
    assert np.isneginf(processed[masking, [2, 17, 45, 200]]).all()
    reached = next(i for i, c in enumerate(cases) if c["name"] == "min_tokens_reached")
    assert np.isfinite(processed[reached]).all()


def test_min_p_keeps_what_transformers_keeps_with_its_probabilities(fixture, jlora_rows):
    cases, arrays = fixture
    _, full = jlora_rows
    for i, c in enumerate(cases):
        kept = full[i] > 0
        assert np.array_equal(kept, arrays["kept"][i]), c["name"]
        np.testing.assert_allclose(full[i] / full[i].sum(), arrays["probs"][i], rtol=1e-5, atol=1e-7,
                                   err_msg=c["name"])
