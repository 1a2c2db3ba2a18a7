"""A paged KV cache with hash-based prefix caching, after vLLM's block manager.

A prompt is cut into blocks of `block_size` tokens; each full block is named by a
hash chained over every block before it, so equal hashes mean equal prefixes.
Blocks a running request uses have a reference count; when it finishes, its full
blocks stay cached (evictable, least recently freed first, tail blocks before head
blocks) until their space is needed.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass, field


def count_tokens(text: str, chars_per_token: int) -> int:
    """The simulated tokenizer: one token per `chars_per_token` characters."""
    return max(1, -(-len(text) // chars_per_token))


def block_hashes(text: str, block_size: int, chars_per_token: int) -> list[int]:
    """Chained hashes of the full token blocks of `text` (a partial tail is left
    out), each block being `block_size` simulated tokens."""
    step = block_size * chars_per_token
    hashes: list[int] = []
    parent = 0
    for start in range(0, len(text) - step + 1, step):
        parent = hash((parent, text[start : start + step]))
        hashes.append(parent)
    return hashes


@dataclass
class Allocation:
    """The blocks one request holds: hashed prompt blocks, then anonymous ones."""

    hashed: list[int]
    anonymous: int
    hit_tokens: int


@dataclass
class KVCache:
    """Fixed number of blocks; prefix hits, reference counts, LRU eviction.

    Args:
        num_blocks: the cache's capacity in blocks.
        block_size: tokens per block.
    """

    num_blocks: int
    block_size: int
    _refs: dict[int, int] = field(default_factory=dict)
    _evictable: OrderedDict[int, None] = field(default_factory=OrderedDict)
    _anonymous: int = 0

    @property
    def used_blocks(self) -> int:
        """Blocks held by running requests (what vLLM reports as usage)."""
        return len(self._refs) - len(self._evictable) + self._anonymous

    @property
    def usage(self) -> float:
        """Fraction of blocks held by running requests, 0..1."""
        return self.used_blocks / self.num_blocks

    @property
    def cached_blocks(self) -> int:
        """Hashed blocks present (in use or evictable)."""
        return len(self._refs)

    def hit_blocks(self, hashes: Sequence[int], prompt_tokens: int) -> int:
        """Leading blocks of `hashes` already cached. Like vLLM, at least the last
        prompt token is always computed, so a fully cached prompt hits one block
        less when its length is a multiple of the block size."""
        limit = min(len(hashes), max(0, prompt_tokens - 1) // self.block_size)
        hits = 0
        while hits < limit and hashes[hits] in self._refs:
            hits += 1
        return hits

    def allocate(
        self, hashes: Sequence[int], prompt_tokens: int, total_tokens: int
    ) -> Allocation | None:
        """Takes the blocks for a request of `prompt_tokens` growing to
        `total_tokens`, reusing cached prefix blocks; None when they do not fit."""
        hits = self.hit_blocks(hashes, prompt_tokens)
        needed_total = -(-total_tokens // self.block_size)
        anonymous = needed_total - len(hashes)
        new_hashed = [h for h in hashes[hits:] if h not in self._refs]
        reused_evictable = sum(1 for h in hashes if h in self._evictable)
        free = self.num_blocks - len(self._refs) - self._anonymous
        if len(new_hashed) + anonymous > free + len(self._evictable) - reused_evictable:
            return None
        for h in hashes:
            if h in self._refs:
                if self._refs[h] == 0:
                    del self._evictable[h]
                self._refs[h] += 1
        shortfall = len(new_hashed) + anonymous - free
        for _ in range(max(0, shortfall)):
            victim, _ = self._evictable.popitem(last=False)
            del self._refs[victim]
        for h in new_hashed:
            self._refs[h] = 1
        self._anonymous += anonymous
        return Allocation(list(hashes), anonymous, hits * self.block_size)

    def free(self, allocation: Allocation, full_hashes: Sequence[int] = ()) -> None:
        """Returns a request's blocks; its hashed blocks stay cached, evictable,
        the tail before the head (evicted first).

        `full_hashes`, the block hashes of prompt plus generated text, name the
        blocks the reply filled: like vLLM, those stay cached too, so the next
        turn of a conversation finds its previous answer in the cache.
        """
        generated = list(full_hashes[len(allocation.hashed) :])
        generated = generated[: allocation.anonymous]
        self._anonymous -= allocation.anonymous
        for h in reversed(generated):
            if h not in self._refs:
                self._refs[h] = 0
                self._evictable[h] = None
        for h in reversed(allocation.hashed):
            count = self._refs[h] - 1
            self._refs[h] = count
            if count == 0:
                self._evictable[h] = None

    def fits_ever(self, total_tokens: int) -> bool:
        """Whether a request of this size could be admitted into an empty cache."""
        return -(-total_tokens // self.block_size) <= self.num_blocks
