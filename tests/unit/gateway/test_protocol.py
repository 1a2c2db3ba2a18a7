"""The HTTP protocol's bounds on request heads (their size and the time they
take), served by a real uvicorn on loopback."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvicorn
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from citadel.gateway.protocol import (
    HeadBoundedProtocol,
    HeadRefusal,
    RefusedHeads,
    head_bounded,
)

pytestmark = pytest.mark.unit

BOUND = 16 * 1024
CHUNK = 4 * 1024
# Long enough for a loaded machine to send a head in time; short enough to wait.
TIMEOUT = 0.4
SLOW_S = 1.5 * TIMEOUT
"""How long the app takes to answer `/slow`: past the head timeout."""


@dataclass
class Served:
    """A server on loopback and what happened to it."""

    port: int
    refused: list[HeadRefusal] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)


@asynccontextmanager
async def serving(
    bound: int = BOUND, head_timeout_s: float = 60.0
) -> AsyncIterator[Served]:
    """uvicorn with the bounded protocol on a free port, answering 200 `ok`
    (after `SLOW_S` for `/slow`; accepting WebSockets, and holding one open on
    `/hold` until the client closes it) and noting each request the app saw."""
    served = Served(port=0)

    async def app(
        scope: MutableMapping[str, Any],
        receive: Callable[[], Awaitable[MutableMapping[str, Any]]],
        send: Callable[[MutableMapping[str, Any]], Awaitable[None]],
    ) -> None:
        served.paths.append(scope["path"])
        if scope["type"] == "websocket":
            await receive()
            await send({"type": "websocket.accept"})
            if scope["path"] == "/hold":
                await receive()
            return
        if scope["path"] == "/slow":
            await asyncio.sleep(SLOW_S)
        while (await receive()).get("more_body"):
            pass
        start = {"status": 200, "headers": [(b"content-length", b"2")]}
        await send({"type": "http.response.start", **start})
        await send({"type": "http.response.body", "body": b"ok"})

    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=0,
        http=head_bounded(
            bound, RefusedHeads(served.refused.append), head_timeout_s=head_timeout_s
        ),
        lifespan="off",
        log_config=None,
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    while not server.started:
        await asyncio.sleep(0.01)
    served.port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield served
    finally:
        server.should_exit = True
        await task


def head(target: str = "/", size: int = 0, **headers: str) -> bytes:
    """A GET's head whose target and fields (each counted with 4 bytes for `: `
    and CRLF) come to `size` bytes, with `x-pad-*` fields to make it so (of
    under 4 KiB each: the `websockets` library refuses lines over 8 KiB)."""
    fields = {"host": "gw", **headers}
    used = len(target) + sum(len(k) + len(v) + 4 for k, v in fields.items())
    for i in range(size):
        name = f"x-pad-{i}"
        pad = min(size - used - len(name) - 4, 4000)
        assert pad >= 0
        fields[name] = "a" * pad
        used += len(name) + pad + 4
        if used == size:
            break
    lines = [f"GET {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in fields.items()]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


async def exchange(port: int, *writes: bytes) -> bytes:
    """Sends each write (letting the server read it alone), then reads what
    comes back until the server closes or stays silent for a second."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        for data in writes:
            writer.write(data)
            await writer.drain()
            await asyncio.sleep(0.02)
        answer = b""
        while True:
            try:
                chunk = await asyncio.wait_for(reader.read(65536), 1.0)
            except TimeoutError:
                return answer
            if not chunk:
                return answer
            answer += chunk
    finally:
        writer.close()


def status_of(answer: bytes) -> int:
    return int(answer.split(b" ", 2)[1])


async def test_a_head_at_the_bound_is_served() -> None:
    async with serving() as served:
        answer = await exchange(served.port, head(size=BOUND))
    assert status_of(answer) == 200 and answer.endswith(b"ok")
    assert served.paths == ["/"] and not served.refused


