"""The KV page allocator. Pure Python: free lists, reference counts and per-sequence page lists.

With data parallelism the pool is split into `replicas` equal blocks of consecutive page ids, one per data
replica (the sharded KV cache holds block r on replica r). A sequence takes all its pages from one block, so
its rows of a step run on the replica that holds its cache.

With a `PrefixCache`, full written pages are cached (`commit`) and shared: a page's reference count is the number
of sequences holding it. Every page is exactly one of: free (on a free list), held (reference count >= 1, cached
or not), or parked (cached, held by nobody). Parked pages count as free: when a free list runs out, the least
recently released parked page of that replica is evicted and handed out.
"""

from __future__ import annotations

import collections
import dataclasses
from typing import Callable

from jlora.engine.prefix_cache import PrefixCache, extend_hashes
from jlora.engine.sequence import Sequence


@dataclasses.dataclass(frozen=True)
class Prefix:
    """Cached pages a waiting sequence can start from: `pages` of `replica`, holding its first `num_tokens` tokens."""

    replica: int
    pages: tuple[int, ...] = ()
    num_tokens: int = 0


class PageAllocator:
    """Hands out fixed-size KV pages to sequences.

    Args:
      num_pages: pages in the pool (a multiple of `replicas`).
      page_size: tokens per page.
      replicas: data replicas; replica r owns pages [r * pages_per_replica, (r + 1) * pages_per_replica).
      cache: the prefix cache (None: prefix caching off; every page is then free or held by one sequence).
    """

    def __init__(self, num_pages: int, page_size: int, replicas: int = 1, cache: PrefixCache | None = None):
        if num_pages < 1 or page_size < 1:
            raise ValueError(f"num_pages and page_size must be >= 1, got {num_pages}, {page_size}")
        if replicas < 1 or num_pages % replicas:
            raise ValueError(f"replicas={replicas} must be >= 1 and divide num_pages={num_pages}")
        if cache is not None and cache.replicas != replicas:
            raise ValueError(f"cache has {cache.replicas} replicas, the allocator {replicas}")
        self.num_pages, self.page_size, self.replicas, self.cache = num_pages, page_size, replicas, cache
        self.pages_per_replica = num_pages // replicas
        per = self.pages_per_replica
        self._free = [collections.deque(range(r * per, (r + 1) * per)) for r in range(replicas)]
        self._refs: dict[int, int] = {}  # page -> sequences holding it (absent: free or parked)

    def available(self, replica: int) -> int:
        """Pages `replica` can hand out: free ones, then parked ones by eviction."""
        return len(self._free[replica]) + (self.cache.num_parked(replica) if self.cache else 0)

    @property
    def num_free(self) -> int:
        """Pages no sequence holds (free or parked)."""
        return self.num_pages - len(self._refs)

    @property
    def num_cached(self) -> int:
        return self.cache.num_cached if self.cache else 0

    def ref_count(self, page: int) -> int:
        """Sequences holding `page`."""
        return self._refs.get(page, 0)

    def pages_needed(self, seq: Sequence, num_tokens: int) -> int:
        """Extra pages `seq` needs to hold its first `num_tokens` tokens."""
        return max(0, -(-num_tokens // self.page_size) - len(seq.pages))

    def replica(self, seq: Sequence) -> int:
        """The replica whose pages `seq` holds; a sequence without pages goes where most pages are available."""
        if seq.pages:
            return seq.pages[0] // self.pages_per_replica
        return max(range(self.replicas), key=self.available)

    def can_grow(self, seqs: list[Sequence], lookahead: list[int] | None = None) -> bool:
        """Whether every sequence of `seqs` can grow at once to hold all its tokens (and lookahead[i] more)."""
        need = collections.Counter()
        for i, s in enumerate(seqs):
            need[self.replica(s)] += self.pages_needed(s, s.num_tokens + (lookahead[i] if lookahead else 0))
        return all(n <= self.available(r) for r, n in need.items())

    def match(self, seq: Sequence, chunk_for: Callable[[int], int]) -> Prefix:
        """The cached prefix a sequence without pages would start from, and the replica it would take its pages
        from. At least its last token is left to compute (its logits are sampled), so a prompt cached in full backs
        off one page. Among replicas where `chunk_for(start)` tokens past the prefix fit, the longest prefix wins,
        then the most pages available. Changes nothing."""
        if self.cache is None or seq.pages:
            return Prefix(self.replica(seq))
        hashes = self._hashes(seq, (seq.num_tokens - 1) // self.page_size)
        best, best_rank = Prefix(self.replica(seq)), None
        for r in range(self.replicas):
            pages = self.cache.match(r, hashes)
            start = len(pages) * self.page_size
            need = -(-(start + chunk_for(start)) // self.page_size) - len(pages)
            available = self.available(r) - sum(p not in self._refs for p in pages)  # parked hits
            if need <= available and (best_rank is None or (len(pages), available) > best_rank):
                best, best_rank = Prefix(r, tuple(pages), start), (len(pages), available)
        return best

    def reserve(self, seq: Sequence, num_tokens: int, prefix: Prefix | None = None) -> bool:
        """Grows `seq.pages` to hold `num_tokens` tokens, a sequence without pages starting from the cached
        `prefix` (from `match`); False (and nothing changes) if the pool is short."""
        if prefix is not None and seq.pages:
            raise ValueError(f"{seq.request_id} holds pages already: a prefix is only for a sequence without")
        replica = prefix.replica if prefix is not None else self.replica(seq)
        hits = prefix.pages if prefix is not None else ()
        n = max(0, -(-num_tokens // self.page_size) - len(seq.pages) - len(hits))
        if n > self.available(replica) - sum(p not in self._refs for p in hits):  # parked hits: no longer free
            return False
        for page in hits:  # taken before any eviction below, so none of them is evicted
            if page not in self._refs:
                self.cache.unpark(page)
            self._refs[page] = self._refs.get(page, 0) + 1
            seq.pages.append(page)
            seq.num_cached_pages += 1
        for _ in range(n):
            free = self._free[replica]
            page = free.popleft() if free else self.cache.evict(replica)
            self._refs[page] = 1
            seq.pages.append(page)
        if prefix is not None and self.cache is not None:
            self.cache.stats.query_tokens += seq.num_tokens
            self.cache.stats.hit_tokens += prefix.num_tokens
        return True

    def commit(self, seq: Sequence) -> None:
        """Caches the pages of `seq` that are full and written (its first num_computed tokens)."""
        full = seq.num_computed // self.page_size
        if self.cache is None or full <= seq.num_cached_pages:
            return
        hashes = self._hashes(seq, full)
        replica = self.replica(seq)
        for i in range(seq.num_cached_pages, full):
            self.cache.insert(replica, hashes[i], seq.pages[i])
        seq.num_cached_pages = full

    def free(self, seq: Sequence) -> None:
        """Releases the pages of `seq`, caching its full written ones first. Released in reverse, so a sequence's
        last pages are evicted before its first (a prefix is worth more than a tail)."""
        self.commit(seq)
        for page in reversed(seq.pages):
            refs = self._refs.get(page, 0)
            if refs < 1:
                raise AssertionError(f"page {page} freed by {seq.request_id} but held by no sequence")
            if refs > 1:
                self._refs[page] = refs - 1
                continue
            del self._refs[page]
            if self.cache is not None and self.cache.is_cached(page):
                self.cache.park(page)
            else:
                self._free[page // self.pages_per_replica].append(page)
        seq.pages = []
        seq.num_cached_pages = 0

    def drop_cached(self) -> int:
        """Forgets every cached page, whose contents were lost with the device's KV cache: the parked ones become
        free. Called when no sequence holds a page; returns how many were dropped."""
        if self._refs:
            raise AssertionError(f"{len(self._refs)} pages are still held: free their sequences first")
        dropped = 0
        for replica in range(self.replicas):
            while self.cache is not None and (page := self.cache.evict(replica)) is not None:
                self._free[replica].append(page)
                dropped += 1
        return dropped

    def _hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        """The keys of the first `num_blocks` blocks of `seq` (computed once per sequence: its tokens only grow)."""
        extend_hashes(seq.block_hashes, seq.token_ids, self.page_size, seq.cache_salt, num_blocks)
        return seq.block_hashes

    def check_invariants(self, live: list[Sequence]) -> None:
        """1. Every page is exactly one of free, held or parked. 2. A page's reference count is the number of live
        sequences holding it, and no sequence holds a page twice. 3. A sequence's pages are of one replica, and
        free pages are in their replica's list. 4. A held page that is cached was committed
        (or hit) by each sequence holding it, under the key of that sequence's tokens."""
        held = collections.Counter(p for s in live for p in s.pages)
        free = [p for f in self._free for p in f]
        parked = [p for r in range(self.replicas) for p in (self.cache.parked_pages(r) if self.cache else [])]
        assert all(len(set(s.pages)) == len(s.pages) for s in live), "a sequence holds a page twice"
        assert dict(held) == self._refs, "reference counts disagree with the sequences"
        assert len(set(free)) == len(free), "a page is free twice"
        assert not set(held) & set(free), "a page is both free and held"
        assert not set(parked) & set(free), "a page is both free and parked"
        assert len(held) + len(free) + len(parked) == self.num_pages, "pages leaked"
        assert all(len({p // self.pages_per_replica for p in s.pages}) <= 1 for s in live), "a sequence spans replicas"
        per = self.pages_per_replica
        assert all(p // per == r for r, f in enumerate(self._free) for p in f), "a free page in the wrong pool"
        if self.cache is not None:
            self.cache.check_invariants(set(held))
            for s in live:
                assert s.num_cached_pages * self.page_size <= s.num_computed, f"{s.request_id} cached unwritten pages"
                for i, p in enumerate(s.pages):
                    key = self.cache.key_of(p)
                    assert key is None or (i < s.num_cached_pages and key == s.block_hashes[i]), \
                        f"page {i} of {s.request_id} is cached under other tokens, or before it was written"
            assert not any(self.cache.is_cached(p) for p in free), "a free page is cached"
