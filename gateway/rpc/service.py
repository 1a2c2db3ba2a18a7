"""The `citadel.v1.Inference` service: each RPC runs the request path REST runs.

Every call: the key from the `authorization` metadata, the request id from
`x-request-id` (or a new one), then `ProxyService.handle` under the call's
deadline, which also bounds the upstream request (the deadline is the upstream
timeout). A cancelled call cancels the task, and with it the upstream request.
The API version and request id go out in the initial and trailing metadata,
with the `x-ratelimit-*` values (and `x-citadel-fallback`, `x-citadel-split`)
in the trailers; errors leave through
`citadel.gateway.rpc.status`. A request message protobuf cannot read reaches
the servicer as `Unreadable` (see `readable`), refused there as REST refuses a
body it cannot parse.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import grpc
from google.protobuf.message import DecodeError, Message

from citadel.gateway.deps import Deps
from citadel.gateway.errors import (
    BackendTimeout,
    BodyTooLarge,
    GatewayError,
    InternalError,
    InvalidRequest,
)
from citadel.gateway.rpc import convert
from citadel.gateway.rpc.status import status_of
from citadel.gateway.rpc.v1 import citadel_pb2 as pb
from citadel.gateway.rpc.v1 import citadel_pb2_grpc as pb_grpc
from citadel.gateway.services.auth import Principal
from citadel.gateway.services.requests import (
    CHAT,
    COMPLETIONS,
    EMBEDDINGS,
    ApiCall,
    Door,
    request_id,
)
from citadel.gateway.services.shedding import PRIORITY_HEADER
from citadel.gateway.services.structured import (
    Answer,
    ask,
    passed_on,
    usable_models,
)
from citadel.gateway.versioning import (
    API_VERSION,
    GRPC_DEPRECATIONS,
    VERSION_HEADER,
)

log = logging.getLogger(__name__)
M = TypeVar("M", bound=Message)
R = TypeVar("R", bound=Message)

Context = grpc.aio.ServicerContext[Any, Any]
REQUEST_ID = "x-request-id"


@dataclass(frozen=True)
class Unreadable:
    """A request message protobuf could not read: nested past its 100 levels
    (a Struct in `extra` takes three for each of its objects), or no message of
    its type at all."""

    size: int
    """Its bytes, for the body limit, which REST checks before it parses."""
    message: str
    """What the caller is told (protobuf's own words name its internals)."""


def readable(parse: Callable[[bytes], R]) -> Callable[[bytes], R | Unreadable]:
    """`parse` as a request deserializer that never raises: grpc ends a call
    whose deserializer raises with UNKNOWN, naming the exception, before the
    servicer runs, so that nothing counts it. The servicer refuses an
    `Unreadable` itself, once the key is checked, as REST refuses a body it
    cannot parse (400)."""

    def read(data: bytes) -> R | Unreadable:
        try:
            return parse(data)
        except DecodeError as err:
            if "depth" in str(err).lower():
                message = (
                    "The request message is nested too deeply: protobuf reads "
                    "at most 100 levels (each object in a Struct takes three)."
                )
            else:
                message = "The request message could not be read as protobuf."
            return Unreadable(len(data), message)

    return read


@dataclass
class _Call:
    """One RPC's caller and the metadata it will end with."""

    principal: Principal
    request_id: str
    metadata: dict[str, str]
    session: str | None
    trailers: dict[str, str] = field(default_factory=dict)
    priority: tuple[str, ...] = ()
    """Every value of the priority metadata (`x-citadel-priority`) sent."""


class InferenceService(pb_grpc.InferenceServicer):
    """The servicer, built on the app's parts."""

    def __init__(self, deps: Deps) -> None:
        self._deps = deps

    async def ListModels(
        self, request: pb.ListModelsRequest | Unreadable, context: Context
    ) -> pb.ListModelsResponse:
        async with self._call(context) as call:
            _read(request)
            models = usable_models(self._deps.catalog, call.principal)
        return pb.ListModelsResponse(
            models=[
                pb.Model(
                    id=name,
                    owned_by="citadel",
                    parent=route.parent_of(name) or "",
                )
                for name, route in models
            ]
        )

    async def ChatCompletion(
        self, request: pb.ChatCompletionRequest | Unreadable, context: Context
    ) -> pb.ChatCompletionResponse:
        return await self._unary(
            context,
            request,
            CHAT,
            lambda message: convert.chat_body(message, stream=False),
            pb.ChatCompletionResponse,
        )

    async def ChatCompletionStream(
        self, request: pb.ChatCompletionRequest | Unreadable, context: Context
    ) -> AsyncIterator[pb.ChatCompletionChunk]:
        async with self._call(context, CHAT) as call:
            body = self._body(
                request,
                CHAT,
                call,
                lambda message: convert.chat_body(message, stream=True),
            )
            # The deadline bounds the wait for the first answer; after that a
            # passed deadline cancels the call (and the stream) like a client
            # cancel does.
            answer: Answer | None = None
            try:
                async with _deadline(context):
                    answer = await self._ask(CHAT, body, call)
                assert answer.chunks is not None
                async for chunk in answer.chunks:
                    try:
                        message = convert.parse(chunk, pb.ChatCompletionChunk())
                    except GatewayError as err:
                        answer.unusable(err)  # counted as what the client gets
                        raise
                    yield message
            finally:
                # Also when the deadline passed as the answer came: the stream,
                # unread, still holds a replica.
                if answer is not None and answer.chunks is not None:
                    await answer.chunks.aclose()

    async def Completion(
        self, request: pb.CompletionRequest | Unreadable, context: Context
    ) -> pb.CompletionResponse:
        return await self._unary(
            context,
            request,
            COMPLETIONS,
            convert.completion_body,
            pb.CompletionResponse,
        )

    async def Embeddings(
        self, request: pb.EmbeddingsRequest | Unreadable, context: Context
    ) -> pb.EmbeddingsResponse:
        return await self._unary(
            context,
            request,
            EMBEDDINGS,
            convert.embeddings_body,
            pb.EmbeddingsResponse,
        )

    def _body(
        self,
        request: R | Unreadable,
        api: ApiCall,
        call: _Call,
        body_of: Callable[[R], dict[str, Any]],
    ) -> dict[str, Any]:
        """The OpenAI body of `request`; a message over the body limit, or one
        that cannot be read or become JSON, is refused as REST refuses its body
        (413, 400: here INVALID_ARGUMENT), and counted. (grpc-core's own limit,
        set higher, would answer RESOURCE_EXHAUSTED, a rate limit's code, and
        count nothing.)
        """
        limit = self._deps.max_body_bytes
        try:
            size = (
                request.size if isinstance(request, Unreadable) else request.ByteSize()
            )
            if size > limit:
                raise BodyTooLarge(f"The request is over the limit of {limit} bytes.")
            return body_of(_read(request))
        except GatewayError as err:
            self._deps.proxy.refused(
                api, call.request_id, err, Door.GRPC, call.principal
            )
            raise

    async def _unary(
        self,
        context: Context,
        request: R | Unreadable,
        api: ApiCall,
        body_of: Callable[[R], dict[str, Any]],
        reply: Callable[[], M],
    ) -> M:
        """One unary call: the body is made, and the answer read, inside the
        call's error mapping (a request it cannot convert is INVALID_ARGUMENT,
        counted like REST's 400; never UNKNOWN). The answer is read into the
        message before the proxy counts the request: one that does not fit is
        counted as the UNAVAILABLE (REST's 502) it ends with."""
        async with self._call(context, api) as call:
            body = self._body(request, api, call, body_of)
            message = reply()
            async with _deadline(context):
                await self._ask(
                    api, body, call, lambda answer: convert.parse(answer, message)
                )
            return message
        raise AssertionError("unreachable: _call aborts the call")

    async def _ask(
        self,
        api: ApiCall,
        body: dict[str, Any],
        call: _Call,
        fit: Callable[[dict[str, Any]], object] | None = None,
    ) -> Answer:
        answer = await ask(
            self._deps.proxy,
            api,
            call.principal,
            body,
            call.request_id,
            Door.GRPC,
            call.session,
            fit,
            call.priority,
        )
        call.trailers.update(passed_on(answer.headers))
        return answer

    @contextlib.asynccontextmanager
    async def _call(
        self, context: Context, api: ApiCall | None = None
    ) -> AsyncIterator[_Call]:
        """Authenticates the caller; ends the call with the right status.

        Args:
            api: the forwarded endpoint, whose request metrics count a refused
                key (None: not a model call).
        """
        metadata = {
            k.lower(): v
            for k, v in context.invocation_metadata() or ()
            if isinstance(v, str)
        }
        given = metadata.get(REQUEST_ID, "")
        rid = request_id(given)
        head = {VERSION_HEADER: API_VERSION, REQUEST_ID: rid}
        deprecation = GRPC_DEPRECATIONS.get(_method(context))
        if deprecation is not None:
            head.update(deprecation.headers())
        await context.send_initial_metadata(tuple(head.items()))
        trailers = {VERSION_HEADER: API_VERSION, REQUEST_ID: rid}
        call: _Call | None = None
        try:
            principal = self._deps.authenticator.authenticate(
                metadata.get("authorization")
            )
            session = metadata.get(self._deps.session_header)
            call = _Call(
                principal,
                rid,
                metadata,
                session,
                trailers,
                priority=tuple(
                    v
                    for k, v in context.invocation_metadata() or ()
                    if k.lower() == PRIORITY_HEADER and isinstance(v, str)
                ),
            )
            yield call
        except GatewayError as err:
            if call is None and api is not None:
                # Refused for its key: the proxy never saw it to count it.
                self._deps.proxy.refused(api, rid, err, Door.GRPC)
            await _abort(context, err, trailers)
        except (asyncio.CancelledError, grpc.aio.AbortError):
            raise
        except Exception as err:
            log.error("unexpected error", exc_info=err, extra={"request_id": rid})
            await _abort(
                context, InternalError("The gateway failed unexpectedly."), trailers
            )
        else:
            context.set_trailing_metadata(tuple(trailers.items()))


def _read(request: R | Unreadable) -> R:
    """The request message, or the caller's mistake (INVALID_ARGUMENT)."""
    if isinstance(request, Unreadable):
        raise InvalidRequest(request.message)
    return request


def _method(context: Context) -> str:
    details = getattr(context, "_rpc_event", None)
    method = getattr(getattr(details, "call_details", None), "method", b"")
    return method.decode() if isinstance(method, bytes) else str(method)


@contextlib.asynccontextmanager
async def _deadline(context: Context) -> AsyncIterator[None]:
    """Bounds the work by the call's deadline (None: no deadline)."""
    remaining = context.time_remaining()
    try:
        async with asyncio.timeout(remaining):
            yield
    except TimeoutError as err:
        raise BackendTimeout("The call's deadline passed.") from err


async def _abort(
    context: Context, error: GatewayError, trailers: dict[str, str]
) -> None:
    status = status_of(error, trailers)
    await context.abort(status.code, status.details, status.trailing_metadata)
