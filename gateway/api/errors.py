"""The one place where errors become HTTP responses in OpenAI's shape."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException

from citadel.gateway.deps import REQUEST_ID
from citadel.gateway.errors import (
    GatewayError,
    InternalError,
    InvalidRequest,
    MethodNotAllowed,
    NotFound,
)

log = logging.getLogger(__name__)


def error_response(request: Request, error: GatewayError) -> Response:
    """The HTTP response for a gateway error."""
    headers = dict(error.headers)
    rid = getattr(request.state, "request_id", None)
    if rid:
        headers[REQUEST_ID] = rid
    return Response(error.to_json(), error.status, headers, "application/json")


async def _gateway_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, GatewayError)
    return error_response(request, exc)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    return error_response(request, InvalidRequest(f"Invalid request: {exc.errors()}"))


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    error: GatewayError
    if exc.status_code == 404:
        error = NotFound(f"No such endpoint: {request.method} {request.url.path}")
    elif exc.status_code == 405:
        # Starlette names the allowed methods in `Allow`, which a 405 must carry
        # (RFC 9110, 15.5.6).
        error = MethodNotAllowed(
            f"{request.method} is not allowed on {request.url.path}",
            headers=dict(exc.headers or {}),
        )
    else:
        error = InvalidRequest(str(exc.detail))
    return error_response(request, error)


def unexpected_response(request: Request, exc: Exception) -> Response:
    """Logs a failure no GatewayError describes; the 500 the caller gets."""
    log.error(
        "unexpected error",
        exc_info=exc,
        extra={"request_id": getattr(request.state, "request_id", None)},
    )
    return error_response(request, InternalError("The gateway failed unexpectedly."))


async def _unexpected(request: Request, exc: Exception) -> Response:
    return unexpected_response(request, exc)


def install(app: FastAPI) -> None:
    """Registers the handlers on `app`."""
    app.add_exception_handler(GatewayError, _gateway_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(HTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
