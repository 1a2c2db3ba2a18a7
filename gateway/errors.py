"""One error hierarchy, mapped once to OpenAI's error shape and an HTTP status.

Services raise these; the API layer turns any of them into
`{"error": {"message", "type", "param", "code"}}` with `status` and `headers`.
Other front doors (gRPC, GraphQL) map the same classes to their own codes.
"""

from __future__ import annotations

import contextlib
import html
import math
import re
from collections.abc import Mapping
from typing import Any, ClassVar

import orjson


class GatewayError(Exception):
    """Base of every error the gateway reports to a client."""

    status: ClassVar[int] = 500
    type: ClassVar[str] = "server_error"
    code: ClassVar[str | None] = None

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        self.headers = dict(headers or {})

    def body(self) -> dict[str, dict[str, str | None]]:
        """OpenAI's error object."""
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }

    def to_json(self) -> bytes:
        """The error object as JSON bytes."""
        return orjson.dumps(self.body())


class _RetryLater(GatewayError):
    """An error that tells the client when to try again."""

    def __init__(
        self,
        message: str,
        *,
        retry_after_s: float,
        headers: dict[str, str] | None = None,
        scope: str = "",
    ) -> None:
        # Whole seconds, at least one, as the header says it: gRPC's RetryInfo
        # and GraphQL's `retryAfter` read this, and must tell the client what
        # REST's header does (a 0 s RetryInfo beside a 1 s header was a retry
        # storm for a client that reads the former).
        seconds = max(1, math.ceil(retry_after_s))
        merged = dict(headers or {})
        merged["retry-after"] = str(seconds)
        super().__init__(message, headers=merged)
        self.retry_after_s = seconds
        self.scope = scope
        """For limits: which kind refused it (requests, tokens or quota)."""


class InvalidRequest(GatewayError):
    """400: malformed JSON or an invalid field."""

    status = 400
    type = "invalid_request_error"


class AuthenticationFailed(GatewayError):
    """401: no API key, or one that is unknown or revoked."""

    status = 401
    type = "invalid_request_error"
    code = "invalid_api_key"


class PermissionDenied(GatewayError):
    """403: the key may not use this model or endpoint."""

    status = 403
    type = "invalid_request_error"
    code = "model_not_allowed"


class AdminOnly(GatewayError):
    """403: the endpoint needs a key with the admin role."""

    status = 403
    type = "invalid_request_error"
    code = "admin_only"


class ModelNotFound(GatewayError):
    """404: no model by that name."""

    status = 404
    type = "invalid_request_error"
    code = "model_not_found"


class NotFound(GatewayError):
    """404: no such path."""

    status = 404
    type = "invalid_request_error"
    code = "not_found"


class MethodNotAllowed(GatewayError):
    """405: the path exists, the method does not."""

    status = 405
    type = "invalid_request_error"
    code = "method_not_allowed"


class BodyTooLarge(GatewayError):
    """413: the request body is over the configured limit."""

    status = 413
    type = "invalid_request_error"
    code = "request_too_large"


class HeadersTooLarge(GatewayError):
    """431: the request line and headers are over the gateway's bound; answered
    before the app sees the request, and the connection closed."""

    status = 431
    type = "invalid_request_error"
    code = "headers_too_large"


class HeadersTimeout(GatewayError):
    """408: the request line and headers did not all come within the gateway's
    time from their first byte (a slow client, or one holding the connection
    open on purpose); answered before the app sees the request, and the
    connection closed."""

    status = 408
    type = "invalid_request_error"
    code = "headers_timeout"


class RateLimited(_RetryLater):
    """429: a requests or tokens per minute limit."""

    status = 429
    type = "rate_limit_error"
    code = "rate_limit_exceeded"


class TooManySockets(GatewayError):
    """429: the key holds as many GraphQL WebSockets open as it may; another
    opens once one of them closes (so no `Retry-After`)."""

    status = 429
    type = "rate_limit_error"
    code = "too_many_sockets"


