"""`/graphql`: the strawberry router mounted in the gateway's FastAPI app.

POST (and GET for queries) over HTTP, and subscriptions over WebSocket
(`graphql-transport-ws`, and the older `graphql-ws`) on the same path. No
GraphiQL page: the gateway serves APIs only.

A WebSocket stays open only with a valid key: its `connection_init` is refused
without one, and a socket that sends no `connection_init` is closed after
`init_timeout_s`, whichever protocol it speaks. Otherwise a client without a
key could hold sockets open for ever without running an operation. The key is
checked again as each operation starts, before it runs: once it is revoked,
every new operation is refused with the protocol's `error` message (as a
document that does not validate is), while the streams already running finish.
A key holds at most `Deps.sockets.max_per_key` sockets open: the next is
refused at its `connection_init` (code 4429), and each one counts until it
closes, however it does.

A request strawberry cannot read (a body that is not JSON, no query) gets the
door's JSON error, with REST's 400 in its `extensions`, counted as REST counts
that 400: strawberry's own answer is plain text, counted nowhere. So does a
request refused before strawberry reads it (no key or a bad one, a body over
the limit: see `context_of`), with REST's 401 or 413, not REST's error shape.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import timedelta
from typing import overload

from cross_web import AsyncHTTPRequestAdapter, HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.websockets import WebSocket, WebSocketDisconnect
from strawberry.fastapi import GraphQLRouter
from strawberry.http import GraphQLRequestData
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage as TransportInitMessage,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    SubscribeMessage,
)
from strawberry.subscriptions.protocols.graphql_ws.handlers import (
    BaseGraphQLWSHandler,
)
from strawberry.subscriptions.protocols.graphql_ws.types import (
    ConnectionInitMessage,
    StartMessage,
)
from strawberry.types.unset import UNSET, UnsetType

from citadel.gateway.errors import GatewayError, InvalidRequest, TooManySockets
from citadel.gateway.graphql.context import (
    GraphQLContext,
    admit,
    context_of,
    refusal,
)
from citadel.gateway.graphql.errors import graphql_error
from citadel.gateway.graphql.schema import build_schema
from citadel.gateway.services.requests import (
    CHAT,
    NOT_AN_OBJECT,
    Door,
    unparsable,
)

PATH = "/graphql"
INIT_TIMEOUT_CLOSE = 4408
"""The close code of a socket that sent no `connection_init` in time: the one
`graphql-transport-ws` uses, for the older protocol too."""
TOO_MANY_SOCKETS_CLOSE = 4429
"""The close code of a socket refused at its `connection_init` because its key
holds as many open as it may, on either protocol: 4000 and HTTP's 429, as
4403 and 4408 are 4000 and HTTP's status (`graphql-transport-ws` closes a
socket that sends `connection_init` twice with 4429 too, with its own reason)."""
TOO_MANY_SOCKETS_REASON = "Too many WebSockets for this key"


class _GraphQLTransportWSHandler(BaseGraphQLTransportWSHandler[GraphQLContext, None]):
    """`graphql-transport-ws`, with the key checked as each operation starts,
    and a cap on the sockets each key holds open."""

    async def handle(self) -> None:
        try:
            await super().handle()
        finally:
            # However it ended: the client or the gateway closed it, or it
            # failed.
            self.context.release_socket()

    async def handle_connection_init(self, message: TransportInitMessage) -> None:
        try:
            await super().handle_connection_init(message)
        except TooManySockets:
            # The protocol has no message before the ack: the code says it.
            await self.websocket.close(
                code=TOO_MANY_SOCKETS_CLOSE, reason=TOO_MANY_SOCKETS_REASON
            )

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        # Not acknowledged, or an id in use: the base class closes the socket.
        if self.connection_acknowledged and message["id"] not in self.operations:
            # Any operation, not only those that reach a model (which check the
            # key themselves): over HTTP no answer comes without a valid key.
            error = refusal(self.context)
            if error is not None:
                await self.send_message(
                    {"id": message["id"], "type": "error", "payload": [error.formatted]}
                )
                return
        await super().handle_subscribe(message)


class _GraphQLWSHandler(BaseGraphQLWSHandler[GraphQLContext, None]):
    """The older `graphql-ws` protocol, with the key checked as each operation
    starts, a cap on the sockets each key holds open, and the
    `connection_init` wait that strawberry gives `graphql-transport-ws` only."""

    _init_wait: asyncio.Task[None] | None = None

    async def handle(self) -> None:
        self._init_wait = asyncio.create_task(self._close_uninitialised())
        try:
            await super().handle()
        finally:
            self._init_wait.cancel()
            self.context.release_socket()  # however it ended

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        # The key is checked now: the socket is refused or acknowledged.
        if self._init_wait is not None:
            self._init_wait.cancel()
        try:
            await super().handle_connection_init(message)
        except TooManySockets as err:
            # As a bad key is refused (`connection_error`, saying why), with
            # the code that says this refusal.
            payload = dict(graphql_error(err).formatted)
            await self.send_message({"type": "connection_error", "payload": payload})
            await self.websocket.close(
                code=TOO_MANY_SOCKETS_CLOSE, reason=TOO_MANY_SOCKETS_REASON
            )

    async def handle_start(self, message: StartMessage) -> None:
        # Not acknowledged: the base class closes the socket. An id in use: the
        # base class replaces its operation, by a subscription (this protocol
        # runs no other), whose resolver checks the key.
        if self.connection_acknowledged and message["id"] not in self.tasks:
            error = refusal(self.context)
            if error is not None:
                await self.send_message(
                    {"type": "error", "id": message["id"], "payload": error.formatted}
                )
                return
        await super().handle_start(message)

    async def _close_uninitialised(self) -> None:
        await asyncio.sleep(self.view.connection_init_wait_timeout.total_seconds())
        reason = "Connection initialisation timeout"
        with contextlib.suppress(WebSocketDisconnect):  # the client left first
            await self.websocket.close(code=INIT_TIMEOUT_CLOSE, reason=reason)


def _text(data: str | bytes) -> str:
    """A body as text, for a decoding error's message."""
    return data if isinstance(data, str) else data.decode(errors="replace")


