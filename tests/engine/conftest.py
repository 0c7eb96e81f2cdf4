import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import write_adapter, write_model

from jlora.checkpoint.hf import load_hf_dir
from jlora.config import LoraBankConfig
from jlora.model import KVCache, Llama, forward

BANK = LoraBankConfig(buckets=(4, 8, 16, 32), slots=(3, 2, 2, 1))  # exactly the 8 adapters below
RANKS = (1, 3, 4, 6, 8, 12, 16, 32)  # 8 adapters over every bucket


@pytest.fixture(scope="session")
def tiny(tmp_path_factory):
    """A tiny random model and 8 adapters of different ranks on disk."""
    root = tmp_path_factory.mktemp("engine")
    model_dir = write_model(str(root / "model"))
    adapters = {f"r{r}": write_adapter(str(root / f"r{r}"), r=r, seed=r, std=0.3,
                                       targets=("q_proj", "v_proj", "o_proj", "down_proj") if r % 2 else
                                       ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"))
                for r in RANKS}
    config, params = load_hf_dir(model_dir)
    return {"root": root, "model": Llama(config, params), "adapters": adapters}


@jax.jit
def _noop(x):
    return x


def reference_greedy(model, bank, slot_of, prompts, adapters, n):
    """The foundation's generation path: one padded batch over a contiguous cache, no paging, no scheduling."""
    config, params = model.config, model.params()
    B, T = len(prompts), max(map(len, prompts))
    tokens = np.zeros((B, T), np.int32)
    positions = np.full((B, T), -1, np.int32)
    for i, p in enumerate(prompts):
        tokens[i, :len(p)], positions[i, :len(p)] = p, np.arange(len(p))
    lora = np.array([slot_of(a) for a in adapters], np.int32)
    fwd = jax.jit(forward, static_argnames=("config",))
    cache = KVCache.zeros(config, B, T + n)
    logits, cache = fwd(params, bank, jnp.asarray(tokens), jnp.asarray(positions),
                        jnp.asarray(np.repeat(lora[:, None], T, 1)), cache, config=config,
                        logit_index=jnp.asarray([len(p) - 1 for p in prompts]))
    out = [[int(t)] for t in np.argmax(np.asarray(logits), -1)]
    lengths = np.array([len(p) for p in prompts])
    for step in range(1, n):
        last = jnp.asarray([[o[-1]] for o in out], jnp.int32)
        logits, cache = fwd(params, bank, last, jnp.asarray(lengths + step - 1)[:, None], jnp.asarray(lora)[:, None],
                            cache, config=config)
        for o, t in zip(out, np.argmax(np.asarray(logits[:, 0]), -1)):
            o.append(int(t))
    return out
