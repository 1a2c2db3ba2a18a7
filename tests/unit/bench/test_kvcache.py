import pytest
from simulator.kvcache import KVCache, block_hashes, count_tokens

pytestmark = pytest.mark.unit

# One block is 4 tokens of 1 character here, so text lengths read as tokens.
BS = 4


def hashes(text: str) -> list[int]:
    return block_hashes(text, BS, 1)


def test_block_hashes_are_chained_and_full_blocks_only() -> None:
    a = hashes("abcdefghij")
    assert len(a) == 2
    assert hashes("abcdefgh") == a
    # Same second block after a different first block: a different hash.
    assert hashes("xxxxefgh")[1] != a[1]
    assert count_tokens("abcdefghij", 4) == 3
    assert count_tokens("", 4) == 1


def test_hits_need_the_whole_prefix_and_leave_the_last_token() -> None:
    cache = KVCache(num_blocks=100, block_size=BS)
    prompt = "abcdefghijkl"  # 12 tokens, 3 full blocks
    first = cache.allocate(hashes(prompt), 12, 14)
    assert first is not None and first.hit_tokens == 0
    cache.free(first)
    # Identical prompt: at most (12 - 1) // 4 = 2 blocks hit (the last token is
    # always computed, as in vLLM).
    again = cache.allocate(hashes(prompt), 12, 14)
    assert again is not None and again.hit_tokens == 8
    cache.free(again)
    longer = cache.allocate(hashes(prompt + "mnopq"), 17, 20)
    assert longer is not None and longer.hit_tokens == 12
    other = cache.allocate(hashes("Xbcdefghijkl"), 12, 14)
    assert other is not None and other.hit_tokens == 0


def test_usage_counts_blocks_in_use_not_cached_ones() -> None:
    cache = KVCache(num_blocks=10, block_size=BS)
    a = cache.allocate(hashes("abcdefgh"), 8, 12)  # 2 hashed + 1 anonymous
    assert a is not None
    assert cache.used_blocks == 3 and cache.usage == pytest.approx(0.3)
    cache.free(a)
    assert cache.used_blocks == 0 and cache.cached_blocks == 2


def test_full_cache_refuses_then_evicts_least_recently_freed() -> None:
    cache = KVCache(num_blocks=4, block_size=BS)
    a = cache.allocate(hashes("aaaabbbb"), 8, 8)
    b = cache.allocate(hashes("ccccdddd"), 8, 8)
    assert a is not None and b is not None
    assert cache.allocate(hashes("eeee"), 4, 4) is None  # all 4 blocks in use
    cache.free(a)
    cache.free(b)
    c = cache.allocate(hashes("eeeeffff"), 8, 8)
    assert c is not None
    # a's blocks were freed first, so they went: a misses, b still hits.
    assert cache.hit_blocks(hashes("aaaabbbbX"), 9) == 0
    assert cache.hit_blocks(hashes("ccccddddX"), 9) == 2


def test_tail_blocks_are_evicted_before_head_blocks() -> None:
    cache = KVCache(num_blocks=3, block_size=BS)
    a = cache.allocate(hashes("aaaabbbbcccc"), 12, 12)
    assert a is not None
    cache.free(a)
    b = cache.allocate(hashes("zzzz"), 4, 4)
    assert b is not None
    assert cache.hit_blocks(hashes("aaaabbbbccccX"), 13) == 2


def test_request_larger_than_cache_never_fits() -> None:
    cache = KVCache(num_blocks=2, block_size=BS)
    assert cache.fits_ever(8) and not cache.fits_ever(9)