async def test_a_head_past_the_bound_gets_431_and_a_closed_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="citadel.gateway.protocol")
    async with serving() as served:
        # Whole, in one read, and in reads of a few KiB.
        whole = head(size=BOUND + 1)
        pieces = [whole[i : i + CHUNK] for i in range(0, len(whole), CHUNK)]
        answers = [
            await exchange(served.port, whole),
            await exchange(served.port, *pieces),
        ]
    for answer in answers:
        status, _, rest = answer.partition(b"\r\n")
        assert status == b"HTTP/1.1 431 Request Header Fields Too Large"
        headers, _, body = rest.partition(b"\r\n\r\n")
        assert b"connection: close" in headers
        error = json.loads(body)["error"]
        assert error["code"] == "headers_too_large"
        assert str(BOUND) in error["message"]
    # The app never saw them; each counted, the first logged (the second came
    # within LOG_EVERY_S of it), without its headers.
    assert served.paths == [] and served.refused == [HeadRefusal.TOO_LARGE] * 2
    records = [r for r in caplog.records if r.name == "citadel.gateway.protocol"]
    assert [r.refused for r in records] == [1]  # type: ignore[attr-defined]
    assert records[0].reason == "too_large"  # type: ignore[attr-defined]
    assert all("aaaa" not in str(vars(r)) for r in records)


def test_a_flood_of_refused_heads_is_counted_each_and_logged_every_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A line per refusal turned a flood of oversized heads (some 800 a second)
    into as many log lines."""
    caplog.set_level(logging.WARNING, logger="citadel.gateway.protocol")
    counted: list[HeadRefusal] = []
    now = [100.0]
    refusals = RefusedHeads(counted.append, log_every_s=10.0, clock=lambda: now[0])
    lines: list[tuple[float, int]] = []  # (when, how many) per line

    def refuse(at: float, client: tuple[str, int]) -> None:
        now[0] = at
        before = len(caplog.records)
        refusals.refused(HeadRefusal.TOO_LARGE, client, BOUND)
        lines.extend((at, r.refused) for r in caplog.records[before:])  # type: ignore[attr-defined]

    for i in range(20_000):  # 25 s at 800 a second
        refuse(100.0 + i / 800, ("10.0.0.7", 40_000 + i % 1000))
    refuse(300.0, ("10.0.0.8", 50_000))  # quiet, then one more
    assert counted == [HeadRefusal.TOO_LARGE] * 20_001
    # The first at once; then at most one line per 10 s, each with how many
    # were refused since the line before (this one included).
    assert lines == [(100.0, 1), (110.0, 8000), (120.0, 8000), (300.0, 4000)]
    last = caplog.records[-1]
    assert last.name == "citadel.gateway.protocol"
    assert last.client == ("10.0.0.8", 50_000)  # type: ignore[attr-defined]
    assert last.max_head_bytes == BOUND  # type: ignore[attr-defined]


async def test_a_head_that_never_ends_is_refused_once_past_the_bound() -> None:
    async with serving() as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: gw\r\nx-pad: ")
        sent = 0
        answer = b""
        while sent < 64 * BOUND and not answer:
            writer.write(b"a" * CHUNK)
            await writer.drain()
            sent += CHUNK
            with suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(65536), 0.02)
        writer.close()
    assert status_of(answer) == 431
    # Refused within a read or two past the bound.
    assert sent <= BOUND + 3 * CHUNK
    assert served.paths == [] and served.refused == [HeadRefusal.TOO_LARGE]


async def test_the_bound_is_per_request_on_a_kept_alive_connection() -> None:
    async with serving() as served:
        # A body larger than the bound, in the same reads as the next request's
        # head, is not counted as part of that head.
        body = b"b" * (3 * BOUND)
        post = b"POST /a HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n\r\n" % len(body)
        second = head("/b", size=BOUND)
        answer = await exchange(
            served.port, post + body + second[:100], second[100:], head("/c", BOUND + 1)
        )
    assert answer.count(b"HTTP/1.1 200 OK") == 2
    assert answer.count(b"HTTP/1.1 431 ") == 1
    assert served.paths == ["/a", "/b"] and served.refused == [HeadRefusal.TOO_LARGE]


async def test_a_websocket_with_too_large_headers_is_not_opened() -> None:
    upgrade = {
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-version": "13",
    }
    async with serving() as served:
        opened = await exchange(served.port, head("/ws", size=BOUND, **upgrade))
        refused = await exchange(served.port, head("/ws", size=BOUND + 1, **upgrade))
    assert status_of(opened) == 101
    assert status_of(refused) == 431
    assert served.paths == ["/ws"] and served.refused == [HeadRefusal.TOO_LARGE]


async def read_to_end(reader: asyncio.StreamReader, limit_s: float = 5.0) -> bytes:
    """What the server sends until it closes the connection (at most `limit_s`)."""
    answer = b""
    while chunk := await asyncio.wait_for(reader.read(65536), limit_s):
        answer += chunk
    return answer


async def send_slowly(writer: asyncio.StreamWriter, data: bytes, over_s: float) -> None:
    """Sends `data` in 10 pieces spread over `over_s` seconds."""
    step = -(-len(data) // 10)
    for i in range(0, len(data), step):
        writer.write(data[i : i + step])
        await writer.drain()
        await asyncio.sleep(over_s / 10)


async def test_a_head_that_comes_too_slowly_gets_408_and_a_closed_connection(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Slowloris: a byte at a time, for as long as the server waits."""
    caplog.set_level(logging.WARNING, logger="citadel.gateway.protocol")
    async with serving(head_timeout_s=TIMEOUT) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(b"GET / HTTP/1.1\r\nhost: gw\r\nx-slow: ")
        began = time.monotonic()
        answer = b""
        while not answer and time.monotonic() - began < 10 * TIMEOUT:
            writer.write(b"a")
            with suppress(TimeoutError):
                answer = await asyncio.wait_for(reader.read(65536), TIMEOUT / 8)
        answer += await read_to_end(reader)  # then it closes
        took = time.monotonic() - began
        writer.close()
    status, _, rest = answer.partition(b"\r\n")
    assert status == b"HTTP/1.1 408 Request Timeout"
    headers, _, body = rest.partition(b"\r\n\r\n")
    assert b"connection: close" in headers
    error = json.loads(body)["error"]
    assert error["code"] == "headers_timeout"
    assert error["type"] == "invalid_request_error"
    assert f"within {TIMEOUT:g} s" in error["message"]
    # Answered while the client still sent a byte every TIMEOUT / 8: the time
    # runs from the head's start, not from its last byte. (No tighter bound: a
    # loaded machine delays the answer, not the rule.)
    assert TIMEOUT <= took < 10 * TIMEOUT
    assert served.paths == [] and served.refused == [HeadRefusal.TIMED_OUT]
    (record,) = [r for r in caplog.records if r.name == "citadel.gateway.protocol"]
    assert record.reason == "timed_out"  # type: ignore[attr-defined]
    assert record.head_timeout_s == TIMEOUT  # type: ignore[attr-defined]
    assert record.refused == 1  # type: ignore[attr-defined]
    assert record.client[0] == "127.0.0.1"  # type: ignore[attr-defined]


