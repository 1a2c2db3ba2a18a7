"""The upstream client against scripted HTTP servers on loopback.

Each server is a plain asyncio server that reads a request head and answers with
bytes the test chooses, so the client meets exactly the responses, closes and
silences a replica can produce.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import ipaddress
import re
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from citadel.gateway.upstream import (
    _STALE_WITHIN_S,
    UpstreamBroken,
    UpstreamClient,
    UpstreamConnectTimeout,
    UpstreamDropped,
    UpstreamSettings,
    UpstreamTimeout,
    UpstreamUnreachable,
)

pytestmark = pytest.mark.unit

# (the connection's number from 0, its request's number on it from 0, the reader,
# the writer) -> whether to keep serving the connection.
Handler = Callable[
    [int, int, asyncio.StreamReader, asyncio.StreamWriter], Awaitable[bool]
]


class Server:
    """Serves `handler` on 127.0.0.1; counts connections and requests."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.connections = 0
        self.requests: list[bytes] = []
        self.url = ""
        self._server: asyncio.Server | None = None

    async def start(self, tls: ssl.SSLContext | None = None) -> Server:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=tls)
        port = self._server.sockets[0].getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{port}"
        return self

    async def _serve(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        number, self.connections = self.connections, self.connections + 1
        try:
            for on_connection in range(1_000):
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    if line.lower().startswith(b"content-length:"):
                        length = int(line.split(b":", 1)[1])
                self.requests.append(head + await reader.readexactly(length))
                if not await self.handler(number, on_connection, reader, writer):
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def stop(self) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()


def reply(body: bytes, *extra: bytes) -> bytes:
    head = [
        b"HTTP/1.1 200 OK",
        b"content-type: application/json",
        b"content-length: %d" % len(body),
        *extra,
    ]
    return b"\r\n".join(head) + b"\r\n\r\n" + body


async def answer_json(
    _: int, __: int, ___: asyncio.StreamReader, writer: asyncio.StreamWriter
) -> bool:
    writer.write(reply(b'{"ok": true}'))
    await writer.drain()
    return True


@pytest.fixture
async def serve() -> AsyncIterator[Callable[..., Awaitable[Server]]]:
    servers: list[Server] = []

    async def start(handler: Handler, tls: ssl.SSLContext | None = None) -> Server:
        server = await Server(handler).start(tls)
        servers.append(server)
        return server

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def client() -> AsyncIterator[UpstreamClient]:
    upstream = UpstreamClient(UpstreamSettings(connect_timeout_s=2, read_timeout_s=5))
    await upstream.start()
    yield upstream
    await upstream.close()


async def test_a_json_reply_and_the_connection_is_kept_for_the_next(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    server = await serve(answer_json)
    for _ in range(3):
        response = await client.post(
            server.url + "/v1/chat/completions",
            b'{"model": "m"}',
            {"content-type": "application/json", "x-request-id": "r1"},
        )
        assert response.status == 200
        assert response.content_type == "application/json"
        assert await response.read() == b'{"ok": true}'
    assert server.connections == 1
    head = server.requests[0]
    assert head.startswith(b"POST /v1/chat/completions HTTP/1.1\r\n")
    assert b"\r\nx-request-id: r1\r\n" in head
    assert b"\r\ncontent-length: 14\r\n" in head
    assert head.endswith(b'\r\n\r\n{"model": "m"}')


async def test_a_replicas_retry_after_is_read_with_its_reply_alone(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    # The doors tell their clients when to retry a replica's 429 (vLLM's
    # queue full): the next reply on the connection is read without it.
    async def busy_then_ok(
        _: int, number: int, __: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        body = b'{"error": {"message": "busy"}}'
        if number == 0:
            writer.write(
                reply(body, b"Retry-After: 7").replace(b"200 OK", b"429 Too Many")
            )
        else:
            writer.write(reply(b'{"ok": true}'))
        await writer.drain()
        return True

    server = await serve(busy_then_ok)
    busy = await client.post(server.url + "/", b"{}", {})
    await busy.read()
    assert (busy.status, busy.retry_after) == (429, "7")
    ok = await client.post(server.url + "/", b"{}", {})
    await ok.read()
    assert (ok.status, ok.retry_after) == (200, None)
    assert server.connections == 1


def chunked(first: bytes, rest: bytes, go_on: asyncio.Event) -> Handler:
    """A handler that streams `first` (after the head), then `rest` once `go_on`
    is set; both are raw chunked-encoding bytes."""

    async def stream(
        _: int, __: int, ___: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n" + first
        )
        await writer.drain()
        await go_on.wait()
        writer.write(rest)
        await writer.drain()
        return True

    return stream


async def test_a_chunked_stream_arrives_piece_by_piece(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    go_on = asyncio.Event()
    # The rest only once the client holds the first piece.
    server = await serve(chunked(b"5\r\nfirst\r\n", b"6\r\nsecond\r\n0\r\n\r\n", go_on))
    response = await client.post(server.url + "/v1/completions", b"{}", {})
    assert response.content_type == "text/event-stream"
    pieces = []
    async for chunk in response.chunks():
        pieces.append(chunk)
        go_on.set()
    assert pieces == [b"first", b"second"]
    # The stream was read whole: its connection serves the next request.
    server.handler = answer_json
    assert await (await client.post(server.url + "/", b"{}", {})).read()
    assert server.connections == 1


async def test_chunks_received_together_are_one_piece(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    go_on = asyncio.Event()
    # Three HTTP chunks in one write: the relay gets them in one piece.
    rest = b"1\r\na\r\n1\r\nb\r\n1\r\nc\r\n0\r\n\r\n"
    server = await serve(chunked(b"", rest, go_on))
    response = await client.post(server.url + "/v1/completions", b"{}", {})
    assert response.status == 200
    go_on.set()

    async def all_received() -> None:
        while not (conn := response._conn) or not conn.complete:
            await asyncio.sleep(0.001)

    # Nothing is taken before the whole write is here.
    await asyncio.wait_for(all_received(), 5)
    assert [chunk async for chunk in response.chunks()] == [b"abc"]


async def test_a_client_that_falls_behind_pauses_the_replica(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    piece = b"x" * 65536
    body = b"".join(b"10000\r\n" + piece + b"\r\n" for _ in range(6))
    sent = asyncio.Event()
    sent.set()
    server = await serve(chunked(body + b"0\r\n\r\n", b"", sent))
    response = await client.post(server.url + "/v1/completions", b"{}", {})
    conn = response._conn
    assert conn is not None

    async def paused() -> None:
        while not conn._paused:
            await asyncio.sleep(0.001)

    # Over 256 KB held and nothing taken: the socket is no longer read.
    await asyncio.wait_for(paused(), 5)
    first = await conn.next_chunk(5, None)
    assert first and not conn._paused
    rest = [chunk async for chunk in response.chunks()]
    assert first + b"".join(rest) == piece * 6


async def test_nothing_listening_is_unreachable(client: UpstreamClient) -> None:
    server = await Server(answer_json).start()
    await server.stop()
    with pytest.raises(UpstreamUnreachable, match="cannot connect"):
        await client.post(server.url + "/", b"{}", {})


async def test_a_connection_not_made_in_time_is_a_connect_timeout(
    client: UpstreamClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Told apart from a refused connection (both unreachable): the proxy
    frees a retry's replica unjudged when its own deadline cut the wait
    short, as the caller's `timeout_s` (0.05 s) does here."""
    loop = asyncio.get_running_loop()

    async def never(*args: object, **kwargs: object) -> object:
        await asyncio.sleep(3600)
        raise AssertionError("connected")

    monkeypatch.setattr(loop, "create_connection", never)
    with pytest.raises(UpstreamConnectTimeout, match="connect timeout"):
        await client.post("http://127.0.0.1:9/", b"{}", {}, timeout_s=0.05)


async def test_an_ipv6_replica_is_named_in_brackets(
    serve: Callable[..., Awaitable[Server]],
    client: UpstreamClient,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A failure at an IPv6 pod's address named it `fd00::1:8000`: an address
    without a port, or another address on port 1:8000."""
    loop = asyncio.get_running_loop()
    real = loop.create_connection
    url = "http://[fd00::1]:8000/v1/completions"

    async def refused(*args: object, **kwargs: object) -> object:
        raise ConnectionRefusedError(111, "Connection refused")

    monkeypatch.setattr(loop, "create_connection", refused)
    with pytest.raises(
        UpstreamUnreachable, match=r"^cannot connect to \[fd00::1\]:8000: "
    ):
        await client.post(url, b"{}", {})

    async def never(*args: object, **kwargs: object) -> object:
        await asyncio.sleep(3600)
        raise AssertionError("connected")

    monkeypatch.setattr(loop, "create_connection", never)
    with pytest.raises(
        UpstreamConnectTimeout, match=r"^connect timeout to \[fd00::1\]:8000$"
    ):
        await client.post(url, b"{}", {}, timeout_s=0.05)

    async def silent(
        _: int, __: int, reader: asyncio.StreamReader, ___: asyncio.StreamWriter
    ) -> bool:
        await reader.read()  # until the client gives up and closes
        return False

    server = await serve(silent)
    port = int(server.url.rsplit(":", 1)[1])

    async def to_server(factory: Any, host: str, _: int, **kwargs: Any) -> Any:
        assert host == "fd00::1"  # what the socket is asked for: no brackets
        return await real(factory, "127.0.0.1", port, **kwargs)

    monkeypatch.setattr(loop, "create_connection", to_server)
    upstream = UpstreamClient(UpstreamSettings(read_timeout_s=0.2))
    with pytest.raises(UpstreamTimeout) as silence:
        await upstream.post(url, b"{}", {})
    assert str(silence.value) == "no answer from [fd00::1]:8000 in 0.2 s"
    assert b"host: [fd00::1]:8000\r\n" in server.requests[0]
    await upstream.close()


LATE = _STALE_WITHIN_S * 3
"""Past the bound within which a reused connection's close means it went stale:
as a replica that worked on the request, then died."""


def hang_up_after(delay_s: float, *, reset: bool = False, answered: int = 0) -> Handler:
    """A handler that answers the first `answered` requests of each connection,
    then, `delay_s` after reading the next one, closes the connection without a
    byte back (a FIN, or with `reset` a RST: a killed process)."""

    async def hang_up(
        _: int, on_connection: int, __: object, writer: asyncio.StreamWriter
    ) -> bool:
        if on_connection < answered:
            writer.write(reply(b"{}"))
            await writer.drain()
            return True
        await asyncio.sleep(delay_s)
        if reset:
            writer.transport.abort()
        return False

    return hang_up


@pytest.mark.parametrize("delay_s", [0, LATE], ids=["at-once", "late"])
async def test_a_new_connection_closed_after_the_request_is_dropped(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient, delay_s: float
) -> None:
    # A new connection cannot have gone stale: the replica took it and the
    # request, so it may have worked on it whenever it hangs up.
    server = await serve(hang_up_after(delay_s))
    with pytest.raises(UpstreamDropped, match="closed the connection without"):
        await client.post(server.url + "/", b"{}", {})
    assert len(server.requests) == 1


async def test_a_kept_alive_connection_the_replica_dropped_is_retried_once(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    # Each connection answers its first request and hangs up on the second, as a
    # replica closing an idle connection just as a request arrives.
    async def once_per_connection(
        _: int, on_connection: int, __: asyncio.StreamReader, w: asyncio.StreamWriter
    ) -> bool:
        if on_connection > 0:
            return False
        w.write(reply(b"{}"))
        await w.drain()
        return True

    server = await serve(once_per_connection)
    assert await (await client.post(server.url + "/", b"1", {})).read() == b"{}"
    assert await (await client.post(server.url + "/", b"2", {})).read() == b"{}"
    assert server.connections == 2
    assert [r[-1:] for r in server.requests] == [b"1", b"2", b"2"]


@pytest.mark.parametrize("reset", [False, True], ids=["fin", "rst"])
async def test_a_kept_alive_connection_dropped_late_is_not_sent_again(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient, reset: bool
) -> None:
    # The replica read the second request and worked on it before it died: a
    # new connection to it would run the same generation twice.
    server = await serve(hang_up_after(LATE, reset=reset, answered=1))
    assert await (await client.post(server.url + "/", b"1", {})).read() == b"{}"
    with pytest.raises(UpstreamDropped, match="without answering"):
        await client.post(server.url + "/", b"2", {})
    assert [r[-1:] for r in server.requests] == [b"1", b"2"]
    assert server.connections == 1


async def test_a_body_cut_short_is_broken(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    async def cut(_: int, __: int, ___: object, writer: asyncio.StreamWriter) -> bool:
        writer.write(reply(b"0123456789" * 10)[:-90])
        await writer.drain()
        return False

    server = await serve(cut)
    response = await client.post(server.url + "/", b"{}", {})
    assert response.status == 200
    with pytest.raises(UpstreamBroken, match="broke off"):
        await response.read()


async def test_garbage_is_broken(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    async def garbage(_: int, __: int, ___: object, w: asyncio.StreamWriter) -> bool:
        w.write(b"SMTP ready\r\n\r\n")
        await w.drain()
        return True

    server = await serve(garbage)
    with pytest.raises(UpstreamBroken, match="unreadable"):
        await client.post(server.url + "/", b"{}", {})


async def test_silence_times_out(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    async def silent(
        _: int, __: int, reader: asyncio.StreamReader, ___: object
    ) -> bool:
        await reader.read()  # until the client gives up and closes
        return False

    server = await serve(silent)
    upstream = UpstreamClient(UpstreamSettings(read_timeout_s=0.2))
    with pytest.raises(UpstreamTimeout, match="no answer"):
        await upstream.post(server.url + "/", b"{}", {})
    await upstream.close()
    assert server.connections == 1


async def test_a_body_left_unread_drops_its_connection(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    rest = asyncio.Event()

    async def slow_body(
        _: int, __: int, ___: object, writer: asyncio.StreamWriter
    ) -> bool:
        whole = reply(b"0123456789")
        writer.write(whole[:-5])
        await writer.drain()
        await rest.wait()
        writer.write(whole[-5:])
        await writer.drain()
        return True

    server = await serve(slow_body)
    response = await client.post(server.url + "/", b"{}", {})
    response.close()  # the body is still coming: its end would be misread
    rest.set()
    server.handler = answer_json
    await (await client.post(server.url + "/", b"{}", {})).read()
    assert server.connections == 2


async def test_a_reply_that_ends_with_the_connection(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    async def http10(_: int, __: int, ___: object, w: asyncio.StreamWriter) -> bool:
        w.write(b"HTTP/1.0 200 OK\r\ncontent-type: text/plain\r\n\r\nall of it")
        await w.drain()
        return False

    server = await serve(http10)
    response = await client.request("GET", server.url + "/metrics", timeout_s=5)
    assert await response.read() == b"all of it"
    assert response.content_type == "text/plain"
    assert server.requests[0].startswith(b"GET /metrics HTTP/1.1\r\n")
    assert b"content-length" not in server.requests[0]


async def test_a_line_break_in_a_header_is_refused(client: UpstreamClient) -> None:
    with pytest.raises(ValueError, match="line break"):
        await client.post(
            "http://127.0.0.1:9/", b"{}", {"x-request-id": "a\r\nx-admin: 1"}
        )


async def test_an_address_that_is_not_http_is_unreachable(
    client: UpstreamClient,
) -> None:
    with pytest.raises(UpstreamUnreachable, match="not an http"):
        await client.post("ftp://127.0.0.1/", b"{}", {})
    # The routing document's pattern lets this through; urlsplit does not.
    with pytest.raises(UpstreamUnreachable, match="not a URL"):
        await client.post("http://[::1:8000/", b"{}", {})


def _self_signed(tmp_path: Path) -> tuple[ssl.SSLContext, ssl.SSLContext]:
    """A server context for 127.0.0.1 and a client context that trusts it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "replica")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(hours=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = tmp_path / "tls.crt", tmp_path / "tls.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    server = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server.load_cert_chain(cert_file, key_file)
    return server, ssl.create_default_context(cafile=str(cert_file))


async def test_https_replicas_are_verified(
    serve: Callable[..., Awaitable[Server]], tmp_path: Path
) -> None:
    server_tls, trusting = _self_signed(tmp_path)
    server = await serve(answer_json, server_tls)
    trusted = UpstreamClient(UpstreamSettings(), tls=trusting)
    assert await (await trusted.post(server.url + "/", b"{}", {})).read()
    await trusted.close()
    # The system's CAs do not know the replica's certificate.
    default = UpstreamClient(UpstreamSettings())
    with pytest.raises(UpstreamUnreachable, match="CERTIFICATE_VERIFY_FAILED"):
        await default.post(server.url + "/", b"{}", {})
    await default.close()


async def test_a_posts_time_bounds_its_headers(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    """What is left of a request's time, shorter than the read timeout (5 s),
    is all a try waits for the headers."""

    async def silent(
        _: int, __: int, reader: asyncio.StreamReader, ___: object
    ) -> bool:
        await reader.read()
        return False

    server = await serve(silent)
    loop = asyncio.get_running_loop()
    began = loop.time()
    with pytest.raises(UpstreamTimeout, match="no answer"):
        await client.post(server.url + "/", b"{}", {}, timeout_s=0.2)
    assert loop.time() - began < 2


async def test_a_whole_bodys_time_is_bounded_but_a_streams_is_not(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    """`read` takes the time left; a stream relayed piece by piece outlives
    the post's bound (it may run as long as it has something to say)."""

    async def slow_body(
        _: int, __: int, ___: object, writer: asyncio.StreamWriter
    ) -> bool:
        whole = reply(b"0123456789")
        writer.write(whole[:-5])
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(whole[-5:])
        await writer.drain()
        return True

    server = await serve(slow_body)
    response = await client.post(server.url + "/", b"{}", {}, timeout_s=0.2)
    with pytest.raises(UpstreamTimeout):
        await response.read(timeout_s=0.1)
    response = await client.post(server.url + "/", b"{}", {}, timeout_s=0.2)
    assert b"".join([piece async for piece in response.chunks()]) == b"0123456789"


async def test_a_streams_pieces_are_bounded_until_the_bound_is_lifted(
    serve: Callable[..., Awaitable[Server]], client: UpstreamClient
) -> None:
    """`chunks` given a bound holds the pieces to it from the call on, over as
    many pieces as they take, though each may wait the read timeout (5 s):
    the proxy's wait for a stream's first output, which may span pieces,
    with no timer of its own. Once lifted, the rest may take longer."""

    async def pause(_: int, __: int, ___: object, writer: asyncio.StreamWriter) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n5\r\nfirst\r\n"
        )
        await writer.drain()
        await asyncio.sleep(0.3)
        writer.write(b"6\r\nsecond\r\n0\r\n\r\n")
        await writer.drain()
        return True

    server = await serve(pause)
    loop = asyncio.get_running_loop()
    response = await client.post(server.url + "/v1/completions", b"{}", {})
    began = loop.time()
    pieces = response.chunks(timeout_s=0.1)
    assert await anext(pieces) == b"first"
    with pytest.raises(UpstreamTimeout, match="no answer"):
        await anext(pieces)
    assert loop.time() - began < 0.3
    response = await client.post(server.url + "/v1/completions", b"{}", {})
    pieces = response.chunks(timeout_s=0.1)
    assert await anext(pieces) == b"first"
    response.lift()
    assert [piece async for piece in pieces] == [b"second"]
    assert server.connections == 2  # the stream cut short was not reused


async def test_a_timeout_says_whether_the_deadline_or_the_read_timeout_ended_it(
    serve: Callable[..., Awaitable[Server]],
) -> None:
    """A stream whose first output was due when the request's deadline had
    already passed was logged as "no answer from host:port in 0 s"; one cut
    short by a bound (the deadline, or a read's own) named the time left as if
    it were the read timeout. The message names no cause it cannot tell: a
    body read is bounded apart from the deadline."""

    async def stall(
        _: int, __: int, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        await reader.read()  # until the client gives up and closes
        return False

    server = await serve(stall)
    upstream = UpstreamClient(UpstreamSettings(read_timeout_s=0.3))
    host_port = server.url.removeprefix("http://")
    response = await upstream.post(server.url + "/v1/completions", b"{}", {})
    with pytest.raises(UpstreamTimeout) as passed:
        await anext(response.chunks(timeout_s=0))
    assert str(passed.value) == (
        f"no answer from {host_port}: no time was left to wait"
    )
    response = await upstream.post(server.url + "/v1/completions", b"{}", {})
    with pytest.raises(UpstreamTimeout) as cut:
        await anext(response.chunks(timeout_s=0.1))
    left = r"in the 0\.\d+ s left to wait"
    assert re.fullmatch(f"no answer from {re.escape(host_port)} {left}", str(cut.value))
    response = await upstream.post(server.url + "/v1/completions", b"{}", {})
    with pytest.raises(UpstreamTimeout) as read:
        await anext(response.chunks())
    assert str(read.value) == f"no answer from {host_port} in 0.3 s"
    await upstream.close()
