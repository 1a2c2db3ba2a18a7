"""Token-bucket arithmetic and the stores that keep bucket levels.

A bucket holds up to `capacity` and refills at `rate` per second; a bucket with rate
0 is a quota for a period and expires when the period ends. A request takes
`amount` from several buckets at once, all or nothing, and is admitted when each
holds at least `need` (a request bigger than a bucket needs only the full bucket, so
it is never refused forever; its level then goes below zero and later requests
wait). After the reply, `adjust` corrects the estimate with the real use.

The in-process store does the arithmetic here; the Redis store runs the same steps
in one Lua script, so several gateways share the buckets atomically.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True)
class Bucket:
    """One bucket's identity and shape.

    Attributes:
        key: where its level is stored (for example `rpm:key:alice`).
        capacity: the most it holds.
        rate: refill per second; 0 for a quota.
        ttl_s: how long an untouched bucket is kept (for a quota: until the end
            of its period, which is also when a refused request may retry).
    """

    key: str
    capacity: float
    rate: float
    ttl_s: float


@dataclass(frozen=True)
class Take:
    """An amount to take from a bucket, admitted when `need` is there."""

    bucket: Bucket
    amount: float
    need: float


@dataclass(frozen=True)
class Level:
    """A bucket after a take: whether it admitted it, its level, and how long a
    refused request should wait."""

    ok: bool
    level: float
    wait_s: float


def refill(level: float, last: float, now: float, bucket: Bucket) -> float:
    """The level at `now` of a bucket that was at `level` at time `last`."""
    return min(bucket.capacity, level + max(0.0, now - last) * bucket.rate)


def wait_time(level: float, need: float, bucket: Bucket) -> float:
    """Seconds until the bucket holds `need`."""
    if level >= need:
        return 0.0
    if bucket.rate <= 0:
        return bucket.ttl_s
    return (need - level) / bucket.rate


def keep_time(level: float, bucket: Bucket) -> float:
    """How long to keep a bucket written at `level`: its TTL, and for a refilling
    bucket at least until it is full again, so that a debt (a level below zero,
    after a large request or a settle above the estimate) is waited out rather
    than forgotten when the TTL ends."""
    return max(bucket.ttl_s, reset_time(level, bucket))


def reset_time(level: float, bucket: Bucket) -> float:
    """Seconds until the bucket is full again."""
    if bucket.rate <= 0:
        return bucket.ttl_s
    return max(0.0, (bucket.capacity - level) / bucket.rate)


class StoreUnavailable(Exception):
    """The bucket store cannot be reached (Redis down): limits cannot be checked."""


class BucketStore(Protocol):
    """Keeps bucket levels; every method is atomic over its takes.

    Raises StoreUnavailable when it cannot be reached.
    """

    async def take(self, takes: Sequence[Take], now: float) -> list[Level]:
        """Takes every amount if every bucket holds its need, else nothing."""

    async def adjust(self, takes: Sequence[Take], now: float) -> None:
        """Takes (or with a negative amount, gives back) without any check."""


class InProcessBuckets:
    """Buckets in this process's memory: right for a single gateway replica.

    Args:
        max_buckets: expired buckets are dropped once more than this are kept.
    """

    def __init__(self, max_buckets: int = 100_000) -> None:
        # key -> (level, last update, expiry)
        self._state: dict[str, tuple[float, float, float]] = {}
        self._max = max_buckets
        self._sweep_at = max_buckets

    def _level(self, bucket: Bucket, now: float) -> float:
        state = self._state.get(bucket.key)
        if state is None or state[2] <= now:
            return bucket.capacity
        return refill(state[0], state[1], now, bucket)

    async def take(self, takes: Sequence[Take], now: float) -> list[Level]:
        levels = [self._level(t.bucket, now) for t in takes]
        ok = all(level >= t.need for level, t in zip(levels, takes, strict=True))
        result = []
        for level, t in zip(levels, takes, strict=True):
            after = level - t.amount if ok else level
            if ok:
                self._store(t.bucket, after, now)
            result.append(Level(ok, after, wait_time(level, t.need, t.bucket)))
        return result

    async def adjust(self, takes: Sequence[Take], now: float) -> None:
        for t in takes:
            self._store(t.bucket, self._level(t.bucket, now) - t.amount, now)

    def _store(self, bucket: Bucket, level: float, now: float) -> None:
        self._state[bucket.key] = (level, now, now + keep_time(level, bucket))
        if len(self._state) > self._sweep_at:
            self._state = {k: v for k, v in self._state.items() if v[2] > now}
            # Buckets still live are needed: with more of them than the bound
            # (quotas live for their whole period), sweeping at each store cost
            # a pass over all of them per take: 8.3 ms a take with 100,001 live,
            # against 0.004 ms this way (200 takes, at 4b9687e and at 763b9f7).
            self._sweep_at = max(self._max, 2 * len(self._state))


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: `20ms`, `1s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    total = math.ceil(seconds)
    hours, rest = divmod(total, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes}m{secs}s"
    if minutes:
        return f"{minutes}m{secs}s"
    return f"{secs}s"


Clock = Callable[[], float]
