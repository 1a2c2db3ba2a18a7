"""The upstream client: kept-alive HTTP/1.1 connections to every replica.

Created once at start-up; a request takes an idle connection to its replica (or
opens one), writes the request in one piece and parses the response with httptools,
the parser uvicorn uses for the gateway's own side. Replicas speak plain HTTP/1.1
(or TLS) on the pod network, so nothing more is needed. aiohttp's client, used
before, cost the gateway about 305 µs of CPU per proxied request at concurrency 64
(2,922 requests/s on 0.89 cores, `make bench` at 29000f4); with this one it is
about 220 µs (3,900 requests/s on 0.85 cores, `make bench` at ededc39).

Failures are sorted into kinds that the proxy treats differently:

- `UpstreamUnreachable`: the request never got to the replica: the connection
  failed before it could be sent (refused, TLS, a timeout), or it was a kept-alive
  connection the replica had closed while idle (it fails within
  `_STALE_WITHIN_S` of the write). Safe to retry on another replica; a kept-alive
  connection that fails so is first retried once on a new connection to the same
  replica;
- `UpstreamConnectTimeout` (an `UpstreamUnreachable`): the connection was not
  made in time, which the caller's own deadline may have shortened;
- `UpstreamDropped` (an `UpstreamUnreachable`): the replica closed the connection,
  without a response byte, after the request was written: it may have read the
  request and worked on it (vLLM crashing mid-generation, or on this very
  request). Never sent again to the same replica; the proxy may try another one
  but counts the request as having reached a replica;
- `UpstreamTimeout`: no answer (or no next piece of the body) in time: 504, not
  retried;
- `UpstreamBroken`: a broken or unreadable response after it began: 502, though
  the proxy tries another replica for a whole answer that broke off, or a stream
  that broke before its first event (the client saw none of it), counting it as
  it counts a drop.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol, cast
from urllib.parse import urlsplit

import httptools


class UpstreamFailure(Exception):
    """A replica could not be used for this request."""

    kind = "protocol"


class UpstreamUnreachable(UpstreamFailure):
    """Nothing came back: the request may be sent to another replica."""

    kind = "connect"


class UpstreamDropped(UpstreamUnreachable):
    """The replica closed the connection without answering after the request was
    written: it may have worked on it.

    A subclass of `UpstreamUnreachable` because nothing came back, so a caller
    that tries another replica for that still does (losing no request when a
    replica dies mid-load); a caller that gives back what a request was charged
    for an unreachable replica must test for this first.
    """

    kind = "dropped"


class UpstreamConnectTimeout(UpstreamUnreachable):
    """The connection was not made in time: within the connect timeout, or
    less when the caller's time (`timeout_s`) left less.

    Told apart from a refused connection because a caller that gave the try
    less than the connect timeout may have cut it short itself: then the
    replica is not to blame."""


class UpstreamTimeout(UpstreamFailure):
    """The replica took too long."""

    kind = "timeout"


class UpstreamBroken(UpstreamFailure):
    """The response broke off or could not be read."""

    kind = "protocol"


@dataclass(frozen=True)
class UpstreamSettings:
    """Timeouts and pool size of the upstream client."""

    connect_timeout_s: float = 2.0
    read_timeout_s: float = 600.0
    """Longest wait for the status line, and then for each next piece of the
    body."""
    pool_size: int = 0
    """Idle connections kept at most, over all replicas (0: no limit; vLLM
    queues requests itself, so busy connections are never limited)."""
    keepalive_s: float = 60.0
    """An idle connection older than this is closed rather than reused."""


class Reply(Protocol):
    """A replica's response whose body has not been read yet."""

    status: int
    content_type: str
    retry_after: str | None
    """Its `Retry-After` header, as sent (a refusal's, such as a 429)."""

    async def read(self, timeout_s: float | None = None) -> bytes:
        """The whole body (then the connection goes back to the pool), within
        `timeout_s` when given."""

    def chunks(self, timeout_s: float | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives; with `timeout_s`, its pieces are due within
        that much from now until `lift` (a stream's first output may take more
        than one piece)."""

    def lift(self) -> None:
        """Lifts the bound `chunks` was given from the pieces still to come."""

    def close(self) -> None:
        """Drops the connection (a body left unread cannot be reused)."""


class Upstream(Protocol):
    """What the proxy needs from an upstream client (a fake in unit tests)."""

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float | None = None,
    ) -> Reply:
        """Sends a POST; returns once the status and headers came, within
        `timeout_s` (connecting included) when given."""


_HIGH_WATER = 256 * 1024
"""Body bytes buffered before the socket stops being read (a slow client); it is
read again once the relay has taken them."""
_STALE_WITHIN_S = 0.1
"""How soon after the write a reused connection's close, with no response byte,
still counts as the replica having closed it while idle (its FIN crossed the
request): that close comes back within a round trip plus however late the event
loop runs the callback. Neither was measured on a pod network; on this machine,
under the multi-round QA benchmark's load, the gateway's loop ran a 1 ms timer
at most 7 ms late (a scratch lag monitor, 2026-12-06), so 100 ms leaves a wide
margin. A replica that read the request and worked on it (parsed, queued,
prefilled) before it died is slower than that. A bound too low sends a stale
connection's request to another replica rather than the same one on a new
connection (a lost prefix cache; a 502 for a model with one replica); one too
high runs a request that kills its replica at once a second time there."""
_TARGETS_KEPT = 4096
"""Parsed URLs remembered (replica x path: few, and pods come and go slowly)."""

Address = tuple[str, int, bool]
"""Host, port, TLS."""


def authority(host: str, port: int) -> str:
    """`host:port`, an IPv6 address in brackets (`[fd00::1]:8000`), as URLs,
    messages and grpc-core read it: `fd00::1:8000` reads as an address without
    a port. A host in brackets already (as `urlsplit` does not leave it) stays
    as it is."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def _within(limit_s: float, deadline: float | None) -> float:
    """`limit_s`, or less when `deadline` (monotonic) comes sooner."""
    if deadline is None:
        return limit_s
    return max(0.0, min(limit_s, deadline - time.monotonic()))


@dataclass(frozen=True)
class _Target:
    """A URL split once: where to connect and what the request line names."""

    address: Address
    host: str
    path: str

    @classmethod
    def of(cls, url: str) -> _Target:
        try:
            parts = urlsplit(url)
        except ValueError as err:  # e.g. an unclosed IPv6 bracket
            raise UpstreamUnreachable(f"not a URL: {url!r} ({err})") from err
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UpstreamUnreachable(f"not an http:// or https:// URL: {url!r}")
        tls = parts.scheme == "https"
        try:
            port = parts.port or (443 if tls else 80)
        except ValueError as err:
            raise UpstreamUnreachable(f"bad port in {url!r}") from err
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        return cls((parts.hostname, port, tls), parts.netloc, path)


def request_bytes(
    method: str,
    target: _Target,
    headers: Mapping[str, str] | None,
    body: bytes | None,
) -> bytes:
    """The request as it goes on the wire.

    Raises:
        ValueError: a header holds a line break (it would smuggle in headers of
            its own) or a character HTTP cannot carry.
    """
    lines = [f"{method} {target.path} HTTP/1.1", f"host: {target.host}"]
    for name, value in (headers or {}).items():
        if "\r" in name or "\n" in name or "\r" in value or "\n" in value:
            raise ValueError(f"line break in header {name!r}")
        lines.append(f"{name}: {value}")
    if body is not None:
        lines.append(f"content-length: {len(body)}")
    head = ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")
    return head + body if body else head


class _Connection(asyncio.Protocol):
    """One connection to a replica, one response at a time (no pipelining).

    The httptools parser calls the `on_*` methods; the client waits on `headers`
    and `next_chunk`.
    """

    def __init__(self, client: UpstreamClient, address: Address) -> None:
        self._client = client
        self.address = address
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since: float | None = None
        """When it went back to the pool; None while in use."""
        self.used = 0
        """Requests sent on it so far."""
        self.reused = False
        """True when the request in progress is not its first."""
        self.sent_at: float | None = None
        """When (monotonic) the request in progress was written."""
        self._parser = httptools.HttpResponseParser(self)
        self._reset()

    def _reset(self) -> None:
        self.status = 0
        self.content_type = "application/json"
        self.retry_after: str | None = None
        self.complete = False
        self.keep_alive = False
        self.received = False
        self._headers_done = False
        self._length_known = False
        self._chunks: list[bytes] = []
        self._buffered = 0
        self._paused = False
        self._error: UpstreamFailure | None = None
        self._waiter: asyncio.Future[None] | None = None

    # -- asyncio.Protocol --------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses but behave so.
        self.transport = cast(asyncio.Transport, transport)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            # Requests are written whole; Nagle would only hold back the last bit.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        self.received = True
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._fail(UpstreamBroken("the replica switched protocols"))
        except httptools.HttpParserError as err:
            self._fail(UpstreamBroken(f"unreadable response: {err}"))

    def eof_received(self) -> bool:
        # A response with neither a length nor chunks ends with the connection
        # (HTTP/1.0 style); httptools cannot be told of the end, so it is here.
        if self._headers_done and not self._length_known and not self.complete:
            self.complete = True
            self.keep_alive = False
            self._wake()
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self.idle_since is not None:
            self._client._forget(self)
        if self.complete:
            return
        why = f": {exc}" if exc else ""
        if not self.received:
            self._fail(self._unanswered(why))
        else:
            self._fail(UpstreamBroken(f"the response broke off{why}"))

    def _unanswered(self, why: str) -> UpstreamUnreachable:
        """What a close with no response byte means (see `_STALE_WITHIN_S`)."""
        sent = self.sent_at
        if sent is None or (self.reused and time.monotonic() - sent < _STALE_WITHIN_S):
            return UpstreamUnreachable(f"the replica closed the connection{why}")
        # asyncio cannot tell whether the replica read the bytes: a new
        # connection it took, or a reused one it held on to past the bound,
        # means it was there to read them.
        return UpstreamDropped(
            f"the replica closed the connection without answering{why}"
        )

    # -- httptools callbacks -----------------------------------------------------

    def on_header(self, name: bytes, value: bytes) -> None:
        name = name.lower()
        if name == b"content-type":
            self.content_type = value.decode("latin-1")
        elif name == b"retry-after":
            self.retry_after = value.decode("latin-1")
        elif name in (b"content-length", b"transfer-encoding"):
            self._length_known = True

    def on_headers_complete(self) -> None:
        self.status = self._parser.get_status_code()
        self._headers_done = True
        self._wake()

    def on_body(self, body: bytes) -> None:
        if not body:
            return
        self._chunks.append(body)
        self._buffered += len(body)
        if self._buffered > _HIGH_WATER and not self._paused and self.transport:
            self._paused = True
            self.transport.pause_reading()
        self._wake()

    def on_message_complete(self) -> None:
        self.complete = True
        self.keep_alive = self._parser.should_keep_alive()
        self._wake()

    # -- for the client ----------------------------------------------------------

    def send(self, data: bytes) -> None:
        """Starts a request on this connection."""
        if self._paused and self.transport is not None:
            # The last body was left in the buffer, whole but unread.
            self.transport.resume_reading()
        self._reset()
        self.idle_since = None
        self.reused = self.used > 0
        self.used += 1
        self.sent_at = time.monotonic()
        assert self.transport is not None
        self.transport.write(data)

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()

    def _fail(self, error: UpstreamFailure) -> None:
        if self._error is None:
            self._error = error
        self.close()
        self._wake()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def _wait(self, limit_s: float, deadline: float | None) -> None:
        """Waits for the parser's next news, `limit_s` at most, or until
        `deadline` (monotonic) when that comes sooner."""
        timeout_s = _within(limit_s, deadline)
        self._waiter = asyncio.get_running_loop().create_future()
        try:
            async with asyncio.timeout(timeout_s):
                await self._waiter
        except TimeoutError:
            self.close()
            raise UpstreamTimeout(self._timed_out(limit_s, timeout_s)) from None
        except BaseException:
            # Cancelled mid-response: the rest of it could not be told apart
            # from the next response on this connection.
            self.close()
            raise
        finally:
            self._waiter = None

    def _timed_out(self, limit_s: float, timeout_s: float) -> str:
        """What a wait of `timeout_s` that ended with no answer means, `limit_s`
        being the most it could have been (less: a bound on the whole request
        or body cut it short: the request's deadline, or the time a read was
        given)."""
        where = authority(*self.address[:2])
        if timeout_s >= limit_s:
            return f"no answer from {where} in {timeout_s:.3g} s"
        # "in 0 s" read as a replica that failed at once, where the request
        # had used up its time before this wait began (earlier tries, or the
        # wait for the headers, took it).
        if timeout_s <= 0:
            return f"no answer from {where}: no time was left to wait"
        return f"no answer from {where} in the {timeout_s:.3g} s left to wait"

    async def headers(self, limit_s: float, deadline: float | None) -> None:
        """Waits for the status line and the headers, `limit_s` at most, or
        until `deadline` (monotonic) when that comes sooner."""
        while not self._headers_done:
            if self._error is not None:
                raise self._error
            await self._wait(limit_s, deadline)

    async def next_chunk(self, limit_s: float, deadline: float | None) -> bytes | None:
        """All of the body received so far and not yet taken, or None at its end;
        waits `limit_s` at most, or until `deadline` (monotonic) when sooner."""
        while True:
            if self._chunks:
                # One piece for everything that is here: httptools hands over each
                # HTTP chunk (one SSE event from vLLM) on its own, and relaying
                # them one by one costs a client write and a pass of the relay
                # each, even when a single read brought many.
                chunk = b"".join(self._chunks)  # a lone piece is not copied
                self._chunks.clear()
                self._buffered = 0
                if self._paused and self.transport:
                    self._paused = False
                    self.transport.resume_reading()
                return chunk
            if self.complete:
                return None
            if self._error is not None:
                raise self._error
            await self._wait(limit_s, deadline)


class UpstreamResponse:
    """A replica's response whose body has not been read yet (a `Reply`)."""

    def __init__(
        self, client: UpstreamClient, conn: _Connection, deadline: float | None
    ) -> None:
        self._client = client
        self._conn: _Connection | None = conn
        self._deadline = deadline
        self._until = deadline
        """When (monotonic) the next pieces are due: `deadline`, or sooner while
        a bound given to `read` or `chunks` holds."""
        self.status = conn.status
        self.content_type = conn.content_type
        self.retry_after = conn.retry_after

    async def read(self, timeout_s: float | None = None) -> bytes:
        """The whole body; the connection then goes back to the pool.

        Args:
            timeout_s: the most the whole body may take from now (each piece
                still waits the read timeout at most).

        Raises:
            UpstreamTimeout, UpstreamBroken: as the module says.
        """
        self._bound(timeout_s)
        return b"".join([chunk async for chunk in self._pieces()])

    def chunks(self, timeout_s: float | None = None) -> AsyncIterator[bytes]:
        """The body as it arrives: each piece is what came since the last one.

        Args:
            timeout_s: the most the pieces may take from now, until `lift`: a
                stream's wait for its first output, which may span pieces,
                bounded by the read each piece waits on anyway rather than by
                a timer of its own for each stream (each piece still waits the
                read timeout at most).

        Raises:
            UpstreamTimeout, UpstreamBroken: as the module says.
        """
        self._bound(timeout_s)
        return self._pieces()

    def lift(self) -> None:
        """Lifts the bound given to `chunks`: the pieces still to come may take
        as long as the response allows (a stream, as long as it has something
        to say, each piece within the read timeout)."""
        self._until = self._deadline

    def _bound(self, timeout_s: float | None) -> None:
        """Bounds the pieces still to come by `timeout_s` from now, when given."""
        if timeout_s is not None:
            mine = time.monotonic() + timeout_s
            deadline = self._deadline
            self._until = mine if deadline is None else min(deadline, mine)

    async def _pieces(self) -> AsyncIterator[bytes]:
        conn = self._conn
        if conn is None:
            return
        read_timeout_s = self._client.settings.read_timeout_s
        try:
            # `_until` is read for each piece: `lift` may move it meanwhile.
            while (
                chunk := await conn.next_chunk(read_timeout_s, self._until)
            ) is not None:
                yield chunk
        finally:
            self.close()

    def close(self) -> None:
        """Gives the connection back if the body was read whole, else drops it (a
        body left unread cannot be told apart from the next response)."""
        conn, self._conn = self._conn, None
        if conn is None:
            return
        if conn.complete and conn.keep_alive and not conn.closed:
            self._client._release(conn)
        else:
            conn.close()


class UpstreamClient:
    """Sends requests to replicas over kept-alive connections.

    Args:
        settings: timeouts and the idle pool's size.
        tls: for https:// replicas; the system's trusted CAs when None.
    """

    def __init__(
        self, settings: UpstreamSettings, tls: ssl.SSLContext | None = None
    ) -> None:
        self.settings = settings
        self._tls = tls
        self._idle: dict[Address, list[_Connection]] = {}
        self._idle_count = 0
        self._targets: dict[str, _Target] = {}

    async def start(self) -> None:
        """Nothing to open: connections are made on first use."""

    async def close(self) -> None:
        """Closes every idle connection."""
        idle = [conn for conns in self._idle.values() for conn in conns]
        self._idle.clear()
        self._idle_count = 0
        for conn in idle:
            conn.idle_since = None
            conn.close()

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Sends a POST and returns once the response's status and headers came.

        Args:
            timeout_s: the most connecting and the wait for the status and
                headers may take (what is left of a request's time over all
                its tries); the body is not bounded by it, as a stream may run
                for as long as it has something to say (`read` takes a bound
                of its own).

        Raises:
            UpstreamUnreachable, UpstreamDropped, UpstreamTimeout, UpstreamBroken:
                see the module.
        """
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return await self._exchange("POST", url, body, headers, deadline, None)

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Any request (`GET /metrics` for the scraper, with `timeout_s` bounding
        the whole of it, body included)."""
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        return await self._exchange(method, url, body, headers, deadline, deadline)

    async def _exchange(
        self,
        method: str,
        url: str,
        body: bytes | None,
        headers: Mapping[str, str] | None,
        deadline: float | None,
        body_deadline: float | None,
    ) -> UpstreamResponse:
        """Sends a request, with the status and headers due by `deadline` and
        the body by `body_deadline` (monotonic; None: no bound but the read
        timeout)."""
        target = self._target(url)
        data = request_bytes(method, target, headers, body)
        conn = await self._connection(target.address, deadline, reuse=True)
        reused = conn.used > 0
        try:
            await self._start(conn, data, deadline)
        except UpstreamDropped:
            raise  # the replica may be working on it: never twice on one replica
        except UpstreamUnreachable:
            if not reused:
                raise
            # A kept-alive connection the replica had closed: one new one.
            conn = await self._connection(target.address, deadline, reuse=False)
            await self._start(conn, data, deadline)
        return UpstreamResponse(self, conn, body_deadline)

    async def _start(
        self, conn: _Connection, data: bytes, deadline: float | None
    ) -> None:
        if conn.closed:  # closed by the replica while it waited in the pool
            raise UpstreamUnreachable("the replica closed the connection")
        conn.send(data)
        await conn.headers(self.settings.read_timeout_s, deadline)

    def _target(self, url: str) -> _Target:
        target = self._targets.get(url)
        if target is None:
            if len(self._targets) >= _TARGETS_KEPT:
                self._targets.clear()
            target = self._targets[url] = _Target.of(url)
        return target

    async def _connection(
        self, address: Address, deadline: float | None, *, reuse: bool
    ) -> _Connection:
        """An idle connection to `address`, or a new one."""
        now = time.monotonic()
        idle = self._idle.get(address) if reuse else None
        while idle:
            conn = idle.pop()
            self._idle_count -= 1
            since = conn.idle_since
            conn.idle_since = None
            fresh = since is not None and now - since < self.settings.keepalive_s
            if fresh and not conn.closed:
                return conn
            conn.close()
        host, port, tls = address
        timeout = _within(self.settings.connect_timeout_s, deadline)
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(timeout):
                _, protocol = await loop.create_connection(
                    lambda: _Connection(self, address),
                    host,
                    port,
                    ssl=self._tls_context() if tls else None,
                )
        except TimeoutError:
            raise UpstreamConnectTimeout(
                f"connect timeout to {authority(host, port)}"
            ) from None
        except (OSError, ssl.SSLError) as err:
            raise UpstreamUnreachable(
                f"cannot connect to {authority(host, port)}: {err}"
            ) from err
        return protocol

    def _tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            self._tls = ssl.create_default_context()
        return self._tls

    def _release(self, conn: _Connection) -> None:
        """Back to the pool after a whole response."""
        limit = self.settings.pool_size
        if limit and self._idle_count >= limit:
            conn.close()
            return
        conn.idle_since = time.monotonic()
        self._idle.setdefault(conn.address, []).append(conn)
        self._idle_count += 1

    def _forget(self, conn: _Connection) -> None:
        """An idle connection closed by its replica leaves the pool."""
        conns = self._idle.get(conn.address)
        if conns and conn in conns:
            conns.remove(conn)
            self._idle_count -= 1
            if not conns:
                del self._idle[conn.address]
        conn.idle_since = None
