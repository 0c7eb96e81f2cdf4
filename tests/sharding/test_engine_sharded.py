"""The engine on tp=2, tp=2 x dp=2 and tp=4 meshes (8 simulated CPU devices) generates what it does on one device.

The engines run in a subprocess (`_engine_check.py`), since the device count must be set before jax starts.
"""

import json
import os
import subprocess
import sys

import pytest

CHECK = os.path.join(os.path.dirname(__file__), "_engine_check.py")
TIMEOUT_S = 300
MESHES = ["tp2dp1", "tp2dp2", "tp4dp1"]


@pytest.fixture(scope="module")
def report():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="--xla_force_host_platform_device_count=8")
    proc = subprocess.run([sys.executable, CHECK], env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


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


def test_no_compilation_after_warmup_at_tp2(report):
    before, after = report["tp2dp1"]["compiles"]
    assert after == before, f"{after - before} programs compiled after warm-up"
