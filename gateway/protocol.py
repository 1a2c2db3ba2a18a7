"""The HTTP/1.1 protocol the gateway serves with: uvicorn's httptools protocol, with
a bound on each request's head (its request line and header fields).

httptools bounds neither (uvicorn's `h11_max_incomplete_event_size` applies to h11
only), and builds a header value by concatenating each read onto what it has,
which costs the square of its size: one 64 MB header, from a client without a key,
held the event loop for seconds and grew the process by about 250 MB. Past the
bound a request is answered 431 and its connection closed, before the app sees it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from citadel.gateway.errors import HeadersTooLarge

log = logging.getLogger(__name__)

# What each parsed header field adds to its name and value: ": " and CRLF.
_FIELD_OVERHEAD = 4

LOG_EVERY_S = 10.0
"""The shortest time between two log lines about refused heads."""


class RefusedHeads:
    """Counts each request head refused, and logs them at most once per
    `log_every_s`: the first at once, then the next one after that time, with
    how many were refused since the line before.

    A line per refusal made a flood of oversized heads (one per connection,
    some 800 a second) a flood of log lines too. The counter still counts each.

    Args:
        count: called once for each head refused (the metric).
        log_every_s: the shortest time between two log lines.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        count: Callable[[], None],
        log_every_s: float = LOG_EVERY_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._count = count
        self._every = log_every_s
        self._clock = clock
        self._logged_at: float | None = None
        self._unlogged = 0

    def refused(self, client: tuple[str, int] | None, max_head_bytes: int) -> None:
        """Counts one head refused; logs it, with those not logged before it,
        unless a line went out less than `log_every_s` ago.

        Args:
            client: the address of the client refused (never its headers).
            max_head_bytes: the bound it passed.
        """
        self._count()
        self._unlogged += 1
        now = self._clock()
        if self._logged_at is not None and now - self._logged_at < self._every:
            return
        log.warning(
            "request headers too large: answered 431, connection closed",
            extra={
                "client": client,
                "max_head_bytes": max_head_bytes,
                # This one and those refused since the last line.
                "refused": self._unlogged,
            },
        )
        self._logged_at = now
        self._unlogged = 0


class HeadBoundedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, refusing a request head over `_max_head` bytes.

    A head that ends is measured as parsed: its request target, and each header
    field's name and value with 4 bytes for `: ` and the line end. A head that
    does not end is measured by the reads that fell wholly inside it (the read
    that began it may hold the end of the request before): refused once they
    pass the bound, so httptools never holds more than the bound and two reads.

    uvicorn builds one per connection with its own arguments only, so the bound
    comes with the class: serve the subclass `head_bounded` makes.
    """

    _max_head: ClassVar[int]
    """The largest head served."""
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
            self._refuse()

    def on_message_begin(self) -> None:
        """A request's first byte: its head begins."""
        super().on_message_begin()
        self._in_head = True
        self._began = True
        self._read_bytes = 0

    def on_headers_complete(self) -> None:
        """The head's end: the request goes to the app unless it is too large
        (then `data_received` answers once httptools has parsed the read)."""
        self._in_head = False
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

    def _refuse(self) -> None:
        error = HeadersTooLarge(
            f"The request line and headers are over {self._max_head} bytes."
        )
        # Once per connection, as it closes; never the headers themselves.
        self._refused.refused(self.client, self._max_head)
        body = error.to_json()
        head = [b"HTTP/1.1 431 Request Header Fields Too Large\r\n"]
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
    max_head_bytes: int, refused: RefusedHeads
) -> type[HeadBoundedProtocol]:
    """The protocol class to give `uvicorn.Config(http=...)`.

    Args:
        max_head_bytes: the largest request head served.
        refused: told of each head refused (one for every connection).
    """

    class Protocol(HeadBoundedProtocol):
        _max_head = max_head_bytes
        _refused = refused

    return Protocol
