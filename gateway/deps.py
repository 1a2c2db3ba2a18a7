"""What the app is built from, and the FastAPI dependencies that hand it out.

The dependencies are `async def` although they never wait: FastAPI runs plain
`def` dependencies in a thread pool, which costs more than the whole request path.
The forwarding endpoints, the hot path, call the plain functions directly: FastAPI's
dependency resolution alone took a third of the gateway's time per request.

`Deps` is made once by the entry point (`wiring.build_deps`) or by a test, then
passed to `create_app`; nothing is global.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated, Any

from fastapi import Depends, Request
from starlette.types import Receive

from citadel.gateway.errors import BodyTooLarge
from citadel.gateway.metrics import GatewayMetrics
from citadel.gateway.services.auth import Authenticator, Principal
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.proxy import ProxyService
from citadel.gateway.services.requests import request_id as sane_request_id
from citadel.gateway.services.sockets import SocketCounts
from citadel.gateway.sources.base import Source

REQUEST_ID = "x-request-id"


@dataclass
class Deps:
    """The gateway's parts.

    Attributes:
        catalog: models and replicas.
        authenticator: keys to principals.
        proxy: the request path.
        metrics: the instruments and their registry.
        sources: background tasks run while the app runs (discovery, key
            watches, the metrics scraper).
        startup: awaited before the sources start (open connection pools).
        shutdown: awaited after the sources stop (close them).
        session_header: the header used by `session-affinity`.
        max_body_bytes: larger request bodies get 413.
        clock: monotonic seconds (the clock replica ejections are timed by).
        load_max_age_s: how old a replica's vLLM load report may be and still
            count (`scraper.report_max_age_s`); /admin/replicas marks older
            ones stale.
        sockets: the GraphQL WebSockets each key holds open, and the cap on
            them (none unless given).
    """

    catalog: Catalog
    authenticator: Authenticator
    proxy: ProxyService
    metrics: GatewayMetrics
    sources: list[Source] = field(default_factory=list)
    startup: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    shutdown: list[Callable[[], Awaitable[None]]] = field(default_factory=list)
    session_header: str = "x-session-id"
    max_body_bytes: int = 8 * 1024 * 1024
    clock: Callable[[], float] = time.monotonic
    load_max_age_s: float = math.inf
    sockets: SocketCounts = field(default_factory=SocketCounts)


def deps_of(request: Request) -> Deps:
    """The app's Deps."""
    deps: Deps = request.app.state.deps
    return deps


def take_request_id(request: Request) -> str:
    """The caller's `x-request-id` when it is sane, else a new one; kept on the
    request so error responses carry it too."""
    given = request.headers.get(REQUEST_ID)
    rid = sane_request_id(given)
    request.state.request_id = rid
    return rid


def caller(request: Request, deps: Deps) -> Principal:
    """The caller, from the `Authorization` header."""
    return deps.authenticator.authenticate(request.headers.get("authorization"))


async def get_deps(request: Request) -> Deps:
    return deps_of(request)


async def request_id(request: Request) -> str:
    return take_request_id(request)


async def principal(
    request: Request, deps: Annotated[Deps, Depends(get_deps)]
) -> Principal:
    return caller(request, deps)


DepsDep = Annotated[Deps, Depends(get_deps)]
RequestIdDep = Annotated[str, Depends(request_id)]
PrincipalDep = Annotated[Principal, Depends(principal)]


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refused with 413 as soon as it passes `limit` bytes."""
    length = request.headers.get("content-length", "")
    if length.isdigit() and int(length) > limit:
        raise BodyTooLarge(f"The request body is over the limit of {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise BodyTooLarge(f"The request body is over the limit of {limit} bytes.")
        chunks.append(chunk)
    return b"".join(chunks)


WATCH_AFTER_S = 0.05
"""How long a request runs before the gateway watches for its client leaving.

Watching takes a task per request. Against the instant simulator at concurrency
64, a watch from the first moment cost 9% of the json requests per second and 6%
of the streamed (three 4 s runs each, side by side with the code before it).
Answers that come within this time need no watch; a model's answers take longer.
"""


class ClientWatch:
    """Cancels `task` when the client disconnects, from `WATCH_AFTER_S` on, until
    stopped.

    The body was read whole, so the next message is the disconnect (uvicorn also
    sends one once the response is complete: stop the watch before that).
    Stopping is synchronous, so no cancel can come after it: the watcher runs
    only while `task` waits. One case stays unseen: a client that pipelined a
    second request on the connection and left; uvicorn marks only that queued
    request as disconnected.
    """

    def __init__(self, receive: Receive, task: asyncio.Task[Any]) -> None:
        self.gone = False
        self.started = False
        """True once the response has begun."""
        self._receive = receive
        self._task = task
        self._watcher: asyncio.Task[None] | None = None
        self._timer = asyncio.get_running_loop().call_later(WATCH_AFTER_S, self._begin)

    def _begin(self) -> None:
        self._watcher = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        while (await self._receive())["type"] != "http.disconnect":
            pass
        self.gone = True
        self._task.cancel()

    def stop(self) -> None:
        """Stops watching."""
        self._timer.cancel()
        if self._watcher is not None:
            self._watcher.cancel()
