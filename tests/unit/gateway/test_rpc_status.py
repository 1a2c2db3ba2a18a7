"""Gateway errors map to gRPC statuses in one table, with rich details."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import code_pb2, error_details_pb2, status_pb2

from citadel.gateway import errors
from citadel.gateway.rpc.status import CODE_OF_HTTP, DETAILS_KEY, code_of, status_of

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (errors.InvalidRequest("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.AuthenticationFailed("x"), grpc.StatusCode.UNAUTHENTICATED),
        (errors.PermissionDenied("x"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.AdminOnly("x"), grpc.StatusCode.PERMISSION_DENIED),
        (errors.ModelNotFound("x"), grpc.StatusCode.NOT_FOUND),
        (errors.BodyTooLarge("x"), grpc.StatusCode.INVALID_ARGUMENT),
        (errors.RateLimited("x", retry_after_s=2), grpc.StatusCode.RESOURCE_EXHAUSTED),
        (
            errors.QuotaExceeded("x", retry_after_s=9),
            grpc.StatusCode.RESOURCE_EXHAUSTED,
        ),
        (errors.NoReplica("x", retry_after_s=1), grpc.StatusCode.UNAVAILABLE),
        (errors.NotReady("x", retry_after_s=1), grpc.StatusCode.UNAVAILABLE),
        (errors.BackendError("x"), grpc.StatusCode.UNAVAILABLE),
        (errors.BackendTimeout("x"), grpc.StatusCode.DEADLINE_EXCEEDED),
        (errors.InternalError("x"), grpc.StatusCode.INTERNAL),
    ],
)
def test_every_error_class_has_its_code(
    error: errors.GatewayError, code: grpc.StatusCode
) -> None:
    assert status_of(error).code is code


def test_unknown_statuses_fall_back_by_class() -> None:
    assert code_of(418) is grpc.StatusCode.INVALID_ARGUMENT
    assert code_of(599) is grpc.StatusCode.INTERNAL


def test_numbering_agrees_with_google_rpc_code() -> None:
    for code in CODE_OF_HTTP.values():
        assert code_pb2.Code.Name(code.value[0]) == code.name


def test_details_carry_error_info_retry_info_and_trailers() -> None:
    error = errors.RateLimited(
        "slow down",
        retry_after_s=2.5,
        headers={"x-ratelimit-limit-requests": "1", "other": "dropped"},
    )
    status = status_of(error, {"x-request-id": "r1"})
    trailers = dict(status.trailing_metadata)
    assert trailers["retry-after"] == "3"
    assert trailers["x-ratelimit-limit-requests"] == "1"
    assert trailers["x-request-id"] == "r1"
    assert "other" not in trailers
    detail = status_pb2.Status.FromString(trailers[DETAILS_KEY])  # type: ignore[arg-type]
    assert detail.code == code_pb2.RESOURCE_EXHAUSTED
    info, retry = error_details_pb2.ErrorInfo(), error_details_pb2.RetryInfo()
    assert detail.details[0].Unpack(info) and detail.details[1].Unpack(retry)
    assert info.reason == "rate_limit_exceeded"
    assert info.metadata["http_status"] == "429"
    # What the trailer says: whole seconds, rounded up.
    assert retry.retry_delay.ToNanoseconds() == 3_000_000_000


def test_retry_info_says_what_the_retry_after_trailer_says() -> None:
    """A replica's `Retry-After: 0` is 1 s in the trailer (at least one): a
    RetryInfo of 0 s beside it would have the client retry at once."""
    error = errors.refusal(429, {}, "0")
    trailers = dict(status_of(error).trailing_metadata)
    detail = status_pb2.Status.FromString(trailers[DETAILS_KEY])  # type: ignore[arg-type]
    retry = error_details_pb2.RetryInfo()
    assert detail.details[1].Unpack(retry)
    assert trailers["retry-after"] == "1"
    assert retry.retry_delay.ToNanoseconds() == 1_000_000_000
