"""The proxy's answers as parsed JSON, for the front doors that are not OpenAI's
REST API (gRPC, GraphQL).

They go through `ProxyService.handle` like REST, so keys, limits, routing,
metrics and errors are the same; only the bytes are turned into objects here. A
replica's own refusal (a 4xx, which REST relays with its status) becomes the
gateway error for its status (`refusal`: a 404 `ModelNotFound`, a 429
`RateLimited` with the replica's `Retry-After`, any other an `InvalidRequest`)
carrying the replica's message (for a body that is not OpenAI's error, the one
at its top, else a short excerpt of its text: `refusal_body`), so every door
reports it through the one error hierarchy, and it is counted with the
replica's status as on REST. Replicas' 429s and 503s the proxy answers itself
once none is left to try (it raises the error).

An answer the door cannot use (not JSON, or not what its message holds) is told
to the proxy before the request is counted, so it is counted as the error the
door's client gets (502 `backend_error`), not as the replica's 200.
"""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import orjson

from citadel.gateway.errors import (
    BackendError,
    GatewayError,
    InvalidRequest,
    refusal,
    refusal_body,
)
from citadel.gateway.routes import ModelRoute
from citadel.gateway.services.auth import Principal
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.proxy import (
    FALLBACK_HEADER,
    SPLIT_HEADER,
    ProxyService,
)
from citadel.gateway.services.requests import ApiCall, Door, dumps_request
from citadel.gateway.services.sse import EVENT_END, error_of
from citadel.gateway.services.streams import Closing

DONE = b"[DONE]"
_LIMIT_PREFIX = "x-ratelimit-"
_PASSED = (FALLBACK_HEADER, SPLIT_HEADER)


@dataclass
class Answer:
    """A whole answer (`body`) or a stream of chunks (`chunks`), with the
    headers REST would send (request id, `x-ratelimit-*`, `x-citadel-fallback`,
    `x-citadel-split`)."""

    headers: dict[str, str]
    body: dict[str, Any] = field(default_factory=dict)
    chunks: Closing[dict[str, Any]] | None = None
    """A stream's objects; close it when done (read or not: it holds a replica)."""
    unusable: Callable[[GatewayError], None] = field(default=lambda error: None)
    """For a stream: call it, before closing `chunks`, with the error that a
    chunk the door cannot use ends the call with; the request is counted as
    that error."""


def passed_on(headers: Mapping[str, str]) -> dict[str, str]:
    """What of an answer's REST headers a door without them passes on (gRPC's
    trailers, GraphQL's HTTP response): the `x-ratelimit-*` values and, from
    a fallback, `x-citadel-fallback` with its name, from a split's target,
    `x-citadel-split` with its."""
    return {
        k: v for k, v in headers.items() if k.startswith("x-ratelimit-") or k in _PASSED
    }


async def ask(
    proxy: ProxyService,
    call: ApiCall,
    principal: Principal,
    body: dict[str, Any],
    request_id: str,
    door: Door,
    session: str | None = None,
    fit: Callable[[dict[str, Any]], object] | None = None,
    priority: Sequence[str] = (),
) -> Answer:
    """Runs one request through the proxy.

    Args:
        priority: every value of the priority header as the door got it
            (`ProxyService.handle`).
        fit: the door's reading of a whole answer (a JSON object), run before
            the request is counted; the `GatewayError` it raises for an answer
            that does not fit the door's message is what the request is counted
            as (None: any object will do). A stream's chunks are the door's to
            read: it tells `Answer.unusable` of one that does not fit.

    Raises:
        GatewayError: as for REST, `InvalidRequest` for a body that cannot
            be written as JSON, and when the replica refused the request itself
            the error for its status (`refusal`), with the `x-ratelimit-*`
            values REST sends with it in its `headers`.
    """
    # Read by the proxy before it counts the request, so that an answer that is
    # not a JSON object, or does not fit, is counted as the error it ends with.
    read: dict[str, Any] = {}

    def reader(data: bytes) -> None:
        read.update(_json_of(data))
        if fit is not None:
            fit(read)

    try:
        raw = dumps_request(body)
    except InvalidRequest as invalid:
        # An integer past 64 bits (GraphQL's JSON scalar holds any), or nested
        # deeper than JSON is written: the caller's mistake, refused (in REST's
        # words) and counted as REST refuses a bad body.
        proxy.refused(call, request_id, invalid, door, principal)
        raise
    result = await proxy.handle(
        call, principal, raw, request_id, session, door, reader, priority
    )
    if result.stream is not None:
        chunks = events(result.stream, result.unusable)
        return Answer(result.headers, chunks=chunks, unusable=result.unusable)
    if result.status != 200:
        body = refusal_body(result.status, result.body)
        error = refusal(result.status, body, result.headers.get("retry-after"))
        # The limits' values after the estimate was given back, which REST
        # sends with the replica's error, leave with the door's error.
        error.headers.update(
            (k, v) for k, v in result.headers.items() if k.startswith(_LIMIT_PREFIX)
        )
        raise error
    return Answer(result.headers, read)


