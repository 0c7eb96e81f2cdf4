"""One process of the two-process engine test: `Engine(tp=2)` over two processes (one CPU device each).

Usage: python tests/sharding/_dist_engine_worker.py PORT PROCESS_ID OUT_JSON WORKDIR
Every process builds the same engine on the same requests (the tiny model and adapters written by
`write_inputs` into WORKDIR); each step's batch is process 0's (`broadcast_step` in `MeshRunner`). Writes
{"tokens": [[...], ...], "process_count": n} to OUT_JSON.
"""

from __future__ import annotations

import json
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE), HERE]

import jax  # noqa: E402

from jlora import distributed  # noqa: E402

# (prompt, adapter, temperature, seed): the unseeded sampled row draws a different seed on each process.
REQUESTS = [([5, 6, 7, 8, 9], "a8", 0.0, None), ([11, 3], None, 0.0, None), ([40, 41, 42], "a16", 0.0, None),
            ([2, 4, 8, 16], "a8", 20.0, None)]


def write_inputs(workdir: str) -> None:
    from helpers import write_adapter, write_model
    write_model(os.path.join(workdir, "model"))
    write_adapter(os.path.join(workdir, "a8"), r=8, seed=1, std=0.3)
    write_adapter(os.path.join(workdir, "a16"), r=12, seed=2, std=0.3)


def run(workdir: str, tp: int) -> list[list[int]]:
    from jlora.checkpoint.hf import load_hf_dir
    from jlora.config import LoraBankConfig
    from jlora.engine.engine import Engine, EngineConfig
    from jlora.model import Llama
    from jlora.sampling import SamplingParams

    config, params = load_hf_dir(os.path.join(workdir, "model"))
    engine = Engine(Llama(config, params), None, EngineConfig(
        max_num_seqs=4, max_num_batched_tokens=32, max_prefill_chunk=16, page_size=4, num_pages=16,
        max_model_len=32, bank=LoraBankConfig(buckets=(8, 16), slots=(1, 1)), tp=tp))
    for name in ("a8", "a16"):
        engine.store.register(name, os.path.join(workdir, name))
    rids = [engine.add_request(p, SamplingParams(temperature=t, max_tokens=5, seed=s), a)
            for p, a, t, s in REQUESTS]
    done = {}
    while engine.has_unfinished():
        done.update({o.request_id: o.token_ids for o in engine.step() if o.finished})
    return [done[r] for r in rids]


def main(port: str, process_id: str, out_path: str, workdir: str) -> None:
    distributed.initialize(f"localhost:{port}", 2, int(process_id), timeout_s=60)
    jax.config.update("jax_default_matmul_precision", "highest")
    tokens = run(workdir, tp=2)
    with open(out_path, "w") as f:
        json.dump({"tokens": tokens, "process_count": jax.process_count()}, f)
    jax.distributed.shutdown()


if __name__ == "__main__":
    main(*sys.argv[1:])
