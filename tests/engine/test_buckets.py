"""The runner's step shapes (what `warmup` compiles) against hand-counted sets: prefill rows within the row budget,
page tables of the widths a step can need."""

import threading

import jax
import jax.numpy as jnp
import pytest
from helpers import TINY

from jlora.config import LoraBankConfig
from jlora.engine.compiles import compile_count
from jlora.engine.model_runner import ModelRunner
from jlora.lora.bank import init_bank
from jlora.model import init_params


@pytest.fixture(scope="module")
def params():
    return init_params(TINY, jax.random.key(0), jnp.float32)


def _runner(params, **kw):
    return ModelRunner(TINY, params, num_pages=64, page_size=4, max_model_len=256, max_num_seqs=64, **kw)


# The shapes of the runner below, written out by hand: pages of 4 tokens and 256-token sequences make page tables of
# at most 64 pages (the smallest bucket 8); a 100-token budget with 64-token chunks makes a 512-row prefill budget.
_PREFILL_512 = {(8, 16), (8, 32), (8, 64), (16, 16), (16, 32), (32, 16)}  # sequences x chunk tokens <= 512
_CHUNK_TABLE = {16: 8, 32: 8, 64: 16}  # a fresh chunk's table: its pages (T / 4), at least 8


@pytest.mark.parametrize("any_width", [False, True])
def test_bucket_shapes_are_the_hand_counted_set(params, any_width):
    runner = _runner(params, max_num_batched_tokens=100, max_prefill_chunk=64, decode_steps=4)
    runner.decode_any_width = any_width
    shapes = runner.bucket_shapes(64)
    assert len(shapes) == len(set(shapes))
    assert runner.prefill_row_budget == 512
    prefill = {(B, T, P) for B, T in _PREFILL_512 for P in (_CHUNK_TABLE[T], 64)}
    widths = (64,) if any_width else (8, 16, 32, 64)
    decode = {(m, B, 1, P) for m in ("decode", "decode_loop_greedy", "decode_loop", "decode_loop_logprobs")
              for B in (8, 16, 32, 64)
              for P in widths}
    assert set(shapes) == {("prefill", *s) for s in prefill} | decode
    # what the scheduler asks before it adds a sequence to a prefill step
    assert runner.prefill_fits(32, 16) and not runner.prefill_fits(32, 17) and not runner.prefill_fits(9, 64)
    assert runner.prefill_fits(8, 64) and runner.prefill_fits(1, 64)


def test_without_a_token_budget_every_prefill_shape_exists(params):
    runner = _runner(params)
    assert runner.prefill_row_budget is None and runner.prefill_fits(64, 512)
    prefill = {(B, T) for m, B, T, P in runner.bucket_shapes(64) if m == "prefill"}
    assert prefill == {(b, t) for b in (8, 16, 32, 64) for t in (16, 32, 64)}


def test_precompiled_shapes_run_without_compiling_again(params):
    """`warmup` compiles its programs on a thread pool (`precompile`); each then runs from JAX's caches: the
    threaded compiles are the ones the steps use, not extra work."""
    runner = ModelRunner(TINY, params, num_pages=16, page_size=4, max_model_len=32, max_num_seqs=8,
                         max_num_batched_tokens=64, max_prefill_chunk=16, decode_steps=2)
    bank = init_bank(TINY, LoraBankConfig(buckets=(4,), slots=(2,)), jnp.float32)
    shapes = runner.bucket_shapes(16)
    assert len(shapes) >= 4
    before = compile_count()
    runner.precompile(bank, shapes, workers=2)
    compiled = compile_count() - before
    assert compiled >= len(shapes)  # every step program (and the small ops that make its inputs)
    before = compile_count()
    for shape in shapes:
        runner._run(bank, runner._arrays(*shape))
    assert compile_count() == before, "a precompiled step shape compiled again when it ran"


def test_precompile_lowers_on_the_calling_thread_in_shape_order(params, monkeypatch):
    """Only XLA's compiles go to the pool: the programs are lowered one after another on the calling thread, so
    every process serializes them (Mosaic GPU kernels included) the same way and the persistent cache finds them
    after a restart."""
    runner = ModelRunner(TINY, params, num_pages=16, page_size=4, max_model_len=32, max_num_seqs=4,
                         max_num_batched_tokens=32, max_prefill_chunk=8, decode_steps=1)
    bank = init_bank(TINY, LoraBankConfig(buckets=(4,), slots=(2,)), jnp.float32)
    shapes = runner.bucket_shapes(8)[:4]
    lowered, step_call = [], runner._step_call

    class Recorder:
        def __init__(self, program, rows):
            self.program, self.rows = program, rows

        def lower(self, *args, **kwargs):
            lowered.append((threading.current_thread(), self.rows))
            return self.program.lower(*args, **kwargs)

    def recording_step_call(bank, arrays):
        program, args, kwargs = step_call(bank, arrays)
        return Recorder(program, _signature(arrays)), args, kwargs

    monkeypatch.setattr(runner, "_step_call", recording_step_call)
    runner.precompile(bank, shapes, workers=2)
    assert [thread for thread, _ in lowered] == [threading.current_thread()] * len(shapes)
    assert [rows for _, rows in lowered] == [_signature(runner._arrays(*s)) for s in shapes]


def _signature(arrays):
    """What tells two step inputs apart: their fields and the token array's shape."""
    return tuple(sorted(arrays)), arrays["tokens"].shape
