"""A bank that serves only some projections (LoraBankConfig.modules): same logits, less memory, clear refusals."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, rel_err, write_adapter

from jlora.config import LoraBankConfig
from jlora.engine.memory import slot_bytes
from jlora.errors import AdapterError
from jlora.lora import bank as bank_lib
from jlora.lora.peft import load_adapter
from jlora.model import KVCache, forward, init_params

ATTN = ("q_proj", "k_proj", "v_proj", "o_proj")


def _logits(bank_config, path):
    params = init_params(TINY, jax.random.key(0), jnp.float32)
    adapter = load_adapter(path, TINY, bank_config)
    bank = bank_lib.write_slot(bank_lib.init_bank(TINY, bank_config), 1, adapter.a, adapter.b)
    rng = np.random.default_rng(3)
    tokens = jnp.asarray(rng.integers(0, TINY.vocab_size, (3, 9)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(9, dtype=jnp.int32), (3, 9))
    lora_ids = jnp.asarray([[1] * 9, [-1] * 9, [1] * 9], jnp.int32)
    logits, _ = forward(params, bank, tokens, positions, lora_ids, KVCache.zeros(TINY, 3, 9), config=TINY)
    return logits, bank


def test_attention_only_bank_matches_full_bank(tmp_path):
    path = write_adapter(str(tmp_path / "attn"), r=8, targets=ATTN, seed=4)
    full, _ = _logits(LoraBankConfig(buckets=(8,), slots=(2,)), path)
    small, bank = _logits(LoraBankConfig(buckets=(8,), slots=(2,), modules=ATTN), path)
    assert set(bank.buckets[0].a) == {"qkv", "o"}
    assert rel_err(small, full) < 1e-6
    assert rel_err(small[0], small[1]) > 1e-3  # the adapter row differs from the base row


def test_adapter_outside_the_bank_modules_is_refused(tmp_path):
    path = write_adapter(str(tmp_path / "mlp"), r=4, targets=("q_proj", "down_proj"), seed=5)
    with pytest.raises(AdapterError, match=r"down_proj.*does not serve"):
        load_adapter(path, TINY, LoraBankConfig(buckets=(8,), slots=(1,), modules=ATTN))


def test_slot_bytes_count_only_served_groups():
    full = slot_bytes(TINY, 16, jnp.float32)
    attn = slot_bytes(TINY, 16, jnp.float32, LoraBankConfig(modules=ATTN).groups)
    assert 0 < attn < full
    with pytest.raises(ValueError, match="modules"):
        LoraBankConfig(modules=("q_proj", "lm_head"))