def _json_of(data: bytes) -> dict[str, Any]:
    try:
        parsed = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise BackendError("The model's server answered with invalid JSON.") from err
    if not isinstance(parsed, dict):
        raise BackendError("The model's server answered with something unexpected.")
    return parsed


def events(
    stream: AsyncIterator[bytes],
    unusable: Callable[[GatewayError], None] = lambda error: None,
) -> Closing[dict[str, Any]]:
    """The JSON objects of an SSE stream, one per event as it arrives.

    The stream is closed when the caller stops early (which ends the upstream
    request), or closes this before reading it. An error event (a stream broken
    off, or the replica's own error) raises its gateway error, as does an
    event that is not JSON; `unusable` hears of it before the stream closes.
    """

    async def unread() -> None:
        await _close(stream)

    return Closing(_objects(stream, unusable), unread)


async def _close(stream: AsyncIterator[bytes]) -> None:
    aclose = getattr(stream, "aclose", None)
    if aclose is not None:
        await aclose()


async def _objects(
    stream: AsyncIterator[bytes], unusable: Callable[[GatewayError], None]
) -> AsyncGenerator[dict[str, Any], None]:
    buffer = b""
    try:
        async for piece in stream:
            buffer += piece
            *complete, buffer = buffer.split(EVENT_END)
            for event in complete:
                try:
                    payload = _data(event)
                except GatewayError as err:
                    unusable(err)  # before the finally closes (and counts) it
                    raise
                if payload is not None:
                    yield payload
    finally:
        await _close(stream)


def _data(event: bytes) -> dict[str, Any] | None:
    lines = [ln[5:].strip() for ln in event.split(b"\n") if ln.startswith(b"data:")]
    data = b"\n".join(lines)
    if not data or data == DONE:
        return None
    try:
        payload = orjson.loads(data)
    except orjson.JSONDecodeError as err:
        raise BackendError("The model's stream carried invalid JSON.") from err
    if not isinstance(payload, dict):
        return None
    if error_of(payload) is not None:
        raise refusal(502, payload)
    return payload


def usable_models(
    catalog: Catalog, principal: Principal
) -> list[tuple[str, ModelRoute]]:
    """Every name the caller may send as `model`, with its route (REST's
    `GET /v1/models` order: each model's served name, then its aliases, then
    its adapters; an adapter only where the key may use it by its own name)."""
    return [
        (name, route)
        for route in catalog.routes()
        for name in route.all_names
        if principal.may_use(route, name)
    ]


_DOOR_DECIDES = ("model", "stream", "stream_options")


def openai_body(
    extra: Mapping[str, Any], fields: Mapping[str, Any], stream: bool = False
) -> dict[str, Any]:
    """The OpenAI body for a door with typed fields: `extra` (any other
    parameter, passed through), then the typed fields that are set, which win;
    whether it streams is the door's choice, and a stream asks for usage."""
    body = {k: v for k, v in extra.items() if k not in _DOOR_DECIDES}
    body.update((k, v) for k, v in fields.items() if v is not None)
    if stream:
        body["stream"] = True
        body["stream_options"] = {"include_usage": True}
    return body
