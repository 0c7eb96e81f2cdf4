"""Heavy device-slot eviction against an independent reference: each adapter merged into the base weights
(W + scale * B @ A, in float64 on the host) and decoded by an engine without any adapter bank in use."""

import os

import numpy as np
from helpers import TINY, random_hf_tensors, write_adapter
from safetensors.numpy import load_file

from jlora.checkpoint.hf import load_hf_dir, save_hf_dir
from jlora.config import LoraBankConfig
from jlora.engine.engine import Engine, EngineConfig
from jlora.model import Llama
from jlora.sampling import SamplingParams

BANK = LoraBankConfig(buckets=(4, 8), slots=(1, 1))  # two slots for eight adapters: nearly every batch evicts
SIZES = dict(max_num_seqs=4, max_num_batched_tokens=32, max_prefill_chunk=16, page_size=4, num_pages=48,
             max_model_len=48, num_scheduler_steps=2)
SP = SamplingParams(temperature=0.0, max_tokens=5)


def _merged_model(tmp_path, name, adapter_dir, alpha=8.0):
    tensors = {k: v.astype(np.float64) for k, v in random_hf_tensors(TINY, seed=0).items()}
    lora = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    for key, a in lora.items():
        if ".lora_A." not in key:
            continue
        b = lora[key.replace(".lora_A.", ".lora_B.")]
        base = key.replace("base_model.model.", "").replace(".lora_A.weight", ".weight")
        tensors[base] = tensors[base] + (alpha / a.shape[0]) * (b.astype(np.float64) @ a.astype(np.float64))
    path = str(tmp_path / f"merged-{name}")
    save_hf_dir({k: v.astype(np.float32) for k, v in tensors.items()}, TINY, path)
    return Llama(*load_hf_dir(path))


def _greedy(engine, requests):
    """{i: token ids} of requests [(prompt, adapter)], all queued at once."""
    for i, (prompt, adapter) in enumerate(requests):
        engine.add_request(prompt, SP, adapter, request_id=str(i))
    done = {}
    for _ in range(2000):
        for out in engine.step():
            if out.finished:
                assert out.finish_reason == "length", out.error
                done[int(out.request_id)] = out.token_ids
        if not engine.has_unfinished():
            return done
    raise AssertionError("the engine did not finish")


def test_heavy_eviction_matches_merged_weights(tmp_path):
    adapters = {f"e{i}": write_adapter(str(tmp_path / f"e{i}"), r=(4, 8)[i % 2], seed=40 + i, std=0.3,
                                       targets=("q_proj", "v_proj", "o_proj", "down_proj") if i % 3 else
                                       ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
                for i in range(8)}
    save_hf_dir(random_hf_tensors(TINY, seed=0), TINY, str(tmp_path / "base"))
    base = Llama(*load_hf_dir(str(tmp_path / "base")))
    engine = Engine(base, None, EngineConfig(bank=BANK, max_cpu_loras=2, **SIZES))
    for name, path in adapters.items():
        engine.store.register(name, path, eager=False)
    rng = np.random.default_rng(7)
    names = list(adapters) + [None]
    requests = [(rng.integers(0, 97, rng.integers(2, 9)).tolist(), names[i % len(names)]) for i in range(27)]
    got = _greedy(engine, requests)
    assert engine.store.slots.num_writes >= 16, "the test must evict, over and over"
    assert engine.store.stats.host_misses > len(adapters), "and reload host copies from disk"
    for name in names:
        model = base if name is None else _merged_model(tmp_path, name, adapters[name])
        ref_engine = Engine(model, None, EngineConfig(**SIZES))
        mine = [(i, p) for i, (p, a) in enumerate(requests) if a == name]
        ref = _greedy(ref_engine, [(p, None) for _, p in mine])
        for k, (i, _) in enumerate(mine):
            assert got[i] == ref[k], (name, i)
    assert not engine.store.refs and engine.allocator.num_free == SIZES["num_pages"]
