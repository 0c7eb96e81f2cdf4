"""Shrink and expand kernels against the float32 references, on fresh random inputs."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

import pallas_kernels as pk
from conftest import POPULARITY, assert_close, popularity_ids, rand

SLOTS = 6


def _group(x, a, bs, y, ids, backend, decode_expand):
  """One fused group: v = shrink(x), y_out = expand(y, v); metadata built once per call."""
  meta = pk.segment_metadata(ids, backend=backend)
  v = pk.lora_shrink(x, a, ids, meta=meta, backend=backend)
  return v, pk.lora_expand(y, v, bs, ids, meta=meta, backend=backend, decode_expand=decode_expand)


_group_jit = jax.jit(_group, static_argnames=("backend", "decode_expand"))


def run_group(backend, x, a, bs, y, ids, jit=True, decode_expand="triton"):
  """The tiled Triton expand at every size by default (decode-sized GPU steps would otherwise take XLA's
  gather-einsum); the tests of that choice pass decode_expand themselves."""
  return (_group_jit if jit else _group)(x, a, bs, y, ids, backend=backend, decode_expand=decode_expand)


def make_group(key, tokens, d_in, rank, dims, dtype, slots=SLOTS):
  """Fresh random x [T, d_in], a [S, d_in, n*r], b_j [S, r, d_j], y [T, sum d_j]."""
  kx, ka, kb, ky = jax.random.split(key, 4)
  x = rand(kx, (tokens, d_in), dtype)
  a = rand(ka, (slots, d_in, rank * len(dims)), dtype, d_in ** -0.5)
  bs = tuple(rand(k, (slots, rank, d), dtype, 0.5) for k, d in
             zip(jax.random.split(kb, len(dims)), dims))
  y = rand(ky, (tokens, sum(dims)), dtype)
  return x, a, bs, y


def check_group(backend, ids, dtype=jnp.float32, d_in=128, rank=16, dims=(128,), seed=0, decode_expand="triton"):
  """Shapes default to one shared set, so most tests reuse one compiled program per backend."""
  ids = jnp.asarray(ids, jnp.int32)
  x, a, bs, y = make_group(jax.random.key(seed), ids.shape[0], d_in, rank, dims, dtype)
  v, out = run_group(backend, x, a, bs, y, ids, decode_expand=decode_expand)
  v_ref = pk.ref_lora_shrink(x, a, ids)
  assert v.dtype == jnp.float32 and v.shape == v_ref.shape
  assert_close(v, v_ref, jnp.float32, "shrink")  # accumulated in float32 whatever the inputs: fp32 tolerance
  # Expand is checked against the reference applied to the kernel's own v, so its error is its own.
  assert out.dtype == y.dtype
  assert_close(out, pk.ref_lora_expand(y, v, bs, ids), dtype, "expand")
  off = np.asarray(ids) < 0
  np.testing.assert_array_equal(np.asarray(v)[off], 0.0)
  np.testing.assert_array_equal(np.asarray(out, np.float32)[off], np.asarray(y, np.float32)[off])


@pytest.mark.parametrize("tokens", [1, 7, 133])
def test_popularity_and_odd_token_counts(backend, tokens):
  rng = np.random.default_rng(tokens)
  for i, kind in enumerate(POPULARITY):
    check_group(backend, popularity_ids(rng, tokens, SLOTS, kind), seed=i)


@pytest.mark.parametrize("variant", ["triton", "gather"])
def test_decode_expand_variants(backend, variant):
  """The decode-sized expand variants (`decode_expand=`) through the public ops: every popularity, ranks 8
  and 16, fused unequal slices, and no-adapter tokens left untouched."""
  rng = np.random.default_rng(5)
  for i, kind in enumerate(POPULARITY):
    ids = popularity_ids(rng, 7 if i % 2 else 133, SLOTS, kind)
    ids[1] = -1
    check_group(backend, ids, dtype=jnp.bfloat16, rank=8 if i % 2 else 16, dims=(128, 64), seed=i,
                decode_expand=variant)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_dtypes(backend, dtype):
  rng = np.random.default_rng(1)
  check_group(backend, popularity_ids(rng, 48, SLOTS, "uniform"), dtype=dtype)


@pytest.mark.parametrize("rank", [8, 16, 32, 64, 128])
def test_ranks(backend, rank):
  rng = np.random.default_rng(rank)
  check_group(backend, popularity_ids(rng, 48, SLOTS, "zipf"), rank=rank, dtype=jnp.bfloat16)


def test_fused_three_slices_unequal_widths(backend):
  """qkv under GQA: one shrink to 3r, three B's with different d_out."""
  rng = np.random.default_rng(3)
  ids = popularity_ids(rng, 40, SLOTS, "uniform")
  ids[5:9] = -1
  check_group(backend, ids, d_in=256, rank=16, dims=(256, 128, 128), dtype=jnp.bfloat16)


