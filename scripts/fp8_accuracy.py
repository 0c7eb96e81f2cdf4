"""FP8 base weights against bf16 and fp32 on a real small model: SmolLM2-135M-Instruct (the default model) quantized
at load, W8A16 and W8A8 (`RuntimeConfig.fp8_compute`), over a few chat prompts. Reports the max logits error
relative to the largest reference logit and how often the argmax agrees, per position, against the float32 model
and against bf16 (bf16 against float32 is the baseline: the rounding the default serving dtype already has).
Prints a table and writes JSON.

  python scripts/fp8_accuracy.py                 # CPU: about a minute
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from jlora.checkpoint.resolve import load_model  # noqa: E402
from jlora.config import RuntimeConfig  # noqa: E402
from jlora.model import KVCache, forward  # noqa: E402

PROMPTS = ["What is the capital of France?", "Write a haiku about the sea.", "Explain LoRA in one sentence.",
           "List three prime numbers.", "Translate 'good morning' into Spanish."]


def logits(model, tokenizer, runtime) -> list[np.ndarray]:
    config, params = model.config, model.params()
    fwd = jax.jit(forward, static_argnames=("config", "runtime"))
    out = []
    for p in PROMPTS:
        ids = tokenizer.encode(tokenizer.apply_chat_template([{"role": "user", "content": p}]))
        t = jnp.asarray([ids], jnp.int32)
        pos = jnp.arange(len(ids))[None]
        cache = KVCache.zeros(config, 1, len(ids), params["embed"].dtype)
        out.append(np.asarray(fwd(params, None, t, pos, None, cache, config=config, runtime=runtime)[0][0],
                              np.float32))
    return out


def compare(got, ref) -> dict:
    err = max(float(np.abs(g - r).max() / np.abs(r).max()) for g, r in zip(got, ref))
    agree = np.concatenate([g.argmax(-1) == r.argmax(-1) for g, r in zip(got, ref)])
    return {"max_rel_logit_error": err, "argmax_agreement": float(agree.mean()), "positions": int(agree.size)}


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="benchmarks/results/fp8_accuracy_cpu.json")
    args = ap.parse_args()
    runs = {}
    for name, dtype, quant, compute in (("fp32", "float32", None, "w8a16"), ("bf16", "bfloat16", None, "w8a16"),
                                        ("fp8_w8a16", "bfloat16", "fp8", "w8a16"),
                                        ("fp8_w8a8", "bfloat16", "fp8", "w8a8")):
        model, tokenizer = load_model(dtype=dtype, quantization=quant, progress=False)
        runs[name] = logits(model, tokenizer, RuntimeConfig(fp8_compute=compute))
    rows = [{"weights": n, "vs_fp32": compare(runs[n], runs["fp32"]), "vs_bf16": compare(runs[n], runs["bf16"])}
            for n in ("bf16", "fp8_w8a16", "fp8_w8a8")]
    print(f"{'weights':<11}{'err vs fp32':>13}{'argmax=fp32':>13}{'err vs bf16':>13}{'argmax=bf16':>13}")
    for r in rows:
        print(f"{r['weights']:<11}{r['vs_fp32']['max_rel_logit_error']:>12.1%}{r['vs_fp32']['argmax_agreement']:>12.0%}"
              f"{r['vs_bf16']['max_rel_logit_error']:>13.1%}{r['vs_bf16']['argmax_agreement']:>12.0%}")
    result = {"model": "smollm2-135m-instruct", "platform": jax.default_backend(), "prompts": PROMPTS, "rows": rows,
              "command": "python scripts/fp8_accuracy.py " + " ".join(sys.argv[1:])}
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
