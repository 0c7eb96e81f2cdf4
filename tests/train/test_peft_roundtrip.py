"""jlora-trained adapters served by jlora give the logits Hugging Face transformers + PEFT give.

The HF logits are committed fixtures (scripts/make_train_roundtrip.sh, which runs
scripts/check_peft_roundtrip.py in .golden-venv), so this test needs no torch.
"""

import json
import os

import jax
import jax.numpy as jnp
import pytest
from helpers import rel_err
from safetensors.numpy import load_file

from jlora.checkpoint.hf import load_hf_dir
from jlora.config import LoraBankConfig
from jlora.lora.bank import init_bank, write_slot
from jlora.lora.peft import load_adapter
from jlora.model import KVCache, forward

FIXTURE = os.path.join(os.path.dirname(__file__), "..", "fixtures", "train_roundtrip")
ADAPTERS = sorted(os.listdir(os.path.join(FIXTURE, "adapters")))


@pytest.mark.parametrize("name", ADAPTERS)
def test_jlora_matches_hf_peft_on_trained_adapter(name):
    config, params = load_hf_dir(os.path.join(FIXTURE, "base"))
    bank_config = LoraBankConfig(buckets=(8,), slots=(2,))
    adapter = load_adapter(os.path.join(FIXTURE, "adapters", name), config, bank_config)
    bank = write_slot(init_bank(config, bank_config), 1, adapter.a, adapter.b)
    with open(os.path.join(FIXTURE, "input_ids.json")) as f:
        tokens = jnp.asarray(json.load(f), jnp.int32)
    B, T = tokens.shape
    positions = jnp.broadcast_to(jnp.arange(T, dtype=jnp.int32), (B, T))
    logits, _ = jax.jit(forward, static_argnames="config")(
        params, bank, tokens, positions, jnp.ones((B, T), jnp.int32), KVCache.zeros(config, B, T), config=config)
    want = load_file(os.path.join(FIXTURE, "hf_logits", f"{name}.safetensors"))["logits"]
    assert logits.shape == want.shape
    assert rel_err(logits, want) < 1e-4, rel_err(logits, want)
