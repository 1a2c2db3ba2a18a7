"""Who is asking: the GraphQL context, built per request (or per WebSocket).

Over HTTP the key is checked before the query runs, so a missing or bad key is
a 401 in OpenAI's shape, as on REST, counted as a refused chat. Over WebSocket
(subscriptions) the key comes from the `connection_init` payload
(`{"authorization": "Bearer ..."}`) or the handshake's `Authorization` header, and
is checked when an operation starts.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from starlette.requests import HTTPConnection, Request
from starlette.responses import Response
from strawberry.fastapi import BaseContext

from citadel.gateway.deps import REQUEST_ID, Deps, take_request_id
from citadel.gateway.errors import GatewayError
from citadel.gateway.services.auth import Principal
from citadel.gateway.services.requests import CHAT, Door


class GraphQLContext(BaseContext):
    """The app's parts and the caller of one operation."""

    def __init__(self, deps: Deps, request_id: str, principal: Principal | None):
        super().__init__()
        self.deps = deps
        self.request_id = request_id
        self._principal = principal

    def add_headers(self, headers: Mapping[str, str]) -> None:
        """Headers for the HTTP response (the `x-ratelimit-*` values)."""
        if self.response is not None:
            self.response.headers.update(headers)

    def principal(self) -> Principal:
        """The caller.

        Raises:
            AuthenticationFailed: no key, or an unknown or revoked one.
        """
        if self._principal is None:
            self._principal = self.deps.authenticator.authenticate(
                _authorization(self.connection_params, self.request)
            )
        return self._principal


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
    """The context getter (a FastAPI dependency)."""
    deps: Deps = connection.app.state.deps
    # take_request_id reads only headers and state, which a WebSocket has too.
    rid = take_request_id(connection)  # type: ignore[arg-type]
    if response is not None:
        response.headers[REQUEST_ID] = rid
    if isinstance(connection, Request):
        try:
            principal = deps.authenticator.authenticate(
                connection.headers.get("authorization")
            )
        except GatewayError as err:
            # Counted as a refused chat (the operation is not known yet, and
            # chats are what keys are for), or a flood of bad keys would not
            # show in the request metrics.
            deps.proxy.refused(CHAT, rid, err, Door.GRAPHQL)
            raise
        return GraphQLContext(deps, rid, principal)
    return GraphQLContext(deps, rid, None)