def test_unaligned_widths(backend, monkeypatch):
  """Odd widths: masked in the Triton kernel; the Mosaic expand falls back to the dense XLA path, never to the
  reference it is checked against (the reference is poisoned here to prove it)."""
  rng = np.random.default_rng(4)
  ids = popularity_ids(rng, 19, SLOTS, "uniform")
  x, a, bs, y = make_group(jax.random.key(4), 19, 72, 8, (40, 24, 24), jnp.float32)
  want = pk.ref_lora_expand(y, pk.ref_lora_shrink(x, a, ids), bs, ids)
  from pallas_kernels import reference
  monkeypatch.setattr(reference, "ref_lora_expand", lambda *args: (_ for _ in ()).throw(AssertionError("oracle")))
  monkeypatch.setattr(reference, "ref_lora_shrink", lambda *args: (_ for _ in ()).throw(AssertionError("oracle")))
  _, out = run_group(backend, x, a, bs, y, jnp.asarray(ids), jit=False)
  assert_close(out, want, jnp.float32, "unaligned expand")
  assert rel_err_np(want, y) > 1e-2  # the delta is not negligible


def test_minus_one_tokens_untouched(backend):
  rng = np.random.default_rng(5)
  ids = popularity_ids(rng, 48, SLOTS, "uniform")
  ids[rng.random(48) < 0.4] = -1
  check_group(backend, ids)
  check_group(backend, np.full(48, -1, np.int32))


def test_unsorted_slot_ids(backend):
  rng = np.random.default_rng(6)
  ids = rng.integers(-1, SLOTS, 48).astype(np.int32)
  check_group(backend, ids)
  # meta=None: the op builds its own metadata.
  x, a, _, _ = make_group(jax.random.key(6), 48, 128, 16, (128,), jnp.float32)
  v = jax.jit(lambda x, a, i: pk.lora_shrink(x, a, i, backend=backend))(x, a, jnp.asarray(ids))
  assert_close(v, pk.ref_lora_shrink(x, a, jnp.asarray(ids)), jnp.float32, "shrink, meta=None")


def test_mixed_rank_buckets(backend):
  """Two buckets (r=8 and r=32) in one batch: one call per bucket, other tokens at -1."""
  rng = np.random.default_rng(7)
  tokens, d = 48, 128
  bucket = rng.integers(0, 2, tokens)  # which bucket each token's adapter lives in
  slot = rng.integers(0, SLOTS, tokens)
  order = np.lexsort((slot, bucket))
  bucket, slot = bucket[order], slot[order]
  ky, k8, k32 = jax.random.split(jax.random.key(7), 3)
  y = rand(ky, (tokens, d), jnp.bfloat16)
  x = rand(jax.random.key(70), (tokens, d), jnp.bfloat16)
  out, want = y, np.asarray(y, np.float32)
  for b, (r, key) in enumerate(((8, k8), (32, k32))):
    ids = jnp.asarray(np.where(bucket == b, slot, -1).astype(np.int32))
    _, a, bs, _ = make_group(key, tokens, d, r, (d,), jnp.bfloat16)
    _, out = run_group(backend, x, a, bs, out, ids)
    v_ref = pk.ref_lora_shrink(x, a, ids)
    delta = np.asarray(pk.ref_lora_expand(jnp.zeros((tokens, d)), v_ref, bs, ids))
    want = want + delta
  assert_close(out, want, jnp.bfloat16, "two buckets")


