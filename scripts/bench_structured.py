"""The throughput cost of structured output: N sampled requests without and with a JSON schema, on one engine in one
run (and a mix of both, where the unconstrained half shares one-token steps with the structured half).

The engine's warm-up compiles every step program first (on a thread pool, as `jlora serve --warmup` does). Every
mode then runs once untimed, twice over (the second pass finds the prompt in the prefix cache, as the timed runs
do), so that the timed runs compile nothing; then each mode is timed. Reported per mode: output tokens, seconds,
tokens/s, engine steps, the host seconds spent filling grammar bitmasks (`Grammars.bitmask`, on the engine thread
while each masked step's forward runs), programs compiled while timed (should be 0), and how many structured outputs parse and validate
(jsonschema). The adapter bank is one rank-16 slot: no request uses an adapter, and a small bank compiles faster.
Prints a table and writes benchmarks/results/structured_<platform>.json.

  python scripts/bench_structured.py                                   # CPU, the default model
  JAX_PLATFORMS=cuda python scripts/bench_structured.py --requests 256 --max-num-seqs 256

`--random-weights SHAPE --tokenizer DIR` runs a model of that shape with random weights and the tokenizer of DIR (a
directory with tokenizer.json, e.g. the default model's converted copy under ~/.cache/jlora/converted), for machines
without the model's package. The grammar work is the tokenizer's; what a random model samples inside the grammar is
noise, so "valid" then counts outputs cut by max_tokens too.
"""

from __future__ import annotations

import argparse
import json
import os
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SCHEMA = {"type": "object", "properties": {
    "name": {"type": "string", "maxLength": 16},
    "age": {"type": "integer", "minimum": 0, "maximum": 120},
    "tags": {"type": "array", "items": {"enum": ["red", "green", "blue"]}, "maxItems": 3},
    "ok": {"type": "boolean"}},
    "required": ["name", "age", "tags", "ok"], "additionalProperties": False}
# Shapes for --random-weights: the default model's, and an 8B Llama's (the vocabulary is the tokenizer's).
SHAPES = {"smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_layers=30, num_heads=9, num_kv_heads=3,
                               head_dim=64, rope_theta=100000.0, tie_word_embeddings=True),
          "llama-8b": dict(hidden_size=4096, intermediate_size=14336, num_layers=32, num_heads=32, num_kv_heads=8,
                           head_dim=128, rope_theta=500000.0)}
PROMPT = "Describe a made-up person as JSON with a name, an age, colour tags and whether they are ok."


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="smollm2-135m-instruct", help="model name, .gguf file or HF directory")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--requests", type=int, default=32, help="requests per mode")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--max-num-seqs", type=int, default=32)
    p.add_argument("--num-scheduler-steps", type=int, default=8)
    p.add_argument("--random-weights", choices=sorted(SHAPES), default=None,
                   help="random weights of this shape instead of --model (needs --tokenizer)")
    p.add_argument("--tokenizer", default=None, metavar="DIR", help="tokenizer directory for --random-weights")
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/structured_<platform>.json)")
    return p.parse_args(argv)


def requests(args, mode: str, seed: int):
    from jlora.sampling import SamplingParams
    from jlora.structured import StructuredOutput

    spec = StructuredOutput("json_schema", json.dumps(SCHEMA))
    # Unconstrained requests ignore EOS, so their length is max_tokens; a structured one ends with its grammar.
    return [SamplingParams(temperature=1.0, seed=seed + i, max_tokens=args.max_tokens, ignore_eos=not structured,
                           structured=spec if structured else None)
            for i in range(args.requests)
            for structured in [mode == "json_schema" or (mode == "mixed" and i % 2 == 0)]]


def timed(llm, prompt, sps) -> dict:
    import jsonschema

    from jlora.engine.compiles import compile_count

    grammars = llm.engine.grammars
    fill, spent = grammars.bitmask, [0.0]

    def counted(*a):
        t = time.perf_counter()
        try:
            return fill(*a)
        finally:
            spent[0] += time.perf_counter() - t

    grammars.bitmask = counted
    steps, compiles = llm.engine.steps, compile_count()
    t0 = time.perf_counter()
    outs = llm.generate([prompt] * len(sps), sampling=sps)
    seconds = time.perf_counter() - t0
    grammars.bitmask = fill
    valid = 0
    for out, sp in zip(outs, sps):
        if sp.structured is not None:
            try:
                jsonschema.validate(json.loads(out.text), SCHEMA)
                valid += 1
            except (ValueError, jsonschema.ValidationError):
                pass
    tokens = sum(len(o.token_ids) for o in outs)
    return {"tokens": tokens, "seconds": round(seconds, 3), "tokens_per_s": round(tokens / seconds, 1),
            "steps": llm.engine.steps - steps, "mask_s": round(spent[0], 3), "compiles": compile_count() - compiles,
            "structured": sum(sp.structured is not None for sp in sps), "valid": valid}


