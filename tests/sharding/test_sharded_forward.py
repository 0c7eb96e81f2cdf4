"""Sharded forward on 8 simulated CPU devices vs the single-device forward.

The device count must be set before jax starts, and the root conftest has already started it with one
device, so the checks run in a subprocess (`_check_equivalence.py`) that reports JSON; these tests assert on it.
"""

import os

import pytest
from _common import run_check

CHECK = os.path.join(os.path.dirname(__file__), "_check_equivalence.py")
CASES = ["tp8", "tp2_dp4", "tp4_kv2"]


@pytest.fixture(scope="module")
def report():
    return run_check(CHECK)


@pytest.mark.parametrize("case", CASES)
def test_logits_equal_single_device(report, case):
    """Prefill and two decode steps, mixed batch of rank-4/8/12/16 adapters and base rows, fp32."""
    r = report[case]
    assert len(r["rel_err"]) == 3
    assert max(r["rel_err"]) < 1e-5, r["rel_err"]


def test_cases_cover_the_required_meshes(report):
    got = {c: (report[c]["tp"], report[c]["dp"], report[c]["kv_heads"]) for c in CASES}
    assert got == {"tp8": (8, 1, 8), "tp2_dp4": (2, 4, 8), "tp4_kv2": (4, 1, 2)}
    assert report["tp2_dp4"]["logits_spec"] == "P('data',)"


@pytest.mark.parametrize("case", CASES)
def test_every_array_is_placed_as_specified(report, case):
    placement = report[case]["placement"]
    assert placement["mismatched"] == []
    assert placement["shard_contents_ok"], "a shard of w_qkv or LoRA B_k holds the wrong heads"


@pytest.mark.parametrize("case", CASES)
def test_lora_adds_no_collective(report, case):
    lora, base = report[case]["collectives"]["lora"], report[case]["collectives"]["base"]
    assert lora == base
    # One scanned layer: the all-reduces of o and down; outside it: the embedding's all-reduce and the
    # logits' all-gather.
    assert lora == {"total": 4, "while_loops": 1, "per_layer": 2}


def test_triton_kernels_on_local_shards(report):
    """The Pallas Triton LoRA kernels (interpret mode) inside shard_map see only local shards, as on GPUs."""
    r = report["tp2_dp4_triton"]
    assert r["backend"] == "interpret" and max(r["rel_err"]) < 1e-5, r["rel_err"]


def test_paged_cache_split_over_data_and_kv_heads(report):
    assert max(report["paged_tp2_dp2"]["rel_err"]) < 1e-5
