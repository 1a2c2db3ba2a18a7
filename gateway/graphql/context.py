"""Who is asking: the GraphQL context, built per request (or per WebSocket).

Over HTTP the key is checked, and the body read under the gateway's limit,
before the query runs: a missing or bad key is REST's 401, a body over the limit
REST's 413, each counted as a refused chat and answered by the router in the
door's shape (`GraphQLContext.refused`). Over WebSocket
(subscriptions) the key comes from the `connection_init` payload
(`{"authorization": "Bearer ..."}`, the only way for browsers, which cannot set
headers on a WebSocket) or the handshake's `Authorization` header. It is checked
at `connection_init`, where a socket without a valid key is refused (counted
like the HTTP 401), and again when each operation starts, whatever it asks for:
a key revoked while the socket is open gets no more answers. At `connection_init`
the socket is also counted against its key's cap on open sockets
(`Deps.sockets`), until it closes.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from graphql import GraphQLError
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, HTTPConnection, Request
from starlette.responses import Response
from strawberry.exceptions import ConnectionRejectionError
from strawberry.fastapi import BaseContext

from citadel.gateway.deps import REQUEST_ID, Deps, read_body, take_request_id
from citadel.gateway.errors import GatewayError, TooManySockets
from citadel.gateway.graphql.errors import graphql_error
from citadel.gateway.services.auth import Principal
from citadel.gateway.services.requests import CHAT, Door
from citadel.gateway.services.shedding import PRIORITY_HEADER


class GraphQLContext(BaseContext):
    """The app's parts and the caller of one operation (over HTTP), or of each
    operation of a WebSocket.

    Args:
        deps: the app's parts.
        request_id: the request's id (over WebSocket, the connection's).
        principal: the caller, checked before the operation (HTTP); None over
            WebSocket, where the key is checked as each operation starts.
        session: the session header, for session-affinity routing.
        priority: every value of the priority header (`x-citadel-priority`).
        refused: why the HTTP request is refused before any operation (no key
            or a bad one, a body over the limit), counted already; the router
            answers it. None over WebSocket, and for a request let through.
    """

    def __init__(
        self,
        deps: Deps,
        request_id: str,
        principal: Principal | None,
        session: str | None = None,
        refused: GatewayError | None = None,
        priority: tuple[str, ...] = (),
    ):
        super().__init__()
        self.deps = deps
        self.request_id = request_id
        self.session = session
        self.priority = priority
        self.refused = refused
        self._principal = principal
        self._calls = 0
        # The key name a WebSocket is counted under, from its connection_init
        # until it closes (a key revoked meanwhile is still the one it holds).
        self._socket_key: str | None = None

    def next_request_id(self) -> str:
        """The id of the next model call: the request's own for the first (the
        id the HTTP response carries), then numbered, so that the access log
        and the replicas tell apart the calls of one document or one socket."""
        self._calls += 1
        return (
            self.request_id if self._calls == 1 else f"{self.request_id}-{self._calls}"
        )

    def add_headers(self, headers: Mapping[str, str]) -> None:
        """Headers for the HTTP response (the `x-ratelimit-*` values)."""
        if self.response is not None:
            self.response.headers.update(headers)

    def principal(self) -> Principal:
        """The caller.

        Raises:
            AuthenticationFailed: no key, or an unknown or revoked one.
        """
        if self._principal is not None:
            return self._principal
        # Over WebSocket, checked for every operation, never kept: a key revoked
        # or narrowed while the socket is open must stop working within seconds,
        # as on REST and gRPC (one dictionary lookup).
        return self.deps.authenticator.authenticate(
            _authorization(self.connection_params, self.request)
        )

    def hold_socket(self) -> None:
        """Counts the WebSocket against its key's cap, once (the older protocol
        may send `connection_init` again; with another key, the socket is
        counted against that one from then on). Without keys (auth disabled)
        there is no cap: every socket would count against one.

        Raises:
            AuthenticationFailed: no key, or an unknown or revoked one.
            TooManySockets: the key holds as many sockets as it may; counted as
                a refused request (a 429) is.
        """
        principal = self.principal()
        name = principal.name
        if self._socket_key is not None:
            if name == self._socket_key:
                return
            # Counted under the first key while it runs the second's
            # operations, a socket let a key hold one past its cap.
            self.release_socket()
        if name is None:
            return
        if not self.deps.sockets.open(name):
            error = TooManySockets(
                f"The key `{name}` holds {self.deps.sockets.max_per_key} "
                "WebSockets open, the most it may: close one first."
            )
            self.deps.proxy.refused(
                CHAT, self.request_id, error, Door.GRAPHQL, principal
            )
            raise error
        self._socket_key = name

    def release_socket(self) -> None:
        """The WebSocket closed, however it did: its key may open another."""
        if self._socket_key is not None:
            self.deps.sockets.close(self._socket_key)
            self._socket_key = None


def refusal(context: GraphQLContext) -> GraphQLError | None:
    """Checks the key of a WebSocket against the key store as it is now.

    Returns:
        None while the key works; else the GraphQL error that refuses the socket
        or the operation (REST's 401 in its `extensions`), the refusal counted
        as the HTTP 401 is, or a flood of keyless sockets would not show in the
        request metrics.
    """
    try:
        context.principal()
    except GatewayError as err:
        context.deps.proxy.refused(CHAT, context.request_id, err, Door.GRAPHQL)
        return graphql_error(err)
    return None


def admit(context: GraphQLContext) -> None:
    """Checks the key of a WebSocket at its `connection_init`, and counts the
    socket against the key's cap (`GraphQLContext.release_socket` when it
    closes).

    Raises:
        ConnectionRejectionError: no key, or an unknown or revoked one; its
            payload is the GraphQL error (`graphql-ws` sends it to the client).
        TooManySockets: the key holds as many sockets as it may.
    """
    error = refusal(context)
    if error is not None:
        raise ConnectionRejectionError(dict(error.formatted))
    context.hold_socket()


def _authorization(params: Any, connection: Any) -> str | None:
    if isinstance(params, dict):
        value = params.get("authorization") or params.get("Authorization")
        if isinstance(value, str):
            return value
    if isinstance(connection, HTTPConnection):
        return connection.headers.get("authorization")
    return None


async def context_of(
    connection: HTTPConnection,
    response: Response = None,  # type: ignore[assignment]
) -> GraphQLContext:
    """The context getter (a FastAPI dependency).

    A request refused here comes back as a context that says why
    (`GraphQLContext.refused`), not as an exception: raised from a dependency,
    the app's handlers would answer it in REST's shape, which a GraphQL client
    does not read as it reads every other error of the door.
    """
    deps: Deps = connection.app.state.deps
    # take_request_id reads only headers and state, which a WebSocket has too.
    rid = take_request_id(connection)  # type: ignore[arg-type]
    if response is not None:
        response.headers[REQUEST_ID] = rid
    session = connection.headers.get(deps.session_header)
    priority = tuple(connection.headers.getlist(PRIORITY_HEADER))
    if isinstance(connection, Request):
        principal: Principal | None = None
        try:
            principal = deps.authenticator.authenticate(
                connection.headers.get("authorization")
            )
            await _read_body(connection, deps.max_body_bytes)
        except GatewayError as err:
            # Counted as a refused chat (the operation is not known yet, and
            # chats are what keys are for), or a flood of bad keys would not
            # show in the request metrics.
            deps.proxy.refused(CHAT, rid, err, Door.GRAPHQL, principal)
            return GraphQLContext(
                deps, rid, principal, session, refused=err, priority=priority
            )
        except ClientDisconnect as err:  # gone during the upload
            deps.proxy.left(CHAT, rid, Door.GRAPHQL, principal)
            # Answered to nobody; unlike any other exception, logged as nothing.
            raise HTTPException(499, "The client left during the upload.") from err
        return GraphQLContext(deps, rid, principal, session, priority=priority)
    return GraphQLContext(deps, rid, None, session, priority=priority)


async def _read_body(request: Request, limit: int) -> None:
    """Reads the body under the gateway's size limit (413, as on REST), before
    strawberry reads it whole; strawberry then gets it from Starlette's cache."""
    request._body = await read_body(request, limit)