def random_llm(args, ecfg):
    """An LLM over random weights of shape `args.random_weights`, with the tokenizer of `args.tokenizer`."""
    import jax
    import jax.numpy as jnp

    from jlora.config import ModelConfig
    from jlora.generate import LLM
    from jlora.model import Llama, init_params
    from jlora.tokenizer import Tokenizer

    if not args.tokenizer:
        raise SystemExit("--random-weights needs --tokenizer DIR")
    tokenizer = Tokenizer.from_dir(args.tokenizer)
    config = ModelConfig(vocab_size=tokenizer.vocab_size, max_position_embeddings=8192,
                         **SHAPES[args.random_weights])
    dtype = jnp.dtype(args.dtype)
    params = jax.jit(lambda k: init_params(config, k, dtype))(jax.random.key(0))
    return LLM.from_model(Llama(config, params), tokenizer, ecfg)


def main(argv=None) -> None:
    args = parse_args(argv)
    import jax

    from jlora.config import LoraBankConfig
    from jlora.engine.engine import EngineConfig
    from jlora.generate import LLM

    per_seq = -(-(256 + args.max_tokens) // 16)
    ecfg = EngineConfig(max_num_seqs=args.max_num_seqs, num_pages=args.max_num_seqs * per_seq + 16, page_size=16,
                        max_model_len=256 + args.max_tokens, num_scheduler_steps=args.num_scheduler_steps,
                        max_prefill_chunk=128, bank=LoraBankConfig(buckets=(16,), slots=(1,)))
    if args.random_weights:
        llm = random_llm(args, ecfg)
    else:
        llm = LLM(args.model, dtype=args.dtype, progress=False, engine=ecfg)
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True)
    t0 = time.perf_counter()
    shapes = llm.engine.warmup()  # every step program, compiled on a thread pool
    print(f"warm-up: {shapes} step programs in {time.perf_counter() - t0:.1f} s", flush=True)
    modes = ("plain", "json_schema", "mixed")
    for seed in (0, 100):  # compiles every mode's step shapes, fresh and from the prefix cache
        for mode in modes:
            r = timed(llm, prompt, requests(args, mode, seed=seed))
            print(f"warm-up {mode} (seed {seed}): {r['seconds']:.1f} s, {r['compiles']} programs", flush=True)
    rows = []
    for mode in modes:
        rows.append({"mode": mode, **timed(llm, prompt, requests(args, mode, seed=1000))})
        print(f"timed {mode}: {rows[-1]['tokens_per_s']:.1f} tok/s", flush=True)
    plain = rows[0]["tokens_per_s"]
    for row in rows:
        row["vs_plain"] = round(row["tokens_per_s"] / plain, 3)
    print(f"{'mode':<12} {'tokens':>7} {'s':>8} {'tok/s':>8} {'x plain':>8} {'steps':>6} {'mask s':>7} "
          f"{'compiles':>8} {'valid':>7}")
    for r in rows:
        print(f"{r['mode']:<12} {r['tokens']:>7} {r['seconds']:>8.2f} {r['tokens_per_s']:>8.1f} {r['vs_plain']:>8.3f} "
              f"{r['steps']:>6} {r['mask_s']:>7.3f} {r['compiles']:>8} {r['valid']:>3}/{r['structured']:<3}")
    model = f"{args.random_weights}-shaped, random weights" if args.random_weights else args.model
    result = {"platform": jax.default_backend(), "device": jax.devices()[0].device_kind, "model": model,
              "dtype": args.dtype, "requests": args.requests, "max_tokens": args.max_tokens,
              "max_num_seqs": args.max_num_seqs, "num_scheduler_steps": args.num_scheduler_steps,
              "schema": SCHEMA, "rows": rows}
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"structured_{jax.default_backend()}.json")
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(f"wrote {out}")
    llm.close()


if __name__ == "__main__":
    main()