@st.composite
def segments(draw, tokens=48):
  """Runs of drawn slots and lengths (0: an empty segment), cut or padded with -1 to `tokens`."""
  runs = draw(st.lists(st.tuples(st.integers(-1, SLOTS - 1), st.integers(0, 20)), min_size=1,
                       max_size=10))
  ids = [slot for slot, length in runs for _ in range(length)][:tokens]
  return np.array(ids + [-1] * (tokens - len(ids)), np.int32)


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ids=segments(), seed=st.integers(0, 2**16))
def test_drawn_segments(backend, ids, seed):
  check_group(backend, ids, seed=seed)


@pytest.mark.parametrize("layer", [0, 2])
def test_stacked_bank_read_in_place_at_a_traced_layer(backend, layer):
  """layer= on a stacked [L, S, ...] bank equals the per-layer call on that layer's slice."""
  num_layers, tokens = 3, 37
  keys = jax.random.split(jax.random.key(layer + 10), num_layers)
  groups = [make_group(k, tokens, 128, 16, (256, 128, 128), jnp.float32) for k in keys]
  a = jnp.stack([g[1] for g in groups])
  bs = tuple(jnp.stack([g[2][j] for g in groups]) for j in range(3))
  x, y = groups[0][0], groups[0][3]
  ids = jnp.asarray(popularity_ids(np.random.default_rng(layer), tokens, SLOTS, "uniform"))
  ids = ids.at[:3].set(-1)

  @jax.jit
  def run(x, a, bs, y, ids, i):
    meta = pk.segment_metadata(ids, backend=backend)
    v = pk.lora_shrink(x, a, ids, meta=meta, backend=backend, layer=i)
    return v, pk.lora_expand(y, v, bs, ids, meta=meta, backend=backend, layer=i, decode_expand="triton")

  v, out = run(x, a, bs, y, ids, jnp.int32(layer))
  v_ref = pk.ref_lora_shrink(x, a[layer], ids)
  assert_close(v, v_ref, jnp.float32, "stacked shrink")
  assert_close(out, pk.ref_lora_expand(y, v, tuple(b[layer] for b in bs), ids), jnp.float32, "stacked expand")
  other = pk.ref_lora_shrink(x, a[(layer + 1) % num_layers], ids)
  assert np.linalg.norm(np.asarray(v - other)) > 0.1 * np.linalg.norm(np.asarray(v_ref)), "read the wrong layer"
  with pytest.raises(ValueError, match="stacked"):
    pk.lora_shrink(x, a[0], ids, backend=backend, layer=0)


@pytest.mark.parametrize("decode_expand", ["triton", "gather"])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_fused_group_with_split_d_in(backend, dtype, decode_expand):
  """lora_shrink_expand (the model's call) equals the reference; d_in=2048 at T=24 makes the Triton shrink split
  d_in over programs per tile, whose partial sums the expand adds up: each decode expand variant
  (`decode_expand=`: the tiled kernel, XLA's gather-einsum)."""
  tokens, num_layers = 24, 2
  keys = jax.random.split(jax.random.key(7), num_layers)
  groups = [make_group(k, tokens, 2048, 16, (256, 128), dtype) for k in keys]
  a = jnp.stack([g[1] for g in groups])
  bs = tuple(jnp.stack([g[2][j] for g in groups]) for j in range(2))
  x, y = groups[0][0], groups[0][3]
  ids = jnp.asarray(popularity_ids(np.random.default_rng(3), tokens, SLOTS, "zipf")).at[-2:].set(-1)
  out = jax.jit(lambda x, y, ids: pk.lora_shrink_expand(x, y, a, bs, ids, backend=backend, layer=1,
                                                        decode_expand=decode_expand))(x, y, ids)
  b1 = tuple(b[1] for b in bs)
  want = pk.ref_lora_expand(y, pk.ref_lora_shrink(x, a[1], ids), b1, ids)
  assert out.dtype == y.dtype
  assert_close(out, want, dtype, "fused group")
  assert rel_err_np(want, y) > 1e-2  # the delta is not negligible
  np.testing.assert_array_equal(np.asarray(out[-2:], np.float32), np.asarray(y[-2:], np.float32))