async def test_the_head_time_is_per_request_and_never_the_bodys() -> None:
    """Each head has the whole time from its own first byte; a body, and the
    wait between requests (uvicorn's keep-alive timeout), are not timed."""
    body = b"b" * 100
    post = b"POST /b HTTP/1.1\r\nhost: gw\r\ncontent-length: %d\r\n\r\n" % len(body)
    async with serving(head_timeout_s=TIMEOUT) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        await send_slowly(writer, head("/a"), over_s=TIMEOUT / 2)
        writer.write(post)
        await send_slowly(writer, body, over_s=2 * TIMEOUT)
        await asyncio.sleep(2 * TIMEOUT)  # idle, kept alive
        await send_slowly(writer, head("/c"), over_s=TIMEOUT / 2)
        await asyncio.sleep(2 * TIMEOUT)
        writer.write_eof()
        answer = await read_to_end(reader)
        writer.close()
    assert answer.count(b"HTTP/1.1 200 OK") == 3
    assert b" 408 " not in answer
    assert served.paths == ["/a", "/b", "/c"] and not served.refused


async def test_a_connection_that_sends_nothing_is_closed_uncounted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A socket held without a byte costs what a slow head does; with no
    request there is nothing to answer (or to count: clients open connections
    ahead of need)."""
    caplog.set_level(logging.WARNING, logger="citadel.gateway.protocol")
    async with serving(head_timeout_s=TIMEOUT) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        began = time.monotonic()
        answer = await read_to_end(reader)
        took = time.monotonic() - began
        writer.close()
    assert answer == b""
    # Closed by the server (read_to_end gives up after 5 s otherwise), and not
    # before the head timeout.
    assert took >= TIMEOUT
    assert not served.refused
    assert not [r for r in caplog.records if r.name == "citadel.gateway.protocol"]


async def test_an_open_websocket_outlives_the_head_timeout() -> None:
    """uvicorn hands an upgraded socket to another protocol, which would never
    cancel this one's timer."""
    upgrade = {
        "upgrade": "websocket",
        "connection": "Upgrade",
        "sec-websocket-key": "dGhlIHNhbXBsZSBub25jZQ==",
        "sec-websocket-version": "13",
    }
    async with serving(head_timeout_s=TIMEOUT) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(head("/hold", **upgrade))
        opened = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        await asyncio.sleep(3 * TIMEOUT)
        # Still open, and silent: a read waits.
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(reader.read(65536), TIMEOUT)
        writer.close()
    assert status_of(opened) == 101
    assert served.paths == ["/hold"] and not served.refused


