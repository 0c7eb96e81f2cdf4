"""The KV page allocator. Pure Python: a free list and per-sequence page lists."""

from __future__ import annotations

import collections

from jlora.engine.sequence import Sequence


class PageAllocator:
    """Hands out fixed-size KV pages to sequences.

    Args:
      num_pages: pages in the pool.
      page_size: tokens per page.
    """

    def __init__(self, num_pages: int, page_size: int):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        self.num_pages, self.page_size = num_pages, page_size
        self._free = collections.deque(range(num_pages))
        self._owner: dict[int, str] = {}

    @property
    def num_free(self) -> int:
        return len(self._free)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra pages `seq` needs to hold its first `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(seq.pages))

    def can_allocate(self, n: int) -> bool:
        return n <= len(self._free)

    def reserve(self, seq: Sequence, num_tokens: int) -> bool:
        """Grows `seq.pages` to hold `num_tokens` tokens; False (and nothing changes) if the pool is short."""
        n = self.pages_needed(seq, num_tokens)
        if n > len(self._free):
            return False
        for _ in range(n):
            page = self._free.popleft()
            self._owner[page] = seq.request_id
            seq.pages.append(page)
        return True

    def free(self, seq: Sequence) -> None:
        for page in seq.pages:
            if self._owner.pop(page, None) != seq.request_id:
                raise AssertionError(f"page {page} freed by {seq.request_id} but not owned by it")
            self._free.append(page)
        seq.pages = []

    def check_invariants(self, live: list[Sequence]) -> None:
        """Every page is free or owned by exactly one live sequence, and nothing else."""
        owned = [p for s in live for p in s.pages]
        assert len(owned) == len(set(owned)), "a page is owned twice"
        assert set(owned) == set(self._owner), "owner table disagrees with the sequences"
        assert not set(owned) & set(self._free), "a page is both free and owned"
        assert len(owned) + len(self._free) == self.num_pages, "pages leaked"
        assert len(set(self._free)) == len(self._free), "a page is free twice"