class QuotaExceeded(_RetryLater):
    """429: a daily or monthly token quota is used up."""

    status = 429
    type = "insufficient_quota"
    code = "insufficient_quota"


class NoReplica(_RetryLater):
    """503: the model has no ready replica, none of those tried could be
    reached, or each refused the request unworked (a 503, or 429 and 503)."""

    status = 503
    type = "server_error"
    code = "model_not_ready"


class ModelOverloaded(_RetryLater):
    """503: a sheddable request for a model whose every replica is full (see
    `services.shedding`)."""

    status = 503
    type = "server_error"
    code = "model_overloaded"


class NotReady(_RetryLater):
    """503: the gateway has no routing configuration yet."""

    status = 503
    type = "server_error"
    code = "gateway_not_ready"


class ShuttingDown(_RetryLater):
    """503: the gateway stopped before the answer came (its shutdown grace ran
    out); another replica of the gateway can take the request."""

    status = 503
    type = "server_error"
    code = "shutting_down"


class LimitStoreUnavailable(GatewayError):
    """503: the limit store (Redis) cannot be reached, for what only it knows
    (where a key's limits stand); requests are admitted meanwhile."""

    status = 503
    type = "server_error"
    code = "limit_store_unavailable"


class BackendError(GatewayError):
    """502: the replica failed or answered with something unusable."""

    status = 502
    type = "server_error"
    code = "backend_error"


class BackendTimeout(GatewayError):
    """504: the replica did not answer in time."""

    status = 504
    type = "server_error"
    code = "backend_timeout"


class InternalError(GatewayError):
    """500: a bug in the gateway; the message says no more than that."""

    status = 500
    type = "server_error"
    code = "internal_error"


REPLICA_RETRY_AFTER_S = 1
"""When to retry a replica's 429 that does not say (or not in seconds)."""
REPLICA_RETRY_AFTER_MAX_S = 86_400
"""The longest wait passed on from a replica (a `Duration` holds 10,000 years,
Python's `int` reads 4,300 digits: a replica's header may hold more)."""


def refusal(
    status: int, body: Mapping[str, Any], retry_after: str | None = None
) -> GatewayError:
    """The gateway error for a replica's own error answer: OpenAI's error object
    in `body`, answered with `status` (502 for an error event in a stream).

    A 404 (vLLM knows no such model) and a 429 (vLLM's queue is full) keep
    their meaning, as REST relays them: `ModelNotFound`, and `RateLimited`
    after the replica's `retry_after` (its `Retry-After` header, in seconds).
    Any other 4xx is the caller's mistake, `InvalidRequest`.
    """
    error = body.get("error")
    detail = error if isinstance(error, dict) else {}
    message = str(detail.get("message") or f"The model refused with status {status}.")
    param = detail.get("param")
    if status == 504 or detail.get("code") == BackendTimeout.code:
        return BackendTimeout(message)
    if status >= 500:
        return BackendError(message)
    if status == 404:
        return ModelNotFound(message, param="model")
    if status == 429:
        return RateLimited(message, retry_after_s=_replica_wait(retry_after))
    return InvalidRequest(message, param=param if isinstance(param, str) else None)


def _replica_wait(retry_after: str | None) -> int:
    """A replica's `Retry-After` in seconds (an HTTP date is not read)."""
    seconds = retry_after_seconds(retry_after)
    return REPLICA_RETRY_AFTER_S if seconds is None else seconds


def retry_after_seconds(retry_after: str | None) -> int | None:
    """A replica's `Retry-After` in seconds, at most a day; None when it sent
    none, or not in seconds (an HTTP date is not read)."""
    seconds = (retry_after or "").strip()
    if not (seconds.isascii() and seconds.isdecimal()):
        return None
    # Leading zeros are allowed (RFC 9110 delta-seconds: 1*DIGIT); the length
    # check, which spares int() a huge number, is on what is left.
    seconds = seconds.lstrip("0") or "0"
    if len(seconds) > len(str(REPLICA_RETRY_AFTER_MAX_S)):
        return REPLICA_RETRY_AFTER_MAX_S
    return min(int(seconds), REPLICA_RETRY_AFTER_MAX_S)


