"""The KV block pool's accounting: fixed-size blocks, reference counts and the prefix cache.

Pure bookkeeping (no tensors): the paged cache (`engine/paged.py`) holds the K/V of block `b`
at rows `b * block_size ... (b + 1) * block_size - 1` of every layer's pool.

A full block of prompt tokens is content-addressed by a hash chain (the hash of its parent
block and its own tokens), so the same tokens after the same prefix name the same block. Such
a block may be shared read-only by several rows (its reference count); when the last row lets
go it stays cached, at the tail of the free queue, until the pool needs it for something else:
the least recently freed cached block is evicted first (it is the head of the queue).
"""

from __future__ import annotations

import hashlib
from collections import OrderedDict

ROOT = b"dslaunch-kv"


def chain(parent: bytes, tokens: list[int]) -> bytes:
    """The hash of a full block: its parent's hash and its own token ids."""
    h = hashlib.blake2b(parent, digest_size=16)
    h.update(b"".join(t.to_bytes(8, "little", signed=True) for t in tokens))
    return h.digest()


class BlockPool:
    """`total` blocks of `size` tokens; allocation, sharing by reference count, LRU eviction."""

    def __init__(self, total: int, size: int) -> None:
        if total < 1 or size < 1:
            raise ValueError(f"a block pool needs at least one block of one token (got {total} x {size})")
        self.total, self.size = total, size
        self.refs = [0] * total
        self.hash_of: list[bytes | None] = [None] * total
        self.cached: dict[bytes, int] = {}
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(total))

    @property
    def free(self) -> int:
        """Blocks that can be handed out now (unused, or cached and unused: evictable)."""
        return len(self.free_queue)

    @property
    def used(self) -> int:
        return self.total - len(self.free_queue)

    def allocate(self, n: int) -> list[int] | None:
        """`n` blocks for one row's exclusive use, or None (and nothing taken) when too few."""
        if n > len(self.free_queue):
            return None
        out = []
        for _ in range(n):
            b, _ = self.free_queue.popitem(last=False)
            h = self.hash_of[b]
            if h is not None:  # evict: its content is about to be overwritten
                del self.cached[h]
                self.hash_of[b] = None
            self.refs[b] = 1
            out.append(b)
        return out

    def release(self, blocks: list[int]) -> None:
        """A row lets go of its blocks; the last user's blocks go back to the free queue, its
        tail blocks first (they are the least likely to be shared, so evicted first)."""
        for b in reversed(blocks):
            if self.refs[b] <= 0:
                raise RuntimeError(f"block {b} released while free")
            self.refs[b] -= 1
            if self.refs[b] == 0:
                self.free_queue[b] = None

    def lookup(self, hashes: list[bytes]) -> list[int]:
        """The cached blocks for the longest prefix of `hashes`, each now shared by the caller."""
        out = []
        for h in hashes:
            b = self.cached.get(h)
            if b is None:
                break
            if self.refs[b] == 0:
                del self.free_queue[b]
            self.refs[b] += 1
            out.append(b)
        return out

    def publish(self, block: int, h: bytes) -> None:
        """A row's block now holds a full block of prompt tokens: it may be found by its hash."""
        if self.hash_of[block] is not None or h in self.cached:
            return  # already cached (a twin computed the same block first: keep that one)
        self.hash_of[block] = h
        self.cached[h] = block

    def check(self) -> None:
        """Every invariant of the accounting (used by the tests)."""
        assert all(r >= 0 for r in self.refs)
        assert set(self.free_queue) == {b for b in range(self.total) if self.refs[b] == 0}
        assert all(self.hash_of[b] == h for h, b in self.cached.items())
        assert sum(h is not None for h in self.hash_of) == len(self.cached)
