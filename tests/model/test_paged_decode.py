"""Paged attention through the GPU kernels (interpret mode here: JAX's Pallas Triton paged decode, jlora's Mosaic
GPU decode and prefill) equals the XLA path."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from helpers import TINY, rel_err

from jlora.config import RuntimeConfig
from jlora.model import KVCache, attention, forward, init_params


def _decode_logits(runtime, params, table, tokens, positions, lens, steps=4):
    B = len(lens)
    cache = KVCache.pages(TINY, 32, 4)
    prefill = jax.jit(lambda c, t, p: forward(params, None, t, p, None, c, config=TINY, page_table=table,
                                              runtime=runtime))
    decode = jax.jit(lambda c, t, p: forward(params, None, t, p, None, c, config=TINY, page_table=table,
                                             logit_index=jnp.zeros((B,), jnp.int32), runtime=runtime))
    _, cache = prefill(cache, tokens, positions)
    token, out = tokens[np.arange(B), lens - 1][:, None], []
    for i in range(steps):
        pos = (lens + i)[:, None].astype(np.int32)
        if i == 0:
            pos[-1, 0] = -1  # a padding row: writes nothing, its output is never used
        logits, cache = decode(cache, jnp.asarray(token), jnp.asarray(pos))
        out.append(np.asarray(logits))
        token = out[-1].argmax(-1)[:, None].astype(np.int32)
    return np.stack(out)


# The deprecated kernel is jlora's fallback (RuntimeConfig(attention="pallas")), never the default: its import warns.
@pytest.mark.filterwarnings("ignore:jax.experimental.pallas.ops.gpu.paged_attention is deprecated")
@pytest.mark.parametrize("programs", [1, 512])  # no split (8 pages per block) and an 8-way split
def test_pallas_paged_decode_matches_xla(programs):
    rng = np.random.default_rng(0)
    params = init_params(TINY, jax.random.key(0), jnp.float32)
    lens = np.array([5, 13, 2])
    table = jnp.asarray(rng.permutation(32)[:24].reshape(3, 8), jnp.int32)  # disjoint pages per row
    tokens = rng.integers(0, TINY.vocab_size, (3, 16)).astype(np.int32)
    positions = np.where(np.arange(16)[None] < lens[:, None], np.arange(16)[None], -1).astype(np.int32)
    want = _decode_logits(RuntimeConfig(attention="xla"), params, table, tokens, positions, lens)
    mode = "pallas" if jax.default_backend() == "gpu" else "interpret"  # compiled on a GPU
    got = _decode_logits(RuntimeConfig(attention=mode, decode_attention_programs=programs), params, table, tokens,
                         positions, lens)
    # Every step of the real rows (the padded row's garbage token then differs, so it is not compared).
    assert rel_err(got[:, :2], want[:, :2]) < 1e-5
    assert np.abs(want[:, :2]).max() > 0.05 and rel_err(want[0, :2], want[1, :2]) > 1e-3  # not trivially equal


def test_paged_backend_choice():
    pallas, mosaic = RuntimeConfig(attention="pallas"), RuntimeConfig(attention="mosaic")
    assert attention.paged_backend(TINY, 1, pallas) == "pallas"
    assert attention.paged_backend(TINY, 16, pallas) == "xla"  # the Triton kernel is decode-only
    # TINY's head_dim (8) is not a Mosaic kernel's; 8B-style heads in bf16 are, float32 pages are not.
    assert attention.paged_backend(TINY, 16, mosaic) == "xla"
    heads = dict(num_heads=32, num_kv_heads=8)
    big = dataclasses.replace(TINY, num_heads=32, num_kv_heads=8, head_dim=128)
    assert attention.paged_backend(big, 16, mosaic, **heads) == "mosaic"
    assert attention.paged_backend(big, 1, mosaic, **heads, dtype=jnp.float32) == "xla"
    assert attention.paged_backend(big, 1, mosaic, **heads, page_size=4) == "xla"
    gpu = jax.default_backend() == "gpu"
    assert attention.paged_backend(big, 1, RuntimeConfig(), **heads) == ("mosaic" if gpu else "xla")
    with pytest.raises(ValueError, match="JLORA_ATTENTION"):
        RuntimeConfig.from_env({"JLORA_ATTENTION": "flash"})


def test_soft_capped_and_per_layer_sliding_models_attend_on_xla():
    """The GPU kernels take neither attention soft-capping nor a window that differs by layer (Gemma 2): such steps
    run on XLA, whose output the golden tests check against transformers through the engine."""
    heads = dict(num_heads=32, num_kv_heads=8)
    big = dataclasses.replace(TINY, num_heads=32, num_kv_heads=8, head_dim=128, query_pre_attn_scalar=144.0)
    capped = dataclasses.replace(big, attn_logit_softcap=50.0)
    alternating = dataclasses.replace(big, sliding_window=64, sliding_layers=(True, False))
    for runtime in (RuntimeConfig(attention="mosaic"), RuntimeConfig(attention="pallas")):
        assert attention.paged_backend(big, 1, runtime, **heads) != "xla"  # a query scale alone the kernels take
        assert attention.paged_backend(capped, 1, runtime, **heads) == "xla"
        assert attention.paged_backend(alternating, 1, runtime, **heads) == "xla"


def test_decode_partitions():
    # Large batches are not split and read 8 pages per block; small ones split until there are programs enough.
    assert attention.decode_partitions(64, 8, 32, 512) == (1, 8)
    assert attention.decode_partitions(32, 8, 32, 512) == (2, 8)
    assert attention.decode_partitions(8, 8, 128, 512) == (8, 8)
    assert attention.decode_partitions(2, 8, 128, 512) == (16, 8)  # at most 16 partitions
    assert attention.decode_partitions(2, 8, 16, 512) == (16, 1)  # the split stops at the page-table width
    assert attention.decode_partitions(1, 8, 4, 512) == (4, 1)


def test_mosaic_kernels_match_xla_in_the_model():
    """Chunked prefill (a second chunk over cached pages) then decode, through jlora's Mosaic GPU kernels (interpret
    mode here, compiled on a GPU) in a bf16 model with 64-wide heads, equals the XLA path; a padding row included."""
    config = dataclasses.replace(TINY, hidden_size=128, num_heads=4, num_kv_heads=2, head_dim=64, num_layers=2)
    params = init_params(config, jax.random.key(1), jnp.bfloat16, std=0.05)
    rng = np.random.default_rng(2)
    B, page, chunk = 3, 8, 8
    table = jnp.asarray(rng.permutation(16)[:12].reshape(B, 4), jnp.int32)
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (B, 2 * chunk)), jnp.int32)
    lens = np.array([13, 16, 0])  # row 2 is padding throughout

    def run(mode):
        runtime = RuntimeConfig(attention=mode)
        step = jax.jit(lambda c, t, p: forward(params, None, t, p, None, c, config=config, page_table=table,
                                               runtime=runtime))
        cache, out = KVCache.pages(config, 16, page, jnp.bfloat16), []
        for c in range(2):  # two prefill chunks
            pos = np.arange(c * chunk, (c + 1) * chunk)[None].repeat(B, 0)
            pos = np.where(pos < lens[:, None], pos, -1).astype(np.int32)
            logits, cache = step(cache, tokens[:, c * chunk:(c + 1) * chunk], jnp.asarray(pos))
            out.append(np.asarray(logits, np.float32)[pos >= 0])  # padding queries' logits are meaningless
        token = np.asarray(tokens[:, :1])
        for i in range(2):  # decode steps
            pos = np.where(lens > 0, lens + i, -1)[:, None].astype(np.int32)
            logits, cache = step(cache, jnp.asarray(token), jnp.asarray(pos))
            out.append(np.asarray(logits, np.float32)[:2])
            token = np.asarray(logits, np.float32).argmax(-1).astype(np.int32)
        return out

    mode = "mosaic" if jax.default_backend() == "gpu" else "interpret_mosaic"
    want, got = run("xla"), run(mode)
    for w, g in zip(want, got):
        assert rel_err(g, w) < 3e-2
    assert rel_err(want[0][:5], want[1][:5]) > 1e-2  # the chunks' outputs differ: not trivially equal