def refusal_body(status: int, data: bytes) -> dict[str, Any]:
    """The body of a replica's refusal (a 4xx), as OpenAI's error object.

    OpenAI's own is kept as it is. A JSON object with its message at the top
    (vLLM before 0.10: `{"object": "error", "message", "type", "param",
    "code"}`; FastAPI's `{"detail": "Not Found"}`; a sidecar's `{"message"}`
    or `{"error": "..."}`) is put in its shape, with the message, and the
    `type`, `param` and `code` it gives that fit OpenAI's. Any other body (a
    proxy's HTML page, a server's plain text, JSON without a message) is the
    replica refusing all the same: not its failure (502). Its message quotes a
    short excerpt of the text, markup, controls and runs of white space taken
    out.
    """
    return _refusal_of(status, data)[0]


def _refusal_of(status: int, data: bytes) -> tuple[dict[str, Any], bool]:
    """`refusal_body`, and whether `data` was OpenAI's error object already."""
    with contextlib.suppress(orjson.JSONDecodeError):
        parsed = orjson.loads(data)
        if isinstance(parsed, dict):
            if isinstance(parsed.get("error"), dict):
                return parsed, True
            flat = _flat_error(parsed)
            if flat:
                return {"error": flat}, False
    excerpt = _excerpt(data)
    if not excerpt:
        return {}, False  # `refusal` says the status alone
    message = f"The model refused with status {status}: {excerpt}"
    return {"error": {"message": message}}, False


def refusal_json(status: int, data: bytes) -> bytes | None:
    """A replica's refusal (a 4xx) in OpenAI's shape (`refusal_body`) for
    REST's client, None when it is in it already (vLLM's own): the fields the
    replica gave kept, the others those of the gateway's error for its status
    (`refusal`), as the other doors report it. The body is parsed once."""
    body, shaped = _refusal_of(status, data)
    if shaped:
        return None
    given = body.get("error", {})
    return orjson.dumps({"error": {**refusal(status, body).body()["error"], **given}})


_MESSAGE_KEYS = ("message", "detail", "error")
"""Where a JSON refusal not in OpenAI's shape puts its message, in the order
they are looked for."""


def _flat_error(parsed: Mapping[str, Any]) -> dict[str, Any]:
    """OpenAI's error fields in a JSON refusal that holds them at its top
    level; empty when it has no message (a non-empty string) there."""
    message = next(
        (
            value
            for key in _MESSAGE_KEYS
            if isinstance(value := parsed.get(key), str) and value.strip()
        ),
        None,
    )
    if message is None:
        return {}
    error: dict[str, Any] = {"message": message}
    kind, param, code = (parsed.get(k) for k in ("type", "param", "code"))
    if isinstance(kind, str) and kind:
        error["type"] = kind
    if isinstance(param, str):
        error["param"] = param
    # vLLM's code is the HTTP status, as a number (as in its OpenAI-shaped
    # errors, relayed as they are); a bool is JSON's, not a code.
    if isinstance(code, str) or (isinstance(code, int) and not isinstance(code, bool)):
        error["code"] = code
    return error


_EXCERPT_CHARS = 200
_READ_BYTES = 4096
"""How much of a refusal's body is read for its excerpt: a page may be large."""
_MARKUP = re.compile(
    r"<(script|style)\b.*?(</\1\s*>|$)|<!--.*?(-->|$)|<[^>]*(>|$)",
    re.DOTALL | re.IGNORECASE,
)
"""Scripts, styles, comments and tags, also where the read cut one short."""


def _excerpt(data: bytes) -> str:
    """The start of `data` as one line of plain, printable text."""
    text = data[:_READ_BYTES].decode("utf-8", "replace")
    text = html.unescape(_MARKUP.sub(" ", text))
    words = "".join(c if c.isprintable() else " " for c in text).split()
    line = " ".join(words)
    if len(line) > _EXCERPT_CHARS:
        line = line[: _EXCERPT_CHARS - 1].rstrip() + "…"
    return line