async def test_a_head_behind_a_request_still_answered_waits_for_that_answer() -> None:
    """Pipelined: a 408 sent while the request before is answered would be read
    as that request's answer (and uvicorn stops reading meanwhile)."""
    async with serving(head_timeout_s=TIMEOUT) as served:
        reader, writer = await asyncio.open_connection("127.0.0.1", served.port)
        writer.write(head("/slow") + b"GET /next HTTP/1.1\r\nhost: gw\r\n")
        answer = await read_to_end(reader)
        writer.close()
    first, _, second = answer.partition(b"ok")
    assert status_of(first) == 200
    assert second.startswith(b"HTTP/1.1 408 Request Timeout\r\n")
    assert served.paths == ["/slow"] and served.refused == [HeadRefusal.TIMED_OUT]


def test_each_reason_is_logged_in_a_period_of_its_own(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A flood of oversized heads must not hide the first slow one, nor the
    other way round."""
    caplog.set_level(logging.WARNING, logger="citadel.gateway.protocol")
    counted: list[HeadRefusal] = []
    now = [100.0]
    refusals = RefusedHeads(counted.append, log_every_s=10.0, clock=lambda: now[0])
    client = ("10.0.0.7", 40_000)
    large, slow = HeadRefusal.TOO_LARGE, HeadRefusal.TIMED_OUT
    for at, reason in [(100, large), (101, slow), (102, large), (103, slow)]:
        now[0] = at
        refusals.refused(reason, client, BOUND if reason is large else TIMEOUT)
    now[0] = 110.5
    refusals.refused(large, client, BOUND)
    assert counted == [large, slow, large, slow, large]
    lines = [
        (r.reason, r.refused, getattr(r, "max_head_bytes", None))  # type: ignore[attr-defined]
        for r in caplog.records
    ]
    assert lines == [
        ("too_large", 1, BOUND),
        ("timed_out", 1, None),
        ("too_large", 2, BOUND),
    ]
    assert caplog.records[1].head_timeout_s == TIMEOUT  # type: ignore[attr-defined]
    assert "408" in caplog.records[1].getMessage()


def test_uvicorn_still_has_what_the_bound_overrides() -> None:
    # The bound rides on uvicorn's internals: if a release renames or drops one
    # of these, an override would silently stop being called.
    overridden = {
        name
        for name, value in vars(HeadBoundedProtocol).items()
        if callable(value) and not name.startswith("_")
    }
    assert overridden == {
        "connection_made",
        "connection_lost",
        "data_received",
        "on_message_begin",
        "on_headers_complete",
        "on_body",
        "on_message_complete",
        "handle_websocket_upgrade",
    }
    assert overridden <= set(vars(HttpToolsProtocol))
    # A whole head is measured by what uvicorn's on_url and on_header keep
    # (`url`, `headers`): the tests at and past the bound pin that. The head's
    # timer uses uvicorn's `loop` and `cycle`: the timeout tests pin those.
