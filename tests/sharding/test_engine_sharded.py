"""The engine on tp=2, tp=2 x dp=2 and tp=4 meshes (8 simulated CPU devices) generates what it does on one device.

The engines run in a subprocess (`_engine_check.py`), since the device count must be set before jax starts.
"""

import os

import numpy as np
import pytest
from _common import run_check

CHECK = os.path.join(os.path.dirname(__file__), "_engine_check.py")
MESHES = ["tp2dp1", "tp2dp2", "tp4dp1", "tp2dp2_split"]


@pytest.fixture(scope="module")
def report():
    return run_check(CHECK)


def test_reference_run_exercises_adapters_and_slot_reuse(report):
    ref = report["tp1dp1"]
    assert ref["tokens"][0] != ref["tokens"][-1], "the rank-8 adapter did not change request 0's output"
    assert ref["slot_writes"] > 5, "no slot was evicted and rewritten"  # 5 adapters, 3 slots


@pytest.mark.parametrize("mesh", MESHES)
def test_greedy_tokens_equal_one_device(report, mesh):
    """fp32, staggered arrivals, base rows and rank-4/8/12/16 adapters, two registered after start-up."""
    assert report[mesh]["tokens"] == report["tp1dp1"]["tokens"]


@pytest.mark.parametrize("mesh", MESHES)
def test_slot_writes_keep_the_bank_placement(report, mesh):
    assert report[mesh]["misplaced"] == []
    assert report[mesh]["slot_writes"] == report["tp1dp1"]["slot_writes"]


@pytest.mark.parametrize("mesh", ["tp2dp2", "tp4dp1"])  # rows split over "data"; kv heads copied
def test_score_and_prompt_logprobs_equal_one_device(report, mesh):
    """`LLM.score` and echo's prompt logprobs on a mesh: the one-device values (fp32; the reductions run in
    another order), under the base and two adapters."""
    ref, got = report["tp1dp1"]["score"], report[mesh]["score"]
    for key in ("token_logprobs", "prompt_logprobs"):
        for r, g in zip(ref[key], got[key], strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5, err_msg=key)
    assert got["prompt_top"] == ref["prompt_top"]
    assert len({round(sum(lp), 3) for lp in ref["token_logprobs"]}) == 3  # three distinct scores


def test_fp8_weights_on_a_mesh_generate_what_they_do_on_one_device(report):
    """FP8 weights with their per-column scales, split with the columns (replicated for row-parallel weights):
    tp=2 x dp=2 generates the one-device FP8 tokens, every scale placed as its spec says."""
    one, mesh = report["fp8_tp1dp1"], report["fp8_tp2dp2"]
    assert mesh["tokens"] == one["tokens"]
    assert mesh["misplaced"] == []
    assert one["tokens"] != report["tp1dp1"]["tokens"], "FP8 rounding changed no token: the check is too weak"


def test_split_layers_case_ran_split(report):
    assert report["tp2dp2_split"]["split_layers"] and not report["tp2dp2"]["split_layers"]


def test_no_compilation_after_warmup_at_tp2(report):
    before, after = report["tp2dp1"]["compiles"]
    assert after == before, f"{after - before} programs compiled after warm-up"
