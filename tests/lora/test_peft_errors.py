"""Bad adapters fail with an AdapterError naming the problem, and nothing loaded is disturbed (through the serving
engine's adapter store)."""

import json
import os

import numpy as np
import pytest
from helpers import TINY, write_adapter, write_model

from jlora.config import LoraBankConfig
from jlora.errors import AdapterError
from jlora.lora import bank as bank_lib
from jlora.engine.adapter_store import AdapterStore

BANK = LoraBankConfig(buckets=(8, 16), slots=(2, 1))


def _slot(store, name):
    key = store.registration(name).key
    return store.ensure_resident({key})[key]


@pytest.fixture
def registry(tmp_path):
    store = AdapterStore(TINY, BANK)
    store.register("good", write_adapter(str(tmp_path / "good"), seed=1))
    _slot(store, "good")
    yield store
    store.close()


def _snapshot(reg):
    import jax
    return [np.asarray(x).copy() for x in jax.tree_util.tree_leaves(reg.bank)]


def _assert_fails(reg, path, match):
    before = _snapshot(reg)
    with pytest.raises(AdapterError, match=match):
        reg.register("bad", path)
    after = _snapshot(reg)
    assert all(np.array_equal(a, b) for a, b in zip(before, after)), "a failed load changed the bank"
    assert reg.names() == ["good"] and _slot(reg, "good") == 0


def test_missing_directory(registry, tmp_path):
    _assert_fails(registry, str(tmp_path / "nope"), "does not exist")


def test_missing_config(registry, tmp_path):
    p = write_adapter(str(tmp_path / "a"))
    os.remove(os.path.join(p, "adapter_config.json"))
    _assert_fails(registry, p, "no adapter_config.json")


def test_missing_weights(registry, tmp_path):
    p = write_adapter(str(tmp_path / "a"))
    os.remove(os.path.join(p, "adapter_model.safetensors"))
    _assert_fails(registry, p, "no adapter_model.safetensors")


def test_pickle_refused_never_unpickled(registry, tmp_path):
    p = write_adapter(str(tmp_path / "a"))
    os.remove(os.path.join(p, "adapter_model.safetensors"))
    marker = tmp_path / "unpickled"
    # A pickle that would create `marker` if anything ever unpickled it.
    payload = (b"cos\nsystem\n(S'touch " + str(marker).encode() + b"'\ntR.")
    with open(os.path.join(p, "adapter_model.bin"), "wb") as f:
        f.write(payload)
    _assert_fails(registry, p, "pickle")
    assert not marker.exists()


def test_corrupt_safetensors(registry, tmp_path):
    p = write_adapter(str(tmp_path / "a"))
    with open(os.path.join(p, "adapter_model.safetensors"), "wb") as f:
        f.write(b"\x00garbage")
    _assert_fails(registry, p, "not a readable safetensors")


def test_shape_mismatch(registry, tmp_path):
    key = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
    p = write_adapter(str(tmp_path / "a"), r=4, tensors_override={key: np.ones((4, 31), np.float32)})
    _assert_fails(registry, p, "shape mismatch")


def test_layer_beyond_model(registry, tmp_path):
    key = "base_model.model.model.layers.7.self_attn.q_proj.lora_A.weight"
    p = write_adapter(str(tmp_path / "a"), tensors_override={key: np.ones((4, 32), np.float32)})
    _assert_fails(registry, p, "layer 7 does not exist")


def test_unknown_target_module(registry, tmp_path):
    p = write_adapter(str(tmp_path / "a"), extra_config={"target_modules": ["q_proj", "lm_head"]})
    _assert_fails(registry, p, r"unknown target modules \['lm_head'\]")


def test_unexpected_tensor(registry, tmp_path):
    p = write_adapter(str(tmp_path / "a"), tensors_override={
        "base_model.model.lm_head.lora_A.weight": np.ones((4, 32), np.float32)})
    _assert_fails(registry, p, "unexpected tensor")


def test_rank_above_largest_bucket(registry, tmp_path):
    _assert_fails(registry, write_adapter(str(tmp_path / "a"), r=17), "above the largest rank bucket")


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_non_finite_weights(registry, tmp_path, bad):
    key = "base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"
    w = np.random.default_rng(0).normal(size=(32, 4)).astype(np.float32)
    w[3, 2] = bad
    _assert_fails(registry, write_adapter(str(tmp_path / "a"), tensors_override={key: w}), "NaN or Inf")


def test_rank_disagrees_with_config(registry, tmp_path):
    p = write_adapter(str(tmp_path / "a"), r=4, extra_config={"r": 8})
    _assert_fails(registry, p, r"\(r=8\)|config says r=8")


def test_malformed_config_json(registry, tmp_path):
    p = write_adapter(str(tmp_path / "a"))
    with open(os.path.join(p, "adapter_config.json"), "w") as f:
        f.write("{not json")
    _assert_fails(registry, p, "not valid JSON")


@pytest.mark.parametrize("cfg,match", [({"use_dora": True}, "DoRA"), ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
                                       ({"peft_type": "IA3"}, "peft_type")])
def test_unsupported_features(registry, tmp_path, cfg, match):
    _assert_fails(registry, write_adapter(str(tmp_path / "a"), extra_config=cfg), match)


def test_missing_half_of_a_pair(registry, tmp_path):
    p = write_adapter(str(tmp_path / "a"), targets=("q_proj",))
    from safetensors.numpy import load_file, save_file
    t = load_file(os.path.join(p, "adapter_model.safetensors"))
    t.pop("base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight")
    save_file(t, os.path.join(p, "adapter_model.safetensors"))
    _assert_fails(registry, p, "lora_A and lora_B must both be present")


def test_slot_write_does_not_recompile(tmp_path):
    store = AdapterStore(TINY, BANK)
    keys = [store.register(f"a{i}", write_adapter(str(tmp_path / f"a{i}"), r=4 + i, seed=i)).key for i in range(3)]
    store.ensure_resident({keys[0]})
    before = bank_lib._write_slot._cache_size()
    store.ensure_resident({keys[1], keys[2]})
    store.ensure_resident({keys[0], keys[1]})  # evicts a2 (LRU) in the full bucket
    assert bank_lib._write_slot._cache_size() == before
    assert set(store.slots.resident) == {keys[0], keys[1]}
    store.close()


FIXTURES = os.path.join(os.path.dirname(__file__), "..", "fixtures")


@pytest.mark.parametrize("base,adapter,module", [
    ("phi3", "llama_gqa/q_r1", "q_proj"),  # Phi-3 has no q_proj: its adapters target the fused qkv_proj
    ("qwen3", "phi3/qkv_o_r6", "qkv_proj"),  # and a split-projection model has no qkv_proj
])
def test_adapter_modules_the_base_lacks_are_refused_by_name(base, adapter, module):
    from jlora.config import ModelConfig
    from jlora.lora.peft import load_adapter
    config = ModelConfig.from_json(os.path.join(FIXTURES, "models", base, "config.json"))
    with pytest.raises(AdapterError, match=f"{module} is not a module of this {base} base model"):
        load_adapter(os.path.join(FIXTURES, "adapters", adapter), config, BANK)