def test_prefill_sized_step(backend):
  """T > 256 takes the prefill tiling (the shrink splits d_in 4 ways on Triton): one long segment, short ones and
  no-adapter tokens, through the public ops and the model's fused call."""
  tokens = 300
  x, a, bs, y = make_group(jax.random.key(11), tokens, 2048, 16, (256, 128), jnp.bfloat16)
  ids = jnp.asarray(np.concatenate([np.full(220, 1), np.full(7, -1), np.full(40, 3), np.arange(33) % SLOTS]),
                    jnp.int32)
  v, out = run_group(backend, x, a, bs, y, ids)
  assert_close(v, pk.ref_lora_shrink(x, a, ids), jnp.float32, "prefill shrink")  # float32 accumulation
  assert_close(out, pk.ref_lora_expand(y, v, bs, ids), jnp.bfloat16, "prefill expand")
  fused = jax.jit(lambda x, y, ids: pk.lora_shrink_expand(x, y, a, bs, ids, backend=backend))(x, y, ids)
  assert_close(fused, pk.ref_lora_expand(y, pk.ref_lora_shrink(x, a, ids), bs, ids), jnp.bfloat16, "prefill group")
  np.testing.assert_array_equal(np.asarray(fused[220:227], np.float32), np.asarray(y[220:227], np.float32))


def rel_err_np(a, b):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


def test_validation_errors():
  x = jnp.ones((4, 8))
  a = jnp.ones((2, 8, 4))
  ids = jnp.zeros((4,), jnp.int32)
  with pytest.raises(ValueError, match="x must be"):
    pk.lora_shrink(x[0], a, ids)
  with pytest.raises(ValueError, match="d_in"):
    pk.lora_shrink(x, jnp.ones((2, 9, 4)), ids)
  with pytest.raises(ValueError, match="slot_ids"):
    pk.lora_shrink(x, a, ids[:3])
  with pytest.raises(ValueError, match="b_slices"):
    pk.lora_expand(jnp.ones((4, 8)), jnp.ones((4, 4)), (jnp.ones((2, 4, 4)),), ids)
  with pytest.raises(ValueError, match="multiple of len"):
    pk.lora_expand(jnp.ones((4, 8)), jnp.ones((4, 5)), (jnp.ones((2, 2, 4)),) * 2, ids)
  with pytest.raises(ValueError, match="backend"):
    pk.lora_shrink(x, a, ids, backend="cuda-magic")
  with pytest.raises(ValueError, match="meta"):
    pk.lora_shrink(x, a, ids, meta=pk.segment_metadata(jnp.zeros((5,), jnp.int32)),
                   backend="interpret")


def test_backend_is_an_argument_not_the_environment(monkeypatch):
  """The kernels read no environment variable: only the argument, or the platform for None / "auto"."""
  monkeypatch.setenv("JLORA_LORA_BACKEND", "reference")
  platform = {"cpu": "xla", "gpu": "triton", "cuda": "triton", "tpu": "mosaic"}[jax.default_backend()]
  assert pk.resolve_backend(None) == platform and pk.resolve_backend("auto") == platform
  assert pk.resolve_backend("interpret") == "interpret"
  with pytest.raises(ValueError, match="decode_expand"):
    pk.lora_expand(jnp.ones((4, 8)), jnp.ones((4, 4)), (jnp.ones((2, 4, 8)),), jnp.zeros((4,), jnp.int32),
                   backend="interpret", decode_expand="fancy")


def test_reference_hand_checked():
  x = jnp.array([[1.0, 2.0], [3.0, 4.0], [5.0, 6.0]])
  a = jnp.array([[[1.0], [0.0]], [[0.0], [1.0]]])  # slot 0 picks x[:, 0], slot 1 picks x[:, 1]
  ids = jnp.array([1, -1, 0], jnp.int32)
  np.testing.assert_array_equal(pk.ref_lora_shrink(x, a, ids), [[2.0], [0.0], [5.0]])
  b = (jnp.array([[[1.0, 1.0]], [[2.0, 0.0]]]), jnp.array([[[3.0]], [[4.0]]]))
  v = jnp.array([[1.0, 1.0], [9.0, 9.0], [1.0, 2.0]])
  y = jnp.zeros((3, 3))
  np.testing.assert_array_equal(pk.ref_lora_expand(y, v, b, ids),
                                [[2.0, 0.0, 4.0], [0.0, 0.0, 0.0], [1.0, 1.0, 6.0]])
