"""The HTTP/1.1 protocol the gateway serves with: uvicorn's httptools protocol, with
a bound on each request's head (its request line and header fields).

httptools bounds neither (uvicorn's `h11_max_incomplete_event_size` applies to h11
only), and builds a header value by concatenating each read onto what it has,
which costs the square of its size: one 64 MB header, from a client without a key,
held the event loop for seconds and grew the process by about 250 MB. Past the
bound a request is answered 431 and its connection closed, before the app sees it.

Nor does uvicorn bound the time a head takes (its keep-alive timeout covers only
a connection idle between requests): a client could send its headers a byte at a
time for ever (Slowloris), each such connection a socket held. A head that is not
complete within the timeout of its first byte is answered 408 and its
connection closed.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import time
from collections import Counter
from collections.abc import Callable
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from citadel.gateway.errors import GatewayError, HeadersTimeout, HeadersTooLarge

log = logging.getLogger(__name__)

# What each parsed header field adds to its name and value: ": " and CRLF.
_FIELD_OVERHEAD = 4

LOG_EVERY_S = 10.0
"""The shortest time between two log lines about refused heads."""


class HeadRefusal(enum.StrEnum):
    """Why a request head was refused."""

    TOO_LARGE = "too_large"
    """Over the bound on its size: 431."""
    TIMED_OUT = "timed_out"
    """Not complete within the time from its first byte: 408."""


def _log_line(reason: HeadRefusal) -> tuple[str, str]:
    """The log message for a refusal, and the name of the field that says the
    bound it passed."""
    if reason is HeadRefusal.TOO_LARGE:
        return (
            "request headers too large: answered 431, connection closed",
            "max_head_bytes",
        )
    return (
        "request headers too slow: answered 408, connection closed",
        "head_timeout_s",
    )


class RefusedHeads:
    """Counts each request head refused, and logs them at most once per
    `log_every_s` for each reason: the first at once, then the next one after
    that time, with how many were refused for that reason since the line before.

    A line per refusal made a flood of oversized heads (one per connection,
    some 800 a second) a flood of log lines too. The counter still counts each.
    Each reason has its own period, so that a flood of one does not hide the
    first of the other.

    Args:
        count: called once for each head refused, with why (the metrics).
        log_every_s: the shortest time between two log lines of one reason.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        count: Callable[[HeadRefusal], None],
        log_every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count = count
        self._every = log_every_s
        self._clock = clock
        self._logged_at: dict[HeadRefusal, float] = {}
        self._unlogged: Counter[HeadRefusal] = Counter()

    def refused(
        self, reason: HeadRefusal, client: tuple[str, int] | None, bound: float
    ) -> None:
        """Counts one head refused; logs it, with those not logged before it,
        unless a line for the same reason went out less than `log_every_s` ago.

        Args:
            reason: why it was refused.
            client: the address of the client refused (never its headers).
            bound: the bound it passed: bytes (too large) or seconds (timed
                out).
        """
        self._count(reason)
        self._unlogged[reason] += 1
        now = self._clock()
        logged_at = self._logged_at.get(reason)
        if logged_at is not None and now - logged_at < self._every:
            return
        message, bound_field = _log_line(reason)
        log.warning(
            message,
            extra={
                "client": client,
                "reason": reason.value,
                bound_field: bound,
                # This one and those refused for the reason since its last line.
                "refused": self._unlogged[reason],
            },
        )
        self._logged_at[reason] = now
        self._unlogged[reason] = 0


class HeadBoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head over `_max_head`
    bytes, or not complete within `_head_timeout` seconds of its first byte.

    A head that ends is measured as parsed: its request target, and each header
    field's name and value with 4 bytes for `: ` and the line end. A head that
    does not end is measured by the reads that fell wholly inside it (the read
    that began it may hold the end of the request before): refused once they
    pass the bound, so httptools never holds more than the bound and two reads.

    The time is kept by one timer of the event loop per connection (no task),
    armed as a head begins and cancelled as it ends or the connection closes. It
    is armed as the connection opens too: a connection that sends no byte
    holds a socket as a slow head does; it is closed without an answer (there
    is no request to answer), and neither counted nor logged.

    uvicorn builds one per connection with its own arguments only, so the bounds
    come with the class: serve the subclass `head_bounded` makes.
    """

    _max_head: ClassVar[int]
    """The largest head served."""
    _head_timeout: ClassVar[float]
    """The longest time a head may take from its first byte, in seconds."""
    _refused: ClassVar[RefusedHeads]
    """Told of each head refused, to count and log it (shared by every
    connection)."""
    # The state of the connection: these defaults until it sets its own, as
    # there is no __init__ (its arguments are uvicorn's to change).
    # Between a request's first byte and the end of its headers.
    _in_head = False
    # Whether the read being parsed began a request.
    _began = False
    _read_bytes = 0
    _too_large = False
    # Fires `_head_timed_out` unless the head ends first.
    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        """A connection opens: its first request's time begins."""
        super().connection_made(transport)
        self._time_head()

    def connection_lost(self, exc: Exception | None) -> None:
        """The connection closed: nothing left to time."""
        self._stop_timing_head()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        """Parses a read, then refuses the request if its head is too large."""
        self._began = False
        super().data_received(data)
        if self.transport.is_closing():  # uvicorn refused it (400), or us before
            return
        if not self._too_large and self._in_head and not self._began:
            self._read_bytes += len(data)
            self._too_large = self._read_bytes > self._max_head
        if self._too_large:
            self._refuse_too_large()

    def on_message_begin(self) -> None:
        """A request's first byte: its head begins, and its time."""
        super().on_message_begin()
        self._in_head = True
        self._began = True
        self._read_bytes = 0
        self._time_head()

    def on_headers_complete(self) -> None:
        """The head's end: the request goes to the app unless it is too large
        (then `data_received` answers once httptools has parsed the read)."""
        self._in_head = False
        # Before a WebSocket upgrade too: the timer is the protocol's, and
        # uvicorn hands the socket to another one that never cancels it.
        self._stop_timing_head()
        fields = self.headers  # as uvicorn's on_url and on_header kept them
        size = len(self.url) + _FIELD_OVERHEAD * len(fields)
        size += sum(len(name) + len(value) for name, value in fields)
        if size > self._max_head:
            self._too_large = True
            return
        super().on_headers_complete()

    def on_body(self, body: bytes) -> None:
        """Body of a request; none of a refused one (it has no app to read it)."""
        if not self._too_large:
            super().on_body(body)

    def on_message_complete(self) -> None:
        """The request's end; nothing to tell for a refused one."""
        if not self._too_large:
            super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        """A WebSocket opens, unless its head was too large."""
        if not self._too_large:
            super().handle_websocket_upgrade()

    def _time_head(self) -> None:
        self._stop_timing_head()
        self._head_timer = self.loop.call_later(
            self._head_timeout, self._head_timed_out
        )

    def _stop_timing_head(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.transport.is_closing():
            return
        if not self._in_head:  # no byte since the connection opened
            self.transport.close()
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # A head pipelined behind a request still being answered: a 408
            # now would go out before or inside that answer, and uvicorn may
            # have stopped reading meanwhile (its flow control), leaving the
            # rest of the head unread. Its time starts again.
            self._time_head()
            return
        error = HeadersTimeout(
            "The request line and headers did not all come within "
            f"{self._head_timeout:g} s of their first byte."
        )
        self._refused.refused(HeadRefusal.TIMED_OUT, self.client, self._head_timeout)
        self._answer(b"HTTP/1.1 408 Request Timeout\r\n", error)

    def _refuse_too_large(self) -> None:
        error = HeadersTooLarge(
            f"The request line and headers are over {self._max_head} bytes."
        )
        # Once per connection, as it closes; never the headers themselves.
        self._refused.refused(HeadRefusal.TOO_LARGE, self.client, self._max_head)
        self._answer(b"HTTP/1.1 431 Request Header Fields Too Large\r\n", error)

    def _answer(self, status_line: bytes, error: GatewayError) -> None:
        """Answers the request with `error` and closes the connection."""
        body = error.to_json()
        head = [status_line]
        # uvicorn's headers for every response: `server`, `date`.
        defaults = self.server_state.default_headers
        head += [name + b": " + value + b"\r\n" for name, value in defaults]
        head += [
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
        ]
        self.transport.write(b"".join(head) + body)
        self.transport.close()


def head_bounded(
    max_head_bytes: int, refused: RefusedHeads, *, head_timeout_s: float
) -> type[HeadBoundedProtocol]:
    """The protocol class to give `uvicorn.Config(http=...)`.

    Args:
        max_head_bytes: the largest request head served.
        refused: told of each head refused (one for every connection).
        head_timeout_s: the longest time a request head may take from its first
            byte.
    """

    class Protocol(HeadBoundedProtocol):
        _max_head = max_head_bytes
        _head_timeout = head_timeout_s
        _refused = refused

    return Protocol
