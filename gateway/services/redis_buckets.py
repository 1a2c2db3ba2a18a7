"""Buckets in Redis: one Lua script per call, so every gateway replica shares them
atomically. The arithmetic is the same as `buckets.InProcessBuckets`.

Each bucket is a hash {l: level, t: last update} with an expiry. The caller passes
the time (gateways' clocks are assumed to agree to well under a second).
"""

from __future__ import annotations

from collections.abc import Sequence

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from citadel.gateway.services.buckets import Level, StoreUnavailable, Take, wait_time

PREFIX = "citadel:bucket:"

# KEYS: bucket keys. ARGV: now, check (1 = all-or-nothing take, 0 = adjust), then
# per bucket: capacity, rate, amount, need, ttl_ms. Returns per bucket
# {ok, level-before, level-after} as strings (Lua numbers would be truncated).
_SCRIPT = """
local now = tonumber(ARGV[1])
local check = ARGV[2] == '1'
local n = #KEYS
local before = {}
local ok = true
for i = 1, n do
  local base = 2 + (i - 1) * 5
  local cap = tonumber(ARGV[base + 1])
  local rate = tonumber(ARGV[base + 2])
  local need = tonumber(ARGV[base + 4])
  local state = redis.call('HMGET', KEYS[i], 'l', 't')
  local level = cap
  if state[1] then
    local elapsed = math.max(0, now - tonumber(state[2]))
    level = math.min(cap, tonumber(state[1]) + elapsed * rate)
  end
  before[i] = level
  if check and level < need then ok = false end
end
local out = {}
for i = 1, n do
  local base = 2 + (i - 1) * 5
  local amount = tonumber(ARGV[base + 3])
  local ttl = tonumber(ARGV[base + 5])
  local after = before[i]
  if ok then
    after = before[i] - amount
    redis.call('HSET', KEYS[i], 'l', tostring(after), 't', tostring(now))
    -- As keep_time: a refilling bucket stays until it is full again.
    local rate = tonumber(ARGV[base + 2])
    local cap = tonumber(ARGV[base + 1])
    if rate > 0 then
      ttl = math.max(ttl, math.ceil((cap - after) / rate * 1000))
    end
    -- Lua writes numbers past 14 digits in exponent form, which PEXPIRE
    -- refuses, and the script would stop half done: at most about 30 years.
    redis.call('PEXPIRE', KEYS[i], math.min(ttl, 1e12))
  end
  out[i] = {ok and '1' or '0', tostring(before[i]), tostring(after)}
end
return out
"""


HEALTH_CHECK_S = 10.0
"""Seconds a Redis connection may stay idle before it is pinged at its next use."""


def redis_client(url: str, timeout_s: float) -> aioredis.Redis:
    """The gateway's client of its Redis (`redis://host:port/db`), one pool for
    the limits and the placements. A call or a connect slower than `timeout_s`
    fails (limits then fail open as StoreUnavailable; a publish that stalls
    holds back only the placements behind it); a connection idle for
    `HEALTH_CHECK_S` is pinged before its next use, so that the placements
    subscription, which waits with a timeout of its own, finds one cut
    without a word."""
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout_s,
        socket_connect_timeout=timeout_s,
        health_check_interval=HEALTH_CHECK_S,
    )


class RedisBuckets:
    """Buckets shared through Redis.

    Args:
        client: a `redis.asyncio` client (its pool is shared by every request).
    """

    def __init__(self, client: aioredis.Redis) -> None:
        self._client = client
        self._script = client.register_script(_SCRIPT)

    async def _run(self, takes: Sequence[Take], now: float, check: bool) -> list[Level]:
        keys = [PREFIX + t.bucket.key for t in takes]
        args: list[str | float | int] = [repr(now), "1" if check else "0"]
        for t in takes:
            b = t.bucket
            ttl_ms = max(1, int(b.ttl_s * 1000))
            args += [repr(b.capacity), repr(b.rate), repr(t.amount), repr(t.need)]
            args.append(ttl_ms)
        try:
            rows = await self._script(keys=keys, args=args)
        except RedisError as err:
            raise StoreUnavailable(f"redis: {err}") from err
        result = []
        for t, (ok, before, after) in zip(takes, rows, strict=True):
            level_before = float(before)
            result.append(
                Level(
                    ok in (b"1", "1"),
                    float(after),
                    wait_time(level_before, t.need, t.bucket),
                )
            )
        return result

    async def take(self, takes: Sequence[Take], now: float) -> list[Level]:
        if not takes:
            return []
        return await self._run(takes, now, check=True)

    async def adjust(self, takes: Sequence[Take], now: float) -> None:
        if takes:
            await self._run(takes, now, check=False)
