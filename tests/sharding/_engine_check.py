"""The engine on meshes of 8 simulated CPU devices vs the one-device engine; prints one JSON object.

Run by `test_engine_sharded.py` in a subprocess (the device count must be fixed before jax starts). Runs alone
too: `python tests/sharding/_engine_check.py`.

For each mesh (tp=1 reference; tp=2; tp=2 x dp=2, also with per-layer weights as on GPUs; tp=4, where the tiny
model's 2 kv heads are copied) one engine serves the same staggered greedy requests in float32: base-only rows
and adapters of rank 4, 8 and 16, two of them registered only after the engine has run steps, with fewer rank-8
slots than rank-8 adapters (so slots are evicted and rewritten). Reports per mesh the generated tokens, whether
every bank array and weight kept its placement, and for tp=2 the compile count before and after the requests
(after `Engine.warmup`). Per mesh too, an `LLM` over the same engine settings scores continuations (`LLM.score`)
and a request's prompt logprobs (echo), under the base and two adapters; and FP8 weights serve on tp=2 x dp=2.
"""

from __future__ import annotations

import os
import sys

os.environ["XLA_FLAGS"] = os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
os.environ.setdefault("JAX_PLATFORMS", "cpu")
HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:0] = [os.path.dirname(os.path.dirname(HERE)), os.path.dirname(HERE), HERE]

import json  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
from jax.sharding import NamedSharding  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

from helpers import write_adapter, write_model  # noqa: E402
from jlora.checkpoint.hf import load_hf_dir  # noqa: E402
from jlora.config import LoraBankConfig, RuntimeConfig  # noqa: E402
from jlora.engine.compiles import compile_count  # noqa: E402
from jlora.engine.engine import Engine, EngineConfig  # noqa: E402
from jlora.generate import LLM  # noqa: E402
from jlora.model import Llama, quant  # noqa: E402
from jlora.model.sharded import bank_specs, param_specs  # noqa: E402
from jlora.sampling import SamplingParams  # noqa: E402

BANK = LoraBankConfig(buckets=(8, 16), slots=(2, 1))
# name -> (rank, target modules); "late" ones are registered after the engine has run steps.
ADAPTERS = {"r8": (8, None), "r4": (4, ("q_proj", "v_proj", "down_proj")), "r16": (16, None),
            "late8": (8, ("k_proj", "o_proj", "gate_proj", "up_proj")), "late16": (12, None)}
EARLY, LATE = ["r8", "r4", "r16"], ["late8", "late16"]
# (prompt length, adapter, arrival step): 13 requests, 4 of them base-only; the last has request 0's prompt.
REQUESTS = [(5, "r8", 0), (3, None, 0), (9, "r4", 0), (7, "r16", 0), (2, "r8", 1), (11, None, 1),
            (6, "late8", 4), (4, "late16", 4), (8, "r4", 5), (3, "late8", 6), (10, None, 6), (5, "r16", 7),
            (5, None, 7)]
MAX_TOKENS = 6
MESHES = [(1, 1), (2, 1), (2, 2), (4, 1)]


def _config(tp, dp, runtime=RuntimeConfig()) -> EngineConfig:
    return EngineConfig(max_num_seqs=8, max_num_batched_tokens=48, max_prefill_chunk=16, page_size=4, num_pages=48,
                        max_model_len=32, bank=BANK, tp=tp, dp=dp, runtime=runtime)


