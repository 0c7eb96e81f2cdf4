"""Logit processors on the device against a NumPy reference written from vLLM's definitions, per row of a batch."""

import jax
import jax.numpy as jnp
import numpy as np

from jlora import sampling_penalties as pen
from jlora.engine.penalty_slots import PenaltySlots, host_row
from jlora.sampling import SamplingParams

V, NB = 40, 6


def ref_process(logits, prompt, output, sp: SamplingParams, stop_ids):
    """vLLM, row by row: logit_bias added; stop tokens -inf while fewer than min_tokens are out; repetition_penalty
    over tokens of the prompt or the output (positive logits divided, the rest multiplied); then
    frequency_penalty x count and presence_penalty x (count > 0) over the output."""
    x = np.asarray(logits, np.float64).copy()
    for i, b in sp.logit_bias:
        x[i] += b
    if len(output) < sp.min_tokens:
        x[sorted(stop_ids)] = -np.inf
    counts = np.bincount(np.asarray(output, np.int64), minlength=x.size)
    for v in set(prompt) | set(output):
        x[v] = x[v] / sp.repetition_penalty if x[v] > 0 else x[v] * sp.repetition_penalty
    return x - sp.frequency_penalty * counts - sp.presence_penalty * (counts > 0)


ROWS = [  # (sampling, prompt, output, stop ids)
    (SamplingParams(repetition_penalty=1.3), [1, 2, 3, 3], [4, 2], ()),
    (SamplingParams(frequency_penalty=0.7, presence_penalty=-0.4), [5], [6, 6, 6, 7], ()),
    (SamplingParams(), [8, 9], [10], ()),  # no processors: the spare slot
    (SamplingParams(logit_bias={0: 3.0, 11: -100.0, 39: 1.5}, repetition_penalty=0.8), [11, 12], [], ()),
    (SamplingParams(min_tokens=3, presence_penalty=2.0), [13], [14, 15], (16, 17, 99)),  # 99 >= V: ignored
    (SamplingParams(min_tokens=2, frequency_penalty=-2.0), [13], [14, 15], (16, 17)),  # min_tokens reached
]


def _state_and_rows(rows):
    """Slots written as the engine writes them; returns (state, slot per row)."""
    state = pen.PenaltyState.zeros(6, V, NB)
    slots = PenaltySlots(6, state.spare)

    class Seq:
        def __init__(self, i, sp):
            self.request_id, self.sampling = f"r{i}", sp

    seqs = [Seq(i, sp) for i, (sp, *_) in enumerate(rows)]
    assigned, new = slots.assign(seqs, seqs)
    assert assigned[2] == state.spare and len(new) == 5
    written = [(assigned[i], *host_row(sp, p, o, stop, V, NB)) for i, (sp, p, o, stop) in enumerate(rows)
               if assigned[i] != state.spare]
    cols = list(zip(*written))
    state = pen.write_slots(state, np.asarray(cols[0], np.int32), *(np.stack(c) for c in cols[1:]))
    return state, np.asarray(assigned, np.int32)


def _params(rows):
    sps = [sp for sp, *_ in rows]
    return {"presence": jnp.asarray([sp.presence_penalty for sp in sps], jnp.float32),
            "frequency": jnp.asarray([sp.frequency_penalty for sp in sps], jnp.float32),
            "repetition": jnp.asarray([sp.repetition_penalty for sp in sps], jnp.float32),
            "min_tokens": jnp.asarray([sp.min_tokens for sp in sps], jnp.int32)}


def test_processors_match_the_vllm_reference_per_row():
    logits = np.random.default_rng(0).normal(0, 2, (len(ROWS), V)).astype(np.float32)
    state, slot = _state_and_rows(ROWS)
    num_output = jnp.asarray([len(o) for _, _, o, _ in ROWS], jnp.int32)
    got = np.asarray(jax.jit(pen.apply)(jnp.asarray(logits), pen.gather(state, jnp.asarray(slot)), _params(ROWS),
                                        num_output))
    for b, (sp, prompt, output, stop) in enumerate(ROWS):
        want = ref_process(logits[b], prompt, output, sp, [i for i in stop if i < V])
        np.testing.assert_allclose(got[b], want, rtol=1e-6, atol=1e-5, err_msg=f"row {b}")
    assert np.array_equal(got[2], logits[2])  # the spare slot changes nothing
    assert np.isneginf(got[4, [16, 17]]).all() and np.isfinite(got[5, [16, 17]]).all()


def test_counts_update_on_the_device_and_the_spare_slot_stays_empty():
    state, slot = _state_and_rows(ROWS)
    rows = pen.gather(state, jnp.asarray(slot))
    token = jnp.asarray([4, 6, 10, 0, 16, 14], jnp.int32)
    live = jnp.asarray([True, True, True, True, False, True])
    rows = pen.count(rows, token, live)
    state = pen.scatter_counts(state, jnp.asarray(slot), rows)
    counts = np.asarray(state.counts)
    assert counts[slot[0], 4] == 2 and counts[slot[1], 6] == 4 and counts[slot[3], 0] == 1
    assert counts[slot[4], 16] == 0  # not live: a prompt chunk short of the end, or a step past row_steps
    assert counts[slot[5], 14] == 2
    assert not counts[state.spare].any()


def test_slots_are_given_back_when_sequences_stop_running():
    slots = PenaltySlots(2, spare=2)

    class Seq:
        def __init__(self, rid, sp):
            self.request_id, self.sampling = rid, sp

    a, b, c = (Seq(r, SamplingParams(presence_penalty=1.0)) for r in "abc")
    assert slots.assign([a, b], [a, b]) == ([0, 1], [a, b])
    assert slots.assign([a, b], [a, b]) == ([0, 1], [])  # held: nothing to write again
    assert slots.assign([c], [b, c]) == ([0], [c])  # a stopped running (finished or preempted): its slot is c's
    slots.release("b")
    assert len(slots) == 1 and slots.assign([a], [a, c]) == ([1], [a])  # a runs again: written afresh
