"""S-LoRA's synthetic serving workload, shared by the jlora and Hugging Face PEFT serving benchmarks.

NumPy only, so the PyTorch baseline can import it without JAX.
"""

from __future__ import annotations

import json
import os

import numpy as np

TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def workload(n, num_adapters, rate, alpha, lengths, vocab, seed):
    """S-LoRA's trace: a list of (arrival time in s, prompt ids, output length, adapter index or None).

    Arrivals are Gamma with CV = 1, adapter popularity is numpy.random.power(alpha), and prompt and output
    lengths are uniform in `lengths` (inclusive).
    """
    rng = np.random.default_rng(seed)
    gaps = rng.gamma(shape=1.0, scale=1.0 / rate, size=n)  # CV = 1/sqrt(shape) = 1
    arrivals = np.cumsum(gaps) - gaps[0]
    lo, hi = lengths
    trace = []
    for t in arrivals:
        adapter = None if num_adapters == 0 else min(int(rng.power(alpha) * num_adapters), num_adapters - 1)
        prompt = rng.integers(0, vocab, rng.integers(lo, hi + 1)).tolist()
        trace.append((float(t), prompt, int(rng.integers(lo, hi + 1)), adapter))
    return trace


def write_adapters(config, root, count, rank, seed=0):
    """`count` random PEFT adapters on q, k, v and o, on disk; returns their paths."""
    from safetensors.numpy import save_file
    rng = np.random.default_rng(seed)
    dims = {"q_proj": (config.hidden_size, config.q_dim), "k_proj": (config.hidden_size, config.kv_dim),
            "v_proj": (config.hidden_size, config.kv_dim), "o_proj": (config.q_dim, config.hidden_size)}
    paths = []
    for i in range(count):
        path = os.path.join(root, f"a{i}")
        os.makedirs(path, exist_ok=True)
        t = {}
        for layer in range(config.num_layers):
            for m, (d_in, d_out) in dims.items():
                key = f"base_model.model.model.layers.{layer}.self_attn.{m}"
                t[f"{key}.lora_A.weight"] = rng.normal(0, 0.02, (rank, d_in)).astype(np.float32)
                t[f"{key}.lora_B.weight"] = rng.normal(0, 0.02, (d_out, rank)).astype(np.float32)
        save_file(t, os.path.join(path, "adapter_model.safetensors"))
        with open(os.path.join(path, "adapter_config.json"), "w") as f:
            json.dump({"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGETS)}, f)
        paths.append(path)
    return paths
