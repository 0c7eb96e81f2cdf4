"""The Mosaic GPU shrink and expand (interpret mode on the CPU) against the float32 references, on fresh random inputs.

Set JLORA_MOSAIC_GPU_BACKEND=mosaic_gpu on a Hopper GPU to run the same tests against the compiled kernels.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import pallas_kernels as pk
from conftest import POPULARITY, assert_close, popularity_ids
from pallas_kernels import dispatch, mosaic_gpu_lora, triton_lora, xla
from test_lora_ops import SLOTS, make_group, rel_err_np

BACKEND = os.environ.get("JLORA_MOSAIC_GPU_BACKEND", "interpret_mosaic_gpu")


@pytest.fixture
def mosaic_only(monkeypatch):
  """Fails any call that would leave the Mosaic kernels for the Triton ones or XLA's gather expand."""
  def refuse(*args, **kwargs):
    raise AssertionError("left the Mosaic GPU kernels")

  for module, name in ((triton_lora, "shrink"), (triton_lora, "expand"), (xla, "gather_lora_expand")):
    monkeypatch.setattr(module, name, refuse)


def _group(x, a, bs, y, ids, layer=None, decode_expand="triton"):
  meta = pk.segment_metadata(ids, backend=BACKEND)
  v = pk.lora_shrink(x, a, ids, meta=meta, backend=BACKEND, layer=layer)
  return v, pk.lora_expand(y, v, bs, ids, meta=meta, backend=BACKEND, layer=layer, decode_expand=decode_expand)


def close(out, ref, dtype, what):
  """conftest's dtype-aware check; float16 (10 mantissa bits against bfloat16's 7) gets its own tolerance."""
  if jnp.dtype(dtype) != jnp.float16:
    return assert_close(out, ref, dtype, what)
  out, ref = np.asarray(out, np.float32), np.asarray(ref, np.float32)
  assert np.linalg.norm(out - ref) / np.linalg.norm(ref) < 2e-3, what
  np.testing.assert_allclose(out, ref, rtol=2e-3, atol=5e-3 * np.abs(ref).max(), err_msg=what)


def check(ids, dtype=jnp.bfloat16, d_in=128, rank=16, dims=(128,), seed=0):
  """shrink (fp32 tolerance: it accumulates in fp32 whatever the inputs) and expand (y's dtype) against the
  references; rows of slot -1 exactly 0 and exactly y."""
  ids = jnp.asarray(ids, jnp.int32)
  x, a, bs, y = make_group(jax.random.key(seed), ids.shape[0], d_in, rank, dims, dtype)
  v, out = jax.jit(_group)(x, a, bs, y, ids)
  assert v.dtype == jnp.float32 and v.shape == (ids.shape[0], rank * len(dims))
  assert_close(v, pk.ref_lora_shrink(x, a, ids), jnp.float32, "shrink")
  assert out.dtype == y.dtype and out.shape == y.shape
  close(out, pk.ref_lora_expand(y, v, bs, ids), dtype, "expand")
  off = np.asarray(ids) < 0
  np.testing.assert_array_equal(np.asarray(v)[off], 0.0)
  np.testing.assert_array_equal(np.asarray(out, np.float32)[off], np.asarray(y, np.float32)[off])
  if not off.all():
    assert rel_err_np(out, y) > 1e-2, "the delta is negligible: the check would pass on y"


@pytest.mark.parametrize("tokens", [1, 7, 133])
def test_popularity_and_odd_token_counts(mosaic_only, tokens):
  """Every popularity at T = 7 (6 tiles in one block: three passes of the shrink's 2 tiles per pass over x) and 133
  (three 64-row blocks, the last partial), with a slot -1 token; then every token at -1. One token has one slot
  whatever the popularity, so T = 1 checks two."""
  rng = np.random.default_rng(tokens)
  for i, kind in enumerate(POPULARITY if tokens > 1 else ("distinct", "skewed")):
    ids = popularity_ids(rng, tokens, SLOTS, kind)
    if tokens > 1:
      ids[i % tokens] = -1
    check(ids, seed=i)
  check(np.full(tokens, -1, np.int32), seed=9)


def test_float16(mosaic_only):
  """bfloat16 is every other test's dtype."""
  check(popularity_ids(np.random.default_rng(1), 7, SLOTS, "uniform"), dtype=jnp.float16, seed=1)


@pytest.mark.parametrize("rank", [16, 32, 64, 128])
def test_rank_buckets(mosaic_only, rank):
  """Rank 128 in a two-slice group: R = 256 is two 128-column blocks of the shrink."""
  dims = (64, 64) if rank == 128 else (128,)
  check(popularity_ids(np.random.default_rng(rank), 7, SLOTS, "zipf"), rank=rank, dims=dims, seed=rank)


