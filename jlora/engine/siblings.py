"""Requests that share a prompt (the n choices of one): held back until the first one's prompt is in the KV cache.

The first choice is scheduled at once; the others wait here until its prompt is computed (or it is gone), then
queue. Their prefill then finds the prompt's full pages in the prefix cache (committed after the step that wrote
them) and computes only the last partial page: the prompt is prefilled once. Pure Python.
"""

from __future__ import annotations


class Siblings:
    def __init__(self):
        self._held: dict[str, list] = {}  # the first choice's request id -> the `Sequence`s waiting for it

    def __len__(self) -> int:
        return sum(map(len, self._held.values()))

    def hold(self, leader: str, seq) -> None:
        self._held.setdefault(leader, []).append(seq)

    def remove(self, seq) -> bool:
        for leader, seqs in self._held.items():
            if seq in seqs:
                seqs.remove(seq)
                if not seqs:
                    del self._held[leader]
                return True
        return False

    def ready(self, requests: dict) -> list:
        """The held sequences whose leader (in `requests`, by id) has its prompt computed or is gone."""
        out = []
        for leader in list(self._held):
            seq = requests.get(leader)
            if seq is None or seq.num_computed >= len(seq.prompt_ids):
                out += self._held.pop(leader)
        return out
