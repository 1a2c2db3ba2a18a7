"""The upstream client: one pooled aiohttp session for every replica.

Created once at start-up (connections are kept alive and reused); a request costs
one pooled connection and no set-up. Failures are sorted into three kinds that the
proxy treats differently:

- `UpstreamUnreachable`: the connection failed or was dropped before any response
  byte (refused, reset, closed keep-alive): safe to retry on another replica;
- `UpstreamTimeout`: no answer (or no next chunk) in time: 504, not retried;
- `UpstreamBroken`: a broken response after it began: 502.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from typing import Protocol

import aiohttp


class UpstreamFailure(Exception):
    """A replica could not be used for this request."""

    kind = "protocol"


class UpstreamUnreachable(UpstreamFailure):
    """Nothing came back: the request may be sent to another replica."""

    kind = "connect"


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
    pool_size: int = 0
    """Connections kept at most (0: no limit; vLLM queues requests itself)."""


class Reply(Protocol):
    """A replica's response whose body has not been read yet."""

    status: int
    content_type: str

    async def read(self) -> bytes:
        """The whole body (then the connection goes back to the pool)."""

    def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives."""

    def close(self) -> None:
        """Drops the connection (a body left unread cannot be reused)."""


class Upstream(Protocol):
    """What the proxy needs from an upstream client (a fake in unit tests)."""

    async def post(self, url: str, body: bytes, headers: Mapping[str, str]) -> Reply:
        """Sends a POST; returns once the status and headers came."""


class UpstreamResponse:
    """A Reply from aiohttp."""

    def __init__(self, response: aiohttp.ClientResponse) -> None:
        self._response = response
        self.status = response.status
        self.content_type = response.headers.get("content-type", "application/json")

    async def read(self) -> bytes:
        """The whole body.

        Raises:
            UpstreamUnreachable: the connection dropped before the body came.
            UpstreamTimeout, UpstreamBroken: as the module says.
        """
        try:
            return await self._response.read()
        except BaseException as err:
            raise _classify(err, started=False) from err
        finally:
            self._response.release()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, in the pieces the network delivers."""
        try:
            async for chunk in self._response.content.iter_any():
                yield chunk
        except BaseException as err:
            raise _classify(err, started=True) from err
        finally:
            self._response.release()

    def close(self) -> None:
        """Drops the connection (a body left unread cannot be reused)."""
        self._response.close()


class UpstreamClient:
    """Sends requests to replicas over one shared connection pool."""

    def __init__(self, settings: UpstreamSettings) -> None:
        self._settings = settings
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Opens the pool (inside the running event loop)."""
        s = self._settings
        connector = aiohttp.TCPConnector(
            limit=s.pool_size, limit_per_host=0, ttl_dns_cache=60, keepalive_timeout=60
        )
        timeout = aiohttp.ClientTimeout(
            total=None, sock_connect=s.connect_timeout_s, sock_read=s.read_timeout_s
        )
        self._session = aiohttp.ClientSession(
            connector=connector,
            timeout=timeout,
            auto_decompress=False,
            # Uncompressed: bytes are relayed as they come, never re-encoded.
            skip_auto_headers=("User-Agent", "Accept-Encoding"),
        )

    async def close(self) -> None:
        """Closes every pooled connection."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str]
    ) -> UpstreamResponse:
        """Sends a POST and returns once the response's status and headers came.

        Raises:
            UpstreamUnreachable, UpstreamTimeout, UpstreamBroken: see the module.
        """
        return await self.request("POST", url, body, headers)

    async def request(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        headers: Mapping[str, str] | None = None,
        timeout_s: float | None = None,
    ) -> UpstreamResponse:
        """Any request (`GET /metrics` for the scraper, with its own timeout)."""
        if self._session is None:
            raise RuntimeError("UpstreamClient.start() was not called")
        try:
            if timeout_s is None:  # the session's timeouts (None would disable them)
                response = await self._session.request(
                    method, url, data=body, headers=headers
                )
            else:
                response = await self._session.request(
                    method,
                    url,
                    data=body,
                    headers=headers,
                    timeout=aiohttp.ClientTimeout(total=timeout_s),
                )
        except BaseException as err:
            raise _classify(err, started=False) from err
        return UpstreamResponse(response)


def _classify(err: BaseException, *, started: bool) -> BaseException:
    """The UpstreamFailure for an aiohttp error; anything else unchanged."""
    if isinstance(err, aiohttp.ConnectionTimeoutError):
        return UpstreamUnreachable(f"connect timeout: {err}")
    if isinstance(err, asyncio.TimeoutError | aiohttp.ServerTimeoutError):
        return UpstreamTimeout(f"timeout: {err}")
    if not started and isinstance(
        err, aiohttp.ClientConnectionError | aiohttp.ClientPayloadError
    ):
        # Nothing has reached the client yet: another replica may answer.
        return UpstreamUnreachable(f"{type(err).__name__}: {err}")
    if isinstance(err, aiohttp.ClientError):
        return UpstreamBroken(f"{type(err).__name__}: {err}")
    return err
