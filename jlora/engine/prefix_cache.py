"""Prefix caching of full KV pages: the hash chain, the table of cached pages and their LRU. Pure Python (no JAX).

Page i of a sequence holds the keys and values of its tokens [i * page_size, (i + 1) * page_size). Once that page is
full and written, it is keyed by

    key_i = sha256(key_{i-1} | salt | tokens of block i),    key_{-1} = 32 zero bytes

so two sequences share page i only if every token up to the end of block i matches and so does the salt. The salt
names the weights that computed the keys and values: the base model, or one adapter registration
(`AdapterStore.cache_salt`, never reused, so a replaced or re-registered adapter under the same name never finds the
old weights' pages). SHA-256 rather than Python's `hash`: tuples of ints can be collided on purpose, and a collision
would hand one request another request's keys and values.

The table is per data replica: a page lives in its replica's block of the pool and a sequence takes all its pages
from one block, so a hit must come from the block the sequence will use. The allocator (`block_manager`) owns
reference counts; this module only knows which pages are cached and which of those no sequence holds (`parked`,
least recently released first). Parked pages are the allocator's reserve: when its free list runs out it evicts
the least recently released one, and its key leaves the table.
"""

from __future__ import annotations

import array
import collections
import dataclasses
import hashlib
import struct

ROOT = bytes(32)  # the parent key of a sequence's first block
BASE_SALT = "base"  # the salt of the base model's pages (adapter salts are `AdapterStore.cache_salt`)


def block_hash(parent: bytes, tokens, salt: str) -> bytes:
    """The key of a full block: sha256(parent | len(salt) | salt | tokens as int64)."""
    s = salt.encode()
    h = hashlib.sha256(parent)
    h.update(struct.pack("<I", len(s)) + s)
    h.update(array.array("q", tokens).tobytes())
    return h.digest()


def extend_hashes(hashes: list[bytes], token_ids: list[int], page_size: int, salt: str, num_blocks: int) -> None:
    """Appends to `hashes` (the chain of the first len(hashes) blocks of `token_ids`) up to `num_blocks` keys."""
    if num_blocks * page_size > len(token_ids):
        raise ValueError(f"num_blocks={num_blocks} full blocks need {num_blocks * page_size} tokens, "
                         f"got {len(token_ids)}")
    while len(hashes) < num_blocks:
        i = len(hashes)
        hashes.append(block_hash(hashes[-1] if hashes else ROOT, token_ids[i * page_size:(i + 1) * page_size], salt))


@dataclasses.dataclass
class CacheStats:
    """Counted at admission, in tokens, as vLLM counts them: a hit token is one whose KV came from the cache."""

    query_tokens: int = 0
    hit_tokens: int = 0
    evictions: int = 0  # cached pages handed out again for other tokens

    @property
    def hit_rate(self) -> float:
        return self.hit_tokens / self.query_tokens if self.query_tokens else 0.0


class PrefixCache:
    """Cached full pages, per data replica.

    Args:
      replicas: data replicas; each has its own table (its pages are only visible to its sequences).
    """

    def __init__(self, replicas: int = 1):
        if replicas < 1:
            raise ValueError(f"replicas must be >= 1, got {replicas}")
        self.replicas = replicas
        self._table: list[dict[bytes, int]] = [{} for _ in range(replicas)]  # key -> page
        self._key: dict[int, tuple[int, bytes]] = {}  # page -> (replica, key)
        self._parked = [collections.OrderedDict() for _ in range(replicas)]  # cached pages no sequence holds
        self.stats = CacheStats()

    @property
    def num_cached(self) -> int:
        """Pages with a key, held by sequences or parked."""
        return len(self._key)

    def num_parked(self, replica: int) -> int:
        return len(self._parked[replica])

    @property
    def total_parked(self) -> int:
        return sum(map(len, self._parked))

    def is_cached(self, page: int) -> bool:
        return page in self._key

    def key_of(self, page: int) -> bytes | None:
        return self._key[page][1] if page in self._key else None

    def is_parked(self, page: int) -> bool:
        return page in self._key and page in self._parked[self._key[page][0]]

    def match(self, replica: int, hashes: list[bytes]) -> list[int]:
        """The pages of the longest prefix of `hashes` cached in `replica` (a chain: it stops at the first miss)."""
        table, pages = self._table[replica], []
        for h in hashes:
            page = table.get(h)
            if page is None:
                break
            pages.append(page)
        return pages

    def insert(self, replica: int, key: bytes, page: int) -> bool:
        """Caches a full, written `page` (held by a sequence) under `key`. False if the key is cached already (two
        sequences computed the same block at once): the table keeps the first page and this one stays uncached."""
        if page in self._key:
            raise AssertionError(f"page {page} is cached already")
        if key in self._table[replica]:
            return False
        self._table[replica][key] = page
        self._key[page] = (replica, key)
        return True

    def park(self, page: int) -> None:
        """The last sequence holding cached `page` released it: it becomes the most recently released."""
        self._parked[self._key[page][0]][page] = None

    def unpark(self, page: int) -> None:
        """A sequence takes parked `page` again (a hit)."""
        del self._parked[self._key[page][0]][page]

    def evict(self, replica: int) -> int | None:
        """Removes the least recently released parked page of `replica` from the cache and returns it (None: none)."""
        if not self._parked[replica]:
            return None
        page, _ = self._parked[replica].popitem(last=False)
        _, key = self._key.pop(page)
        del self._table[replica][key]
        self.stats.evictions += 1
        return page

    def parked_pages(self, replica: int) -> list[int]:
        """Parked pages of `replica`, least recently released first (the order of eviction)."""
        return list(self._parked[replica])

    def check_invariants(self, held: set[int]) -> None:
        """1. The table and the page -> key map are inverse. 2. A parked page is cached, in its replica, and held by
        no sequence (`held`: the pages sequences hold)."""
        entries = [(r, k, p) for r, t in enumerate(self._table) for k, p in t.items()]
        assert len(entries) == len(self._key), "table and page keys differ in size"
        assert all(self._key.get(p) == (r, k) for r, k, p in entries), "table and page keys disagree"
        for r, parked in enumerate(self._parked):
            assert all(self._key.get(p, (None,))[0] == r for p in parked), "a parked page is uncached or elsewhere"
            assert not set(parked) & held, "a parked page is held by a sequence"
