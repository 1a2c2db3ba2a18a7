"""An ASGI middleware that adds the API version (and deprecation headers) to
every HTTP response.

Pure ASGI, not Starlette's BaseHTTPMiddleware: it touches only the
`http.response.start` message, so the streaming path stays unbuffered and the
cost per request is a list append.
"""

from __future__ import annotations

from collections.abc import Mapping

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from citadel.gateway.versioning import (
    REST_DEPRECATIONS,
    Deprecation,
    response_headers,
)


class VersionHeaders:
    """Wraps an ASGI app.

    Args:
        app: the wrapped app.
        deprecations: deprecated paths (the module's registry by default).
    """

    def __init__(
        self, app: ASGIApp, deprecations: Mapping[str, Deprecation] = REST_DEPRECATIONS
    ) -> None:
        self.app = app
        self._deprecations = deprecations

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = response_headers(scope["path"], self._deprecations)

        async def send_with_version(message: Message) -> None:
            if message["type"] == "http.response.start":
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_version)
