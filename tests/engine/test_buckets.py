"""The runner's step shapes: every shape a step can take is in `bucket_shapes` (what `warmup` compiles), prefill
rows stay within the row budget, and page tables take the widths `page_buckets` allows."""

import jax
import jax.numpy as jnp
import pytest
from helpers import TINY

from jlora.engine.model_runner import ModelRunner, bucket
from jlora.model import init_params


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0), jnp.float32)


def _runner(params, **kw):
    return ModelRunner(TINY, params, num_pages=64, page_size=4, max_model_len=256, max_num_seqs=64, **kw)


@pytest.mark.parametrize("any_width", [False, True])
def test_bucket_shapes_cover_what_steps_can_take(params, any_width):
    runner = _runner(params, max_num_batched_tokens=100, max_prefill_chunk=64, decode_steps=4)
    runner.decode_any_width = any_width
    shapes = set(runner.bucket_shapes(64))
    assert runner.prefill_row_budget == max(bucket(100), 8 * 64) == 512
    for num_seqs in range(1, 65):
        for longest in range(1, 65):
            if num_seqs > 1 and not runner.prefill_fits(num_seqs, longest):
                continue
            B, T = bucket(num_seqs, 8), bucket(longest, 16)
            assert B * T <= 512
            for widest in range(1, 65):
                P = next(p for p in runner.page_buckets("prefill", T) if p >= widest)
                assert ("prefill", B, T, P) in shapes
    for mode in ("decode", "decode_loop_greedy", "decode_loop"):
        widths = {P for m, B, T, P in shapes if m == mode}
        assert widths == ({64} if any_width else {8, 16, 32, 64})
    # a fresh prompt's table is as wide as its chunk bucket; a longer context takes the widest
    assert runner.page_buckets("prefill", 64) == [16, 64] and runner.page_buckets("prefill", 16) == [8, 64]
    prefill = [s for s in shapes if s[0] == "prefill"]
    assert len(prefill) == sum(2 for b in (8, 16, 32, 64) for t in (16, 32, 64) if b * t <= 512)


def test_without_a_token_budget_every_prefill_shape_exists(params):
    runner = _runner(params)
    assert runner.prefill_row_budget is None and runner.prefill_fits(64, 512)
    prefill = {(B, T) for m, B, T, P in runner.bucket_shapes(64) if m == "prefill"}
    assert prefill == {(b, t) for b in (8, 16, 32, 64) for t in (16, 32, 64)}
