"""Two gateway processes sharing one Redis enforce one limit between them."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from citadel.gateway.errors import QuotaExceeded
from citadel.gateway.routes import ModelRoute
from citadel.gateway.services.auth import KeyRecord, Principal
from citadel.gateway.services.buckets import Bucket, Take
from citadel.gateway.services.limits import Limiter
from citadel.gateway.services.redis_buckets import PREFIX, RedisBuckets, redis_client

pytestmark = pytest.mark.integration

TIMEOUT_S = 0.25
"""The stores' calls' bound here (the gateway's default redis_timeout_s)."""


def test_two_gateways_share_one_rate_limit(
    tmp_path: Path,
    start_backend: Any,
    start_gateway: Any,
    helpers: Any,
    redis_url: str,
) -> None:
    backend = start_backend("a")
    keys = tmp_path / "keys.json"
    # 3 per minute: one refills every 20 s, far longer than this test's requests.
    key = helpers.create_key(keys, "shared", "--rpm", "3")
    models = [helpers.route("smol", [backend])]
    first = start_gateway(models, keys, redis_url=redis_url)
    second = start_gateway(models, keys, redis_url=redis_url)
    statuses = []
    for i in range(8):
        gateway = (first, second)[i % 2]
        answer = httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "smol", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key}"},
        )
        statuses.append(answer.status_code)
    assert statuses.count(200) == 3
    assert statuses.count(429) == 5
    assert len(backend.received()) == 3
    rejected = first.metric("citadel_gateway_rate_limited_total") + second.metric(
        "citadel_gateway_rate_limited_total"
    )
    assert rejected == 5


def test_requests_are_served_while_redis_is_down(
    tmp_path: Path, start_backend: Any, start_gateway: Any, helpers: Any
) -> None:
    from socket import socket

    with socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = f"redis://127.0.0.1:{s.getsockname()[1]}/0"
    backend = start_backend("a")
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "k", "--rpm", "1")
    gateway = start_gateway([helpers.route("smol", [backend])], keys, redis_url=dead)
    statuses = [
        httpx.post(
            gateway.url + "/v1/chat/completions",
            json={"model": "smol", "messages": [{"role": "user", "content": "hi"}]},
            headers={"authorization": f"Bearer {key}"},
        ).status_code
        for _ in range(2)
    ]
    assert statuses == [200, 200]  # limits fail open, serving goes on
    assert "store unavailable" in gateway.log.read_text()


async def test_redis_keeps_a_debt_until_it_has_refilled(redis_url: str) -> None:
    client = redis_client(redis_url, TIMEOUT_S)
    store = RedisBuckets(client)
    bucket = Bucket("debt", 100, 100 / 60, 120)  # a 100-per-minute bucket
    try:
        assert (await store.take([Take(bucket, 1_000, 100)], 0.0))[0].ok
        # 900 in debt: full again after (100 + 900) / (100 / 60) = 600 s, not 120.
        ttl_ms = await store._client.pttl(PREFIX + "debt")
        assert 599_000 <= ttl_ms <= 600_000
        assert (await store.take([Take(bucket, 1, 1)], 130.0))[0].ok is False
    finally:
        await client.aclose()


async def test_a_debt_past_lua_numbers_still_expires_and_is_given_back(
    redis_url: str,
) -> None:
    """A debt whose refill takes longer than 10^14 ms broke the script half way
    (Lua wrote the expiry in exponent form): the request was let through
    unchecked, the bucket kept its debt for ever, and nothing gave it back."""
    client = redis_client(redis_url, TIMEOUT_S)
    store = RedisBuckets(client)
    bucket = Bucket("deep", 1_000, 1_000 / 60, 120)
    try:
        # The gateway's estimates stop at 10^9 tokens; the store takes more.
        [level] = await store.take([Take(bucket, 10**13, 1_000)], 0.0)
        assert level.ok
        assert 0 < await store._client.pttl(PREFIX + "deep") <= 10**12
        await store.adjust([Take(bucket, -(10**13), 0)], 1.0)  # given back
        assert (await store.take([Take(bucket, 1, 1)], 2.0))[0].ok
    finally:
        await client.aclose()


async def test_a_quota_in_redis_follows_its_key_within_the_period(
    redis_url: str,
) -> None:
    """Quota buckets count what is used, offset by 10^12 (Lua's numbers must
    keep it exact): a raised quota unblocks the key at once."""
    client = redis_client(redis_url, TIMEOUT_S)
    store = RedisBuckets(client)
    limiter = Limiter(store, time.time)
    route = ModelRoute.model_validate(
        {"name": "m", "namespace": "n", "servedName": "m", "service": "m"}
    )

    def key(daily: int) -> Principal:
        name = f"quota-{id(store)}"
        record = KeyRecord(name=name, hash="sha256:" + "1" * 64, daily_tokens=daily)
        return Principal(record)

    try:
        await limiter.settle(await limiter.admit(key(1_000), route, 999), 999)
        with pytest.raises(QuotaExceeded):
            await limiter.admit(key(1_000), route, 2)
        await limiter.admit(key(1_000), route, 1)
        [standing] = await limiter.standing(key(5_000), [route])
        assert standing.remaining == 4_000
    finally:
        await client.aclose()


async def test_a_stalled_redis_fails_open_within_its_timeout() -> None:
    # A server that accepts connections and never answers.
    accepted: list[asyncio.StreamWriter] = []

    async def hang(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)

    server = await asyncio.start_server(hang, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = redis_client(f"redis://127.0.0.1:{port}/0", 0.2)
    store = RedisBuckets(client)
    limiter = Limiter(store, time.time)
    who = Principal(KeyRecord(name="k", hash="sha256:" + "0" * 64, rpm=5))
    route = ModelRoute.model_validate(
        {"name": "m", "namespace": "n", "servedName": "m", "service": "m"}
    )
    started = time.monotonic()
    try:
        admission = await limiter.admit(who, route, 10)
    finally:
        await client.aclose()
        for writer in accepted:
            writer.close()
        server.close()
        await server.wait_closed()
    assert time.monotonic() - started < 2  # redis-py's default would wait 5 s
    assert admission.token_takes == ()  # admitted unchecked