def test_fused_unequal_widths_and_minus_one_rows(mosaic_only):
  """qkv under GQA: one shrink to 3r, three B's of widths 128, 64, 32; runs of -1 inside and at the end."""
  ids = popularity_ids(np.random.default_rng(3), 60, SLOTS, "uniform")
  ids[5:9] = -1
  ids[52:] = -1
  check(ids, dims=(128, 64, 32), seed=3)


@pytest.mark.parametrize("dtype,rank", [(jnp.float32, 16), (jnp.bfloat16, 8)])
def test_shapes_outside_wgmma_take_the_triton_kernels(monkeypatch, dtype, rank):
  """float32 (TF32 on the tensor cores) and rank 8 (under wgmma's 32-byte tile) run the Triton-backend kernels, in
  the same mode, and never the Mosaic ones."""
  def refuse(*args, **kwargs):
    raise AssertionError("the Mosaic kernel took a shape it does not support")

  monkeypatch.setattr(mosaic_gpu_lora, "shrink", refuse)
  monkeypatch.setattr(mosaic_gpu_lora, "expand", refuse)
  rng = np.random.default_rng(8)
  check(popularity_ids(rng, 40, SLOTS, "skewed"), dtype=dtype, rank=rank, seed=8)


@pytest.mark.parametrize("layer", [0, 2])
def test_stacked_bank_at_a_traced_layer(mosaic_only, layer):
  """layer= on stacked [L, S, ...] banks, a traced index, equals the call on that layer's slice."""
  num_layers, tokens = 3, 37
  groups = [make_group(k, tokens, 128, 16, (128, 64), jnp.bfloat16)
            for k in jax.random.split(jax.random.key(layer + 10), num_layers)]
  a = jnp.stack([g[1] for g in groups])
  bs = tuple(jnp.stack([g[2][j] for g in groups]) for j in range(2))
  x, y = groups[0][0], groups[0][3]
  ids = jnp.asarray(popularity_ids(np.random.default_rng(layer), tokens, SLOTS, "uniform")).at[:3].set(-1)
  v, out = jax.jit(_group)(x, a, bs, y, ids, jnp.int32(layer))
  v_ref = pk.ref_lora_shrink(x, a[layer], ids)
  assert_close(v, v_ref, jnp.float32, "stacked shrink")
  assert_close(out, pk.ref_lora_expand(y, v, tuple(b[layer] for b in bs), ids), jnp.bfloat16, "stacked expand")
  other = pk.ref_lora_shrink(x, a[(layer + 1) % num_layers], ids)
  assert np.linalg.norm(np.asarray(v - other)) > 0.1 * np.linalg.norm(np.asarray(v_ref)), "read the wrong layer"


def test_model_call_decode_partials_to_gather_expand(monkeypatch):
  """The model's call on a stacked bank at a decode-sized step with `decode_expand="gather"` (the default): the
  Mosaic shrink's partial sums go to XLA's gather expand. (The tiled expand in this call: the forward test.)"""
  monkeypatch.setattr(triton_lora, "shrink", lambda *a, **k: (_ for _ in ()).throw(AssertionError("triton")))
  tokens = 24
  groups = [make_group(k, tokens, 128, 16, (128, 64), jnp.bfloat16) for k in jax.random.split(jax.random.key(7), 2)]
  a = jnp.stack([g[1] for g in groups])
  bs = tuple(jnp.stack([g[2][j] for g in groups]) for j in range(2))
  x, y = groups[0][0], groups[0][3]
  ids = jnp.asarray(popularity_ids(np.random.default_rng(3), tokens, SLOTS, "zipf")).at[-2:].set(-1)
  out = jax.jit(lambda x, y, ids, i: pk.lora_shrink_expand(x, y, a, bs, ids, backend=BACKEND, layer=i,
                                                           decode_expand="gather"))(x, y, ids, jnp.int32(1))
  b1 = tuple(b[1] for b in bs)
  want = pk.ref_lora_expand(y, pk.ref_lora_shrink(x, a[1], ids), b1, ids)
  assert out.dtype == y.dtype
  assert_close(out, want, jnp.bfloat16, "model call")
  assert rel_err_np(want, y) > 1e-2
  np.testing.assert_array_equal(np.asarray(out[-2:], np.float32), np.asarray(y[-2:], np.float32))


def test_split_d_in_partial_sums(mosaic_only):
  """k_splits programs per row block share d_in: split s holds the sum over its share of d_in (slot -1 rows 0)."""
  ids = popularity_ids(np.random.default_rng(12), 40, SLOTS, "zipf")
  ids[3] = -1
  ids = jnp.asarray(ids)
  x, a, _, _ = make_group(jax.random.key(12), 40, 256, 16, (128,), jnp.bfloat16)
  meta = pk.segment_metadata(ids, backend=BACKEND)
  parts = mosaic_gpu_lora.shrink(x, a, meta, interpret=BACKEND.startswith("interpret"), k_splits=2,
                                 sum_splits=False)
  assert parts.shape == (2, 40, 16) and parts.dtype == jnp.float32
  assert_close(parts.sum(0), pk.ref_lora_shrink(x, a, ids), jnp.float32, "summed splits")
  assert_close(parts[1], pk.ref_lora_shrink(x[:, 128:], a[:, 128:], ids), jnp.float32, "second half of d_in")
  np.testing.assert_array_equal(np.asarray(parts[:, 3]), 0.0)


