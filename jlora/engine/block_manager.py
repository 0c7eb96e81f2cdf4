"""The KV page allocator. Pure Python: free lists and per-sequence page lists.

With data parallelism the pool is split into `replicas` equal blocks of consecutive page ids, one per data
replica (the sharded KV cache holds block r on replica r). A sequence takes all its pages from one block, so
its rows of a step run on the replica that holds its cache.
"""

from __future__ import annotations

import collections

from jlora.engine.sequence import Sequence


class PageAllocator:
    """Hands out fixed-size KV pages to sequences.

    Args:
      num_pages: pages in the pool (a multiple of `replicas`).
      page_size: tokens per page.
      replicas: data replicas; replica r owns pages [r * pages_per_replica, (r + 1) * pages_per_replica).
    """

    def __init__(self, num_pages: int, page_size: int, replicas: int = 1):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        if replicas < 1 or num_pages % replicas:
            raise ValueError(f"replicas={replicas} must be >= 1 and divide num_pages={num_pages}")
        self.num_pages, self.page_size, self.replicas = num_pages, page_size, replicas
        self.pages_per_replica = num_pages // replicas
        per = self.pages_per_replica
        self._free = [collections.deque(range(r * per, (r + 1) * per)) for r in range(replicas)]
        self._owner: dict[int, str] = {}

    @property
    def num_free(self) -> int:
        return sum(len(f) for f in self._free)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra pages `seq` needs to hold its first `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(seq.pages))

    def replica(self, seq: Sequence) -> int:
        """The replica whose pages `seq` holds; a sequence without pages goes where most pages are free."""
        if seq.pages:
            return seq.pages[0] // self.pages_per_replica
        return max(range(self.replicas), key=lambda r: len(self._free[r]))

    def can_grow(self, seqs: list[Sequence], lookahead: list[int] | None = None) -> bool:
        """Whether every sequence of `seqs` can grow at once to hold all its tokens (and lookahead[i] more)."""
        need = collections.Counter()
        for i, s in enumerate(seqs):
            need[self.replica(s)] += self.pages_needed(s, s.num_tokens + (lookahead[i] if lookahead else 0))
        return all(n <= len(self._free[r]) for r, n in need.items())

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grows `seq.pages` to hold `num_tokens` tokens; False (and nothing changes) if the pool is short."""
        n = self.pages_needed(seq, num_tokens)
        free = self._free[self.replica(seq)]
        if n > len(free):
            return False
        for _ in range(n):
            page = free.popleft()
            self._owner[page] = seq.request_id
            seq.pages.append(page)
        return True

    def free(self, seq: Sequence) -> None:
        for page in seq.pages:
            if self._owner.pop(page, None) != seq.request_id:
                raise AssertionError(f"page {page} freed by {seq.request_id} but not owned by it")
            self._free[page // self.pages_per_replica].append(page)
        seq.pages = []

    def check_invariants(self, live: list[Sequence]) -> None:
        """Every page is free or owned by exactly one live sequence, and nothing else."""
        owned = [p for s in live for p in s.pages]
        free = [p for f in self._free for p in f]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert set(owned) == set(self._owner), "owner table disagrees with the sequences"
        assert not set(owned) & set(free), "a page is both free and owned"
        assert len(owned) + len(free) == self.num_pages, "pages leaked"
        assert len(set(free)) == len(free), "a page is free twice"
        assert all(len({p // self.pages_per_replica for p in s.pages}) <= 1 for s in live), "a sequence spans replicas"
        per = self.pages_per_replica
        assert all(p // per == r for r, f in enumerate(self._free) for p in f), "a free page in the wrong pool"