def serve(model, paths, tp, dp, warmup=False, runtime=RuntimeConfig()) -> dict:
    t0 = time.perf_counter()
    engine = Engine(model, None, _config(tp, dp, runtime=runtime))
    for name in EARLY:
        engine.store.register(name, paths[name])
    compiles = None
    if warmup:
        engine.warmup()
        compiles = [compile_count()]
    rng = np.random.default_rng(0)
    prompts = [rng.integers(0, model.config.vocab_size, n).tolist() for n, _, _ in REQUESTS]
    prompts[-1] = prompts[0]
    sp = SamplingParams(temperature=0.0, max_tokens=MAX_TOKENS)
    done, step = {}, 0
    while len(done) < len(REQUESTS):
        if step == 3:
            for name in LATE:  # adapters arriving while the engine runs
                engine.store.register(name, paths[name])
        for i, (_, adapter, arrival) in enumerate(REQUESTS):
            if arrival == step:
                engine.add_request(prompts[i], sp, adapter, request_id=str(i))
        for out in engine.step():
            if out.finished:
                done[out.request_id] = out.token_ids
        step += 1
    if warmup:
        compiles.append(compile_count())
    bank = engine.store.bank
    mesh = getattr(engine.runner, "model", None)
    misplaced = []
    if mesh is not None:
        for path, x, spec in zip(range(10 ** 6), jax.tree.leaves(bank), jax.tree.leaves(bank_specs(bank))):
            if not x.sharding.is_equivalent_to(NamedSharding(mesh.mesh, spec), x.ndim):
                misplaced.append(f"leaf {path}: {x.sharding}")
        params = engine.runner.params
        for path, x, spec in zip(range(10 ** 6), jax.tree.leaves(params), jax.tree.leaves(param_specs(params))):
            if not x.sharding.is_equivalent_to(NamedSharding(mesh.mesh, spec), x.ndim):
                misplaced.append(f"param {path}: {x.sharding}")
    return {"tokens": [done[str(i)] for i in range(len(REQUESTS))], "compiles": compiles,
            "slot_writes": engine.store.slots.num_writes, "misplaced": misplaced, "preemptions": engine.preemptions,
            "split_layers": isinstance(engine.runner.params["layers"], tuple),
            "seconds": round(time.perf_counter() - t0, 1)}


def score(model, paths, tp, dp) -> dict:
    """`LLM.loglikelihood` of three (prompt, continuation) pairs and the prompt logprobs of three requests, under
    the base, a rank-8 and a rank-16 adapter, on one mesh."""
    llm = LLM.from_model(model, None, _config(tp, dp))
    with llm:
        for name in EARLY:
            llm.engine.store.register(name, paths[name])
        rng = np.random.default_rng(1)
        V, adapters = model.config.vocab_size, [None, "r8", "r16"]
        prompts = [rng.integers(0, V, n).tolist() for n in (5, 9, 3)]
        continuations = [rng.integers(0, V, n).tolist() for n in (4, 2, 6)]
        scored = llm.loglikelihood(prompts, continuations, adapter=adapters)
        engine, done = llm.engine, {}
        for i, (p, a) in enumerate(zip(prompts, adapters)):
            engine.add_request(p, SamplingParams(max_tokens=0, prompt_logprobs=2), a, request_id=str(i))
        while engine.has_unfinished():
            done.update((o.request_id, o) for o in engine.step() if o.finished)
        echo = [[e["logprob"] for e in done[str(i)].prompt_logprobs[1:]] for i in range(len(prompts))]
        top = [[sorted(e["top"]) for e in done[str(i)].prompt_logprobs[1:]] for i in range(len(prompts))]
    return {"token_logprobs": [s.token_logprobs for s in scored], "prompt_logprobs": echo, "prompt_top": top}


def main() -> None:
    assert jax.device_count() == 8, jax.devices()
    with tempfile.TemporaryDirectory() as tmp:
        config, params = load_hf_dir(write_model(os.path.join(tmp, "model")))
        model = Llama(config, params)
        paths = {name: write_adapter(os.path.join(tmp, name), r=r, alpha=2.0 * r, seed=i, std=0.3,
                                     **({"targets": t} if t else {}))
                 for i, (name, (r, t)) in enumerate(ADAPTERS.items())}
        results = {f"tp{tp}dp{dp}": serve(model, paths, tp, dp, warmup=(tp, dp) == (2, 1)) for tp, dp in MESHES}
        # FP8 weights (per-channel scales split with their columns) on one device and on tp=2 x dp=2.
        fp8 = quant.quantize_params(params)
        for tp, dp in [(1, 1), (2, 2)]:
            results[f"fp8_tp{tp}dp{dp}"] = serve(Llama(config, jax.tree.map(np.array, fp8)), paths, tp, dp)
        for tp, dp in [(1, 1), (2, 2), (4, 1)]:  # the LLM takes over its weights: each gets a copy
            own = Llama(config, jax.tree.map(np.array, params))
            results[f"tp{tp}dp{dp}"]["score"] = score(own, paths, tp, dp)
        # The GPU layout: per-layer weights placed on the mesh.
        results["tp2dp2_split"] = serve(model, paths, 2, 2, runtime=RuntimeConfig(layer_loop="split"))
    print(json.dumps(results))


if __name__ == "__main__":
    main()