def test_block_bounds_hand_checked():
  """Row block b's tiles are entries [bounds[b], bounds[b+1]); a block of only -1 rows has none."""
  ids = np.concatenate([np.full(70, 2), np.full(58, -1), np.full(10, 0), np.full(5, 4)]).astype(np.int32)
  meta = jax.jit(lambda i: pk.segment_metadata(i, backend=BACKEND))(jnp.asarray(ids))
  assert meta.block_t == 64 and meta.aligned
  bounds = np.asarray(jax.jit(mosaic_gpu_lora.block_bounds, static_argnums=1)(meta, 3))
  # tiles: [0, 64) slot 2 | [64, 70) slot 2 | block 1 has no tiles | [128, 138) slot 0, [138, 143) slot 4
  np.testing.assert_array_equal(bounds, [0, 1, 2, 4])
  np.testing.assert_array_equal(np.asarray(meta.tile_lo)[:4], [0, 64, 128, 138])


def test_meta_of_another_backend_is_refused():
  x = jax.ShapeDtypeStruct((16, 128), jnp.bfloat16)
  a = jax.ShapeDtypeStruct((SLOTS, 128, 16), jnp.bfloat16)
  ids = jax.ShapeDtypeStruct((16,), jnp.int32)
  meta = jax.eval_shape(lambda i: pk.segment_metadata(i, backend="interpret"), ids)
  with pytest.raises(ValueError, match="block_t=64"):
    jax.eval_shape(lambda x, a, i, m: pk.lora_shrink(x, a, i, meta=m, backend=BACKEND), x, a, ids, meta)
  assert dispatch.resolve_backend(BACKEND) == BACKEND


def test_model_forward_through_runtime_config(monkeypatch, tmp_path):
  """RuntimeConfig(lora_backend=...) routes a bf16 model's every LoRA group through the Mosaic kernels (a rank-16
  bucket, stacked bank read at the scanned layer): logits match the reference backend's."""
  from helpers import write_adapter, write_model
  from jlora.checkpoint.hf import load_hf_dir
  from jlora.config import LoraBankConfig, ModelConfig, RuntimeConfig
  from jlora.lora.loader import bank_from_peft
  from jlora.model import KVCache, forward

  traced = []
  for name in ("shrink", "expand"):
    kernel = getattr(mosaic_gpu_lora, name)
    monkeypatch.setattr(mosaic_gpu_lora, name, lambda *a, _k=kernel, _n=name, **kw: traced.append(_n) or _k(*a, **kw))
  cfg = ModelConfig(vocab_size=97, hidden_size=64, intermediate_size=128, num_layers=2, num_heads=4, num_kv_heads=2,
                    head_dim=16, max_position_embeddings=128, rope_theta=10000.0)
  config, params = load_hf_dir(write_model(str(tmp_path / "m"), cfg), dtype=jnp.bfloat16)
  bank, slot = bank_from_peft(config, {"a": write_adapter(str(tmp_path / "a"), cfg, r=16, seed=1, std=0.3),
                                       "b": write_adapter(str(tmp_path / "b"), cfg, r=12, seed=2, std=0.3)},
                              bank_config=LoraBankConfig(buckets=(16,), slots=(2,)), dtype=jnp.bfloat16)
  rng = np.random.default_rng(0)
  tokens = jnp.asarray(rng.integers(0, cfg.vocab_size, (3, 5)), jnp.int32)
  positions = jnp.broadcast_to(jnp.arange(5, dtype=jnp.int32), (3, 5))
  ids = jnp.asarray(np.repeat(np.array([slot["a"], slot["b"], -1])[:, None], 5, 1), jnp.int32)

  def logits(bank, backend):
    runtime = RuntimeConfig(lora_backend=backend, decode_expand="triton")
    run = jax.jit(lambda p: forward(p, bank, tokens, positions, ids, KVCache.zeros(config, 3, 8, jnp.bfloat16),
                                    config=config, runtime=runtime)[0])
    return np.asarray(run(params), np.float32)

  got, want = logits(bank, BACKEND), logits(bank, "reference")
  assert sorted(set(traced)) == ["expand", "shrink"] and len(traced) == 8  # 4 groups, one scanned layer body
  assert_close(got, want, jnp.bfloat16, "logits")
  assert rel_err_np(want, logits(None, "reference")) > 0.1  # the adapters matter
