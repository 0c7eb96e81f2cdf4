"""`jlora train` on a tiny random model: the loss falls, the adapter serves exactly, resume is seamless."""

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, rel_err, write_model
from safetensors.numpy import load_file

from jlora import cli
from jlora.checkpoint.hf import load_hf_dir, params_from_hf, read_tensors
from jlora.config import LoraBankConfig
from jlora.lora.bank import init_bank, write_slot
from jlora.lora.peft import load_adapter, read_spec
from jlora.model import KVCache, forward
from jlora.train.trainer import TrainConfig, train
from train.tiny import write_tiny_data, write_tiny_tokenizer

fwd = jax.jit(forward, static_argnames=("config", "runtime"))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("tiny")
    model = write_tiny_tokenizer(write_model(str(root / "model"), TINY, seed=1))
    return model, write_tiny_data(str(root / "data.jsonl"))


def _config(tiny, out, **kw):
    model, data = tiny
    base = dict(data=data, output=str(out), model=model, rank=4, alpha=8.0, steps=30, lr=1e-2, batch_size=8,
                seq_len=48, warmup_steps=2, progress=False)
    return TrainConfig(**{**base, **kw})


def _merged_params(model_dir, adapter_dir):
    """W += scale * B @ A on the HF tensors: an independent route to the adapted model."""
    spec, tensors = read_spec(adapter_dir), read_tensors(model_dir)
    lora = load_file(os.path.join(adapter_dir, "adapter_model.safetensors"))
    for key, a in lora.items():
        if ".lora_A." in key:
            module = key.split(".lora_A")[0].removeprefix("base_model.model.")
            b = lora[key.replace("lora_A", "lora_B")]
            tensors[module + ".weight"] = tensors[module + ".weight"] + spec.scale(module) * (b @ a)
    return params_from_hf(tensors, TINY)


@pytest.mark.parametrize("rslora,targets", [(False, "all-linear"), (True, "q,v,down")])
def test_loss_falls_and_adapter_serves_as_merged_weights(tiny, tmp_path, rslora, targets):
    result = train(_config(tiny, tmp_path / "adapter", rslora=rslora, target_modules=targets))
    first, last = result.losses[1], np.mean([result.losses[s] for s in range(26, 31)])
    assert last < 0.5 * first, (first, last)

    out = result.output
    cfg = json.load(open(os.path.join(out, "adapter_config.json")))
    assert cfg["peft_type"] == "LORA" and cfg["r"] == 4 and cfg["lora_alpha"] == 8.0 and cfg["use_rslora"] == rslora
    tensors = load_file(os.path.join(out, "adapter_model.safetensors"))
    key = "base_model.model.model.layers.1.self_attn.q_proj.lora_{}.weight"
    assert tensors[key.format("A")].shape == (4, TINY.hidden_size)
    assert tensors[key.format("B")].shape == (TINY.q_dim, 4)
    assert np.abs(tensors[key.format("B")]).max() > 0  # B starts at zero; training moved it
    assert len(tensors) == 2 * TINY.num_layers * len(cfg["target_modules"])

    config, params = load_hf_dir(tiny[0])
    bank_config = LoraBankConfig(buckets=(4, 8), slots=(2, 1))
    bank = write_slot(init_bank(config, bank_config), 1, *_ab(load_adapter(out, config, bank_config)))
    rng = np.random.default_rng(0)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (2, 11)), jnp.int32)
    positions = jnp.broadcast_to(jnp.arange(11, dtype=jnp.int32), (2, 11))
    cache = KVCache.zeros(config, 2, 16)
    got, _ = fwd(params, bank, tokens, positions, jnp.ones((2, 11), jnp.int32), cache, config=config)
    want, _ = fwd(_merged_params(tiny[0], out), None, tokens, positions, None, cache, config=config)
    base, _ = fwd(params, None, tokens, positions, None, cache, config=config)
    assert rel_err(got, want) < 1e-5
    assert rel_err(base, want) > 1e-3


def _ab(adapter):
    return adapter.a, adapter.b


def test_resume_continues_the_same_loss_curve(tiny, tmp_path):
    n = 8
    straight = train(_config(tiny, tmp_path / "straight", steps=n))
    ckpt = str(tmp_path / "ckpt")
    first = train(_config(tiny, tmp_path / "resumed", steps=n, checkpoint_dir=ckpt, checkpoint_every=n // 2),
                  stop_after=n // 2 + 1)  # "crashes" one step after the checkpoint: that step is redone
    assert first.output is None and sorted(os.listdir(ckpt)) == [str(n // 2)]
    resumed = train(_config(tiny, tmp_path / "resumed", steps=n, checkpoint_dir=ckpt, resume=True))
    assert sorted(resumed.losses) == list(range(n // 2 + 1, n + 1))
    for step in range(1, n // 2 + 2):
        assert abs(first.losses[step] - straight.losses[step]) < 1e-6
    for step in resumed.losses:
        assert abs(resumed.losses[step] - straight.losses[step]) < 1e-6, step
    a = load_file(str(tmp_path / "straight" / "adapter_model.safetensors"))
    b = load_file(str(tmp_path / "resumed" / "adapter_model.safetensors"))
    assert max(float(np.abs(a[k] - b[k]).max()) for k in a) < 1e-6

    with pytest.raises(ValueError, match="other settings"):
        train(_config(tiny, tmp_path / "other", steps=n, lr=5e-3, checkpoint_dir=ckpt, resume=True))


def test_cli_trains_and_writes_peft_dir(tiny, tmp_path, capsys):
    model, data = tiny
    out = tmp_path / "cli_adapter"
    code = cli.main(["train", "--model", model, "--data", data, "--output", str(out), "--steps", "2",
                     "--rank", "2", "--target-modules", "q_proj,o_proj", "--seq-len", "32", "--batch-size", "4",
                     "--save-dtype", "bfloat16", "--quiet"])
    assert code == 0
    assert "2 steps" in capsys.readouterr().out
    cfg = json.load(open(out / "adapter_config.json"))
    assert cfg["target_modules"] == ["q_proj", "o_proj"] and cfg["r"] == 2
    config, _ = load_hf_dir(model)
    adapter = load_adapter(str(out), config, LoraBankConfig(buckets=(4,), slots=(1,)))
    assert adapter.targets == ("q_proj", "o_proj")
    with pytest.raises(SystemExit, match="warmup_steps"):
        cli.main(["train", "--model", model, "--data", data, "--output", str(out), "--steps", "2",
                  "--warmup-steps", "2", "--quiet"])


def test_training_a_fused_checkpoint_family_is_refused():
    import dataclasses

    from jlora.train.lora_params import init_lora
    phi3 = dataclasses.replace(TINY, model_type="phi3")
    with pytest.raises(ValueError, match="phi3 base is not supported.*qkv_proj"):
        init_lora(phi3, ("q_proj",), 4, jax.random.key(0))
