"""The one place where gateway errors become gRPC statuses.

The same `GatewayError` classes REST maps to HTTP statuses map here to gRPC
codes, by their HTTP status, so a new error class needs no second table. Every
status carries, in the `grpc-status-details-bin` trailer, a `google.rpc.Status`
with a `google.rpc.ErrorInfo` (reason: the REST error `code`, metadata: its
`type` and `param`) and, for errors that say when to retry (limits, no ready
replica), a `google.rpc.RetryInfo`. The plain trailers repeat what REST sends as
headers (`retry-after`, `x-ratelimit-*`, `x-request-id`, a fallback's
`x-citadel-fallback`, a split's `x-citadel-split`) for clients that do not
decode details.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import grpc
from google.protobuf import duration_pb2
from google.rpc.error_details_pb2 import ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status

from citadel.gateway.errors import GatewayError
from citadel.gateway.services.proxy import FALLBACK_HEADER, SPLIT_HEADER

DOMAIN = "citadel.ai"
DETAILS_KEY = "grpc-status-details-bin"

CODE_OF_HTTP: Mapping[int, grpc.StatusCode] = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    403: grpc.StatusCode.PERMISSION_DENIED,
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,
    413: grpc.StatusCode.INVALID_ARGUMENT,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    499: grpc.StatusCode.CANCELLED,
    500: grpc.StatusCode.INTERNAL,
    502: grpc.StatusCode.UNAVAILABLE,
    503: grpc.StatusCode.UNAVAILABLE,
    504: grpc.StatusCode.DEADLINE_EXCEEDED,
}
"""HTTP status (as REST answers) -> gRPC code (google.rpc.Code's own mapping,
with 502, a replica that failed, as UNAVAILABLE)."""

# Metadata keys must be lowercase ASCII; binary ones end in -bin.
_PASSED_HEADERS = ("retry-after", "x-request-id", FALLBACK_HEADER, SPLIT_HEADER)
_PASSED_PREFIX = "x-ratelimit-"


def code_of(http_status: int) -> grpc.StatusCode:
    """The gRPC code for an HTTP status (unknown 4xx: INVALID_ARGUMENT)."""
    code = CODE_OF_HTTP.get(http_status)
    if code is not None:
        return code
    if 400 <= http_status < 500:
        return grpc.StatusCode.INVALID_ARGUMENT
    return grpc.StatusCode.INTERNAL


@dataclass(frozen=True)
class RpcStatus:
    """What a call ends with: code, message and trailing metadata."""

    code: grpc.StatusCode
    details: str
    trailing_metadata: tuple[tuple[str, str | bytes], ...]


def status_of(error: GatewayError, extra: Mapping[str, str] | None = None) -> RpcStatus:
    """The gRPC status for a gateway error.

    Args:
        error: what went wrong.
        extra: more trailers (the API version, the request id).
    """
    code = code_of(error.status)
    info = ErrorInfo(
        reason=error.code or error.type, domain=DOMAIN, metadata=_info(error)
    )
    detail = Status(code=_numeric(code), message=error.message)
    detail.details.add().Pack(info)
    retry_after_s = getattr(error, "retry_after_s", None)
    if isinstance(retry_after_s, int | float):
        delay = duration_pb2.Duration()
        delay.FromNanoseconds(int(max(0.0, retry_after_s) * 1e9))
        detail.details.add().Pack(RetryInfo(retry_delay=delay))
    trailers: list[tuple[str, str | bytes]] = [(k, v) for k, v in (extra or {}).items()]
    trailers += [
        (k, v)
        for k, v in error.headers.items()
        if k in _PASSED_HEADERS or k.startswith(_PASSED_PREFIX)
    ]
    trailers.append((DETAILS_KEY, detail.SerializeToString()))
    return RpcStatus(code, error.message, tuple(trailers))


def _info(error: GatewayError) -> dict[str, str]:
    info = {"type": error.type, "http_status": str(error.status)}
    if error.param:
        info["param"] = error.param
    return info


def _numeric(code: grpc.StatusCode) -> int:
    """The code's number (grpc's and google.rpc.Code's numbering agree)."""
    value: tuple[int, str] = code.value
    return value[0]