class _Router(GraphQLRouter[GraphQLContext, None]):
    graphql_transport_ws_handler_class = _GraphQLTransportWSHandler
    graphql_ws_handler_class = _GraphQLWSHandler

    def decode_json(self, data: str | bytes) -> object:
        """A body or socket message as JSON; strawberry answers one it cannot
        parse with a 400 (over HTTP) or closes the socket (4400).

        The standard library's reader recurses, and decodes bytes before it
        parses: JSON nested deeper than Python's recursion limit would be a
        RecursionError, and bytes that are no UTF-8 a UnicodeDecodeError, each
        the gateway's 500 for what is the caller's mistake.
        """
        try:
            return json.loads(data)
        except RecursionError as err:
            raise json.JSONDecodeError("nested too deeply", _text(data), 0) from err
        except UnicodeDecodeError as err:
            raise json.JSONDecodeError("not UTF-8", _text(data), err.start) from err

    async def parse_http_body(
        self, request: AsyncHTTPRequestAdapter
    ) -> GraphQLRequestData | list[GraphQLRequestData]:
        try:
            return await super().parse_http_body(request)
        except AttributeError as err:
            # strawberry reads any JSON body but a list as an object: a number,
            # a string or null was an AttributeError, the gateway's 500.
            raise HTTPException(400, NOT_AN_OBJECT) from err

    @overload
    async def run(
        self, request: Request, context: GraphQLContext = ..., root_value: None = ...
    ) -> Response: ...

    @overload
    async def run(
        self, request: WebSocket, context: GraphQLContext = ..., root_value: None = ...
    ) -> WebSocket: ...

    async def run(
        self,
        request: Request | WebSocket,
        context: GraphQLContext = UNSET,
        root_value: None = UNSET,
    ) -> Response | WebSocket:
        if isinstance(request, Request) and context.refused is not None:
            # Refused before the operation is known, and counted then.
            return self._error_response(context, context.refused)
        try:
            return await super().run(request, context, root_value)
        except HTTPException as err:
            # strawberry refuses a request it cannot read before the operation
            # is known; over HTTP its key was checked (`context_of`).
            if err.status_code != 400 or not isinstance(request, Request):
                raise
            return self._unreadable(request, context, err)

    def _unreadable(
        self, request: Request, context: GraphQLContext, err: HTTPException
    ) -> Response:
        """The door's error for an HTTP request strawberry could not read,
        counted as a refused chat (as a bad key is), REST's 400."""
        cause = err.__cause__
        where = "query string" if request.method == "GET" else "body"
        error = (
            unparsable(cause, where)
            if isinstance(cause, json.JSONDecodeError)
            else InvalidRequest(err.reason)
        )
        context.deps.proxy.refused(
            CHAT, context.request_id, error, Door.GRAPHQL, context.principal()
        )
        return self._error_response(context, error)

    def _error_response(self, context: GraphQLContext, error: GatewayError) -> Response:
        """`error` as the door answers a request it runs no operation for: one
        GraphQL error in `errors`, with REST's status and headers, and the
        request id (set on the sub-response by `context_of`)."""
        sub_response = context.response
        assert sub_response is not None  # over HTTP, the response's headers
        sub_response.status_code = error.status
        sub_response.headers.update(error.headers)
        return self.create_response(
            {"errors": [graphql_error(error).formatted]}, sub_response
        )

    async def on_ws_connect(
        self, context: GraphQLContext
    ) -> UnsetType | dict[str, object] | None:
        # Refused for its key: graphql-transport-ws closes with 4403; graphql-ws
        # sends `connection_error` and closes with 1011. Refused for its key's
        # cap (TooManySockets): the handlers close with 4429.
        admit(context)
        return await super().on_ws_connect(context)  # acknowledged, no payload


def graphql_router(init_timeout_s: float) -> GraphQLRouter[GraphQLContext, None]:
    """The router; `app.include_router(graphql_router(...))` mounts it.

    Args:
        init_timeout_s: how long a WebSocket may stay open before its
            `connection_init`.
    """
    return _Router(
        build_schema(),
        path=PATH,
        graphql_ide=None,
        context_getter=context_of,
        include_in_schema=False,
        connection_init_wait_timeout=timedelta(seconds=init_timeout_s),
    )
