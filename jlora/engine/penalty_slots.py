"""Which running sequence holds which slot of the device's penalty state (`sampling_penalties.PenaltyState`).

Host side (Python and NumPy). A sequence whose sampling uses processors (penalties, logit_bias, min_tokens) takes a slot
the first step it runs in; the slot is written from the host then (its prompt's tokens, its stop tokens, its bias
table, and the counts of what it has output: nonzero after a preemption), and from then on only the device
updates it. A slot is given back when its sequence stops running (finished, aborted or preempted): a preempted
sequence is written afresh when it runs again.
"""

from __future__ import annotations

import numpy as np

from jlora.sampling_penalties import PROMPT, STOP


def host_row(sampling, prompt_ids, output_ids, stop_ids, vocab_size: int, num_bias: int):
    """A sequence's slot contents: (counts [V] int32, flags [V] int8, bias ids [N] int32, bias [N] float32)."""
    counts = np.bincount(np.asarray(output_ids, np.int64), minlength=vocab_size).astype(np.int32)
    flags = np.zeros((vocab_size,), np.int8)
    flags[np.asarray(prompt_ids, np.int64)] |= PROMPT
    if sampling.min_tokens > 0:
        flags[np.asarray([i for i in stop_ids if i < vocab_size], np.int64)] |= STOP
    ids = np.zeros((num_bias,), np.int32)
    bias = np.zeros((num_bias,), np.float32)
    for j, (i, b) in enumerate(sampling.logit_bias):
        ids[j], bias[j] = i, b
    return counts, flags, ids, bias


class PenaltySlots:
    """Slots 0 .. num_slots - 1 for running sequences; `spare` for rows without processors.

    Args:
      num_slots: sequences that can hold a slot at once (at least the most that run at once).
      spare: the spare slot's index.
    """

    def __init__(self, num_slots: int, spare: int):
        self.spare = spare
        self._free = list(range(num_slots - 1, -1, -1))
        self._slot: dict[str, int] = {}  # request id -> slot

    def __len__(self) -> int:
        return len(self._slot)

    def assign(self, seqs, running) -> tuple[list[int], list]:
        """(slot of each of `seqs`, the sequences that took a slot now and must be written). Slots of sequences
        not in `running` any more go back first."""
        live = {s.request_id for s in running}
        for rid in [r for r in self._slot if r not in live]:
            self.release(rid)
        slots, new = [], []
        for s in seqs:
            if not s.sampling.uses_processors:
                slots.append(self.spare)
                continue
            if s.request_id not in self._slot:
                if not self._free:
                    raise RuntimeError(f"no penalty slot is free for {s.request_id}: {len(self._slot)} held")
                self._slot[s.request_id] = self._free.pop()
                new.append(s)
            slots.append(self._slot[s.request_id])
        return slots, new

    def slot(self, request_id: str) -> int | None:
        return self._slot.get(request_id)

    def clear(self) -> None:
        """Releases every slot (the device state was lost: the next `assign` writes each again)."""
        for rid in list(self._slot):
            self.release(rid)

    def release(self, request_id: str) -> None:
        slot = self._slot.pop(request_id, None)
        if slot is not None:
            self._free.append(slot)
