"""One process of the two-process `jax.distributed` test (CPU, one device per process, gloo collectives).

Usage: python tests/sharding/_dist_worker.py PORT PROCESS_ID OUT_JSON
Runs `generate` on a tp=2 mesh and on a dp=2 mesh spanning both processes and writes
{"tokens": {"tp2dp1": [[...], ...], "tp1dp2": [...]}, "devices": n, "process_count": n} to OUT_JSON.
`generate` also runs on one device in the test process, as the reference.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE), HERE]

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

from jlora import distributed  # noqa: E402
from jlora.sampling import sample  # noqa: E402

MAX_NEW = 6
# (prompt, global adapter slot, temperature, seed): greedy and seeded rows must equal the one-device run;
# the unseeded row draws its seed from each process's clock, and process 0's broadcast makes them agree.
# The tiny model's logits span tens of units, so only a high temperature makes sampling depend on the seed.
REQUESTS = [([5, 6, 7, 8, 9], 0, 0.0, 1), ([11, 3], -1, 0.0, 2), ([40, 41, 42], 4, 20.0, 7),
            ([2, 4, 8, 16], 2, 20.0, None)]


@functools.partial(jax.jit, static_argnames=("fwd",), donate_argnames=("cache",))
def _step(params, bank, tokens, positions, lora_ids, cache, logit_index, temperature, keys, *, fwd):
    logits, cache = fwd(params, bank, tokens, positions, lora_ids, cache, logit_index=logit_index)
    B = tokens.shape[0]
    return sample(logits, temperature, jnp.zeros((B,), jnp.int32), jnp.ones((B,), jnp.float32), keys), cache


def generate(fwd, params, bank, cache) -> list[list[int]]:
    """A scheduler loop in miniature: process 0 builds every step's batch and broadcasts it; every process runs
    the same jitted step on the global arrays and reads the sampled tokens back."""
    B, T = len(REQUESTS), max(len(p) for p, *_ in REQUESTS)
    tokens, positions = np.zeros((B, T), np.int32), np.full((B, T), -1, np.int32)
    for i, (p, *_) in enumerate(REQUESTS):
        tokens[i, :len(p)], positions[i, :len(p)] = p, np.arange(len(p))
    lora = np.array([s for _, s, _, _ in REQUESTS], np.int32)
    temp = np.array([t for _, _, t, _ in REQUESTS], np.float32)
    seeds = np.array([s if s is not None else time.time_ns() % 2 ** 31 for *_, s in REQUESTS], np.int64)
    lengths = np.array([len(p) for p, *_ in REQUESTS], np.int32)
    lora_ids = np.repeat(lora[:, None], T, axis=1)
    batch = distributed.broadcast_step({"tokens": tokens, "positions": positions, "lora": lora_ids,
                                        "last": lengths - 1, "temp": temp, "seeds": seeds})
    base_keys = jnp.stack([jax.random.key(int(s)) for s in batch["seeds"]])
    out = [[] for _ in range(B)]
    for t in range(MAX_NEW):
        keys = jax.vmap(jax.random.fold_in, (0, None))(base_keys, t)
        tok, cache = _step(params, bank, batch["tokens"], batch["positions"], batch["lora"], cache, batch["last"],
                           batch["temp"], keys, fwd=fwd)
        host = distributed.to_host(tok)
        for i in range(B):
            out[i].append(int(host[i]))
        batch = distributed.broadcast_step({**batch, "tokens": host[:, None].astype(np.int32),
                                            "positions": (lengths + t)[:, None], "lora": lora[:, None],
                                            "last": np.zeros((B,), np.int32)})
    return out


def main(port: str, process_id: str, out_path: str) -> None:
    distributed.initialize(f"localhost:{port}", 2, int(process_id), timeout_s=60)
    jax.config.update("jax_default_matmul_precision", "highest")
    from _common import KV2, random_bank, random_params
    from jlora.model.sharded import ShardedModel
    from jlora.sharding import make_mesh

    params = random_params(KV2, 3)
    with tempfile.TemporaryDirectory() as tmp:
        bank = random_bank(KV2, tmp)
    tokens = {}
    for tp, dp in [(2, 1), (1, 2)]:
        model = ShardedModel(KV2, make_mesh(tp, dp))
        cache = model.cache_zeros(len(REQUESTS), 16)
        tokens[f"tp{tp}dp{dp}"] = generate(model.forward, model.place_params(params), model.place_bank(bank), cache)
    with open(out_path, "w") as f:
        json.dump({"tokens": tokens, "devices": jax.device_count(), "process_count": jax.process_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
