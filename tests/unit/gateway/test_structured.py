"""The proxy's answers as objects (for gRPC and GraphQL), cancellation, and
reading a caller's limits without taking from them."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import orjson
import pytest

from citadel.gateway.errors import BackendTimeout, InvalidRequest, ModelNotFound
from citadel.gateway.routes import ModelRoute
from citadel.gateway.services.buckets import InProcessBuckets
from citadel.gateway.services.limits import Limiter
from citadel.gateway.services.requests import CHAT, Door
from citadel.gateway.services.structured import ask, events, usable_models

pytestmark = pytest.mark.unit


async def test_answers_come_back_parsed(kit: Any) -> None:
    harness = kit.build()
    who = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    answer = await ask(
        harness.deps.proxy, CHAT, who, dict(kit.chat), "rid-1", Door.GRPC
    )
    assert answer.body["choices"][0]["message"]["content"] == "hi"
    assert answer.headers["x-request-id"] == "rid-1"


async def test_a_replica_refusal_becomes_invalid_request(kit: Any) -> None:
    error = {"error": {"message": "max_tokens too big", "param": "max_tokens"}}
    harness = kit.build()
    harness.upstream.handler = lambda url, body: kit.reply(400, orjson.dumps(error))
    who = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    with pytest.raises(InvalidRequest) as caught:
        await ask(harness.deps.proxy, CHAT, who, dict(kit.chat), "rid", Door.GRPC)
    assert caught.value.message == "max_tokens too big"
    assert caught.value.param == "max_tokens"


async def _pieces(*parts: bytes) -> AsyncIterator[bytes]:
    for part in parts:
        yield part


async def test_events_are_cut_at_boundaries_and_errors_raise() -> None:
    stream = _pieces(b'data: {"a": 1}\n\nda', b'ta: {"a": 2}\n\n', b"data: [DONE]\n\n")
    assert [e async for e in events(stream)] == [{"a": 1}, {"a": 2}]
    broken = _pieces(b'data: {"error": {"code": "backend_timeout"}}\n\n')
    with pytest.raises(BackendTimeout):
        _ = [e async for e in events(broken)]


async def test_events_closed_unread_close_their_stream() -> None:
    # A door that gives up between the answer and its first read still frees
    # the relay (and the replica it holds) by closing the events.
    class Relay:
        closed = False

        def __aiter__(self) -> Relay:
            return self

        async def __anext__(self) -> bytes:
            raise StopAsyncIteration

        async def aclose(self) -> None:
            self.closed = True

    relay = Relay()
    await events(relay).aclose()
    assert relay.closed


class HangingUpstream:
    """Never answers until cancelled."""

    def __init__(self) -> None:
        self.started = asyncio.Event()

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float | None = None,
    ) -> Any:
        self.started.set()
        await asyncio.Event().wait()


async def test_cancel_frees_the_replica_and_counts_499(kit: Any) -> None:
    harness = kit.build()
    hanging = HangingUpstream()
    harness.deps.proxy._upstream = hanging
    who = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    task = asyncio.create_task(
        ask(harness.deps.proxy, CHAT, who, dict(kit.chat), "rid", Door.GRPC)
    )
    await hanging.started.wait()
    route = harness.deps.catalog.resolve("chat")
    assert sum(r.in_flight for r in harness.deps.catalog.replicas(route)) == 1
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert sum(r.in_flight for r in harness.deps.catalog.replicas(route)) == 0
    labels = {
        "api": "chat",
        "model": "smollm2",
        "status": "499",
        "key": "alice",
        "door": "grpc",
    }
    sample = harness.deps.metrics.registry.get_sample_value
    assert sample("citadel_gateway_requests_total", labels) == 1


async def test_standing_reads_limits_without_taking(kit: Any) -> None:
    harness = kit.build(kit.document(limits={"rpm": 10}))
    limiter = Limiter(InProcessBuckets(), harness.clock)
    who = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    routes: list[ModelRoute] = [r for _, r in usable_models(harness.deps.catalog, who)]
    for _ in range(3):
        (standing,) = await limiter.standing(who, routes)
        assert (standing.scope, standing.window, standing.model) == (
            "requests",
            "minute",
            "smollm2",
        )
        assert (standing.limit, standing.remaining) == (10, 10)
    await limiter.admit(who, routes[0], 5)
    (standing,) = await limiter.standing(who, routes)
    assert standing.remaining == 9


@pytest.mark.parametrize(
    "body",
    [b'"model not found"', b"Not Found\n\x00\x1b[31m  at  the  proxy\r\n"],
    ids=["JSON but no object", "text with controls"],
)
async def test_a_refusal_without_an_error_object_quotes_the_replica(
    kit: Any, body: bytes
) -> None:
    harness = kit.build()
    harness.upstream.handler = lambda url, sent: kit.reply(404, body)
    who = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    with pytest.raises(ModelNotFound) as caught:
        await ask(harness.deps.proxy, CHAT, who, dict(kit.chat), "rid", Door.GRPC)
    message = caught.value.message
    assert "status 404" in message
    assert "Not Found" in message or "model not found" in message
    assert message.isprintable() and "  " not in message


async def test_a_long_refusal_is_quoted_short(kit: Any) -> None:
    harness = kit.build()
    page = b"<p>" + b"word " * 1000 + b"</p>"
    harness.upstream.handler = lambda url, sent: kit.reply(400, page)
    who = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    with pytest.raises(InvalidRequest) as caught:
        await ask(harness.deps.proxy, CHAT, who, dict(kit.chat), "rid", Door.GRPC)
    assert len(caught.value.message) < 300
