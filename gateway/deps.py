"""What the app is built from, and the FastAPI dependencies that hand it out.

The dependencies are `async def` although they never wait: FastAPI runs plain
`def` dependencies in a thread pool, which costs more than the whole request path.
The forwarding endpoints, the hot path, call the plain functions directly: FastAPI's
dependency resolution alone took a third of the gateway's time per request.

`Deps` is made once by the entry point (`wiring.build_deps`) or by a test, then
passed to `create_app`; nothing is global.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Annotated

from fastapi import Depends, Request
from starlette.types import Receive

from citadel.gateway.errors import BodyTooLarge
from citadel.gateway.metrics import GatewayMetrics
from citadel.gateway.services.auth import Authenticator, Principal
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.proxy import ProxyService
from citadel.gateway.sources.base import Source

REQUEST_ID = "x-request-id"
_REQUEST_ID_OK = re.compile(r"^[A-Za-z0-9._:/+=-]{1,128}$")


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


def deps_of(request: Request) -> Deps:
    """The app's Deps."""
    deps: Deps = request.app.state.deps
    return deps


def take_request_id(request: Request) -> str:
    """The caller's `x-request-id` when it is sane, else a new one; kept on the
    request so error responses carry it too."""
    given = request.headers.get(REQUEST_ID)
    rid = given if given and _REQUEST_ID_OK.match(given) else uuid.uuid4().hex
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


async def disconnected(receive: Receive) -> None:
    """Returns once the client has disconnected. For a request whose body was
    read whole: the next message is then the disconnect (uvicorn also sends one
    once the response is complete)."""
    while (await receive())["type"] != "http.disconnect":
        pass
