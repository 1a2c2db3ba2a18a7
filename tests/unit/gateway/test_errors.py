"""The error hierarchy and its one mapping to OpenAI's shape."""

from __future__ import annotations

import orjson
import pytest

from citadel.gateway import errors

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (errors.InvalidRequest("x", param="messages"), 400, None),
        (errors.AuthenticationFailed("x"), 401, "invalid_api_key"),
        (errors.PermissionDenied("x"), 403, "model_not_allowed"),
        (errors.ModelNotFound("x"), 404, "model_not_found"),
        (errors.BodyTooLarge("x"), 413, "request_too_large"),
        (errors.RateLimited("x", retry_after_s=0.2), 429, "rate_limit_exceeded"),
        (errors.QuotaExceeded("x", retry_after_s=90), 429, "insufficient_quota"),
        (errors.LimitStoreUnavailable("x"), 503, "limit_store_unavailable"),
        (errors.BackendError("x"), 502, "backend_error"),
        (errors.NoReplica("x", retry_after_s=5), 503, "model_not_ready"),
        (errors.BackendTimeout("x"), 504, "backend_timeout"),
        (errors.InternalError("x"), 500, "internal_error"),
    ],
)
def test_each_error_has_status_and_openai_shape(
    error: errors.GatewayError, status: int, code: str | None
) -> None:
    assert error.status == status
    body = orjson.loads(error.to_json())
    assert body == {
        "error": {
            "message": "x",
            "type": error.type,
            "param": error.param,
            "code": code,
        }
    }


def test_retry_after_is_whole_seconds_at_least_one() -> None:
    assert errors.RateLimited("x", retry_after_s=0.2).headers["retry-after"] == "1"
    assert errors.NoReplica("x", retry_after_s=4.1).headers["retry-after"] == "5"


@pytest.mark.parametrize(
    ("status", "retry_after", "kind", "wait"),
    [
        (400, None, errors.InvalidRequest, None),
        (404, None, errors.ModelNotFound, None),
        (429, "30", errors.RateLimited, 30),
        # Not in seconds (an HTTP date), or none: soon, as a full queue drains.
        (429, "Wed, 21 Oct 2015 07:28:00 GMT", errors.RateLimited, 1),
        (429, None, errors.RateLimited, 1),
        (429, "9" * 5000, errors.RateLimited, 86_400),
        # Leading zeros are allowed: 5 s, not the cap.
        (429, "000005", errors.RateLimited, 5),
        # 0 s: 1 s, as the header the client gets says (at least one).
        (429, "0000000", errors.RateLimited, 1),
        (422, "30", errors.InvalidRequest, None),
    ],
)
def test_a_replicas_refusal_keeps_the_meaning_of_its_status(
    status: int, retry_after: str | None, kind: type, wait: int | None
) -> None:
    body = {"error": {"message": "no", "param": "max_tokens"}}
    error = errors.refusal(status, body, retry_after)
    assert type(error) is kind
    assert error.message == "no"
    assert getattr(error, "retry_after_s", None) == wait


@pytest.mark.parametrize(
    ("said", "expected"),
    [
        # OpenAI's own: as it is.
        ({"error": {"message": "no", "code": 7}}, {"message": "no", "code": 7}),
        # vLLM before 0.10: its fields kept, in OpenAI's shape.
        (
            {
                "object": "error",
                "message": "no",
                "type": "BadRequestError",
                "param": "n",
                "code": 400,
            },
            {"message": "no", "type": "BadRequestError", "param": "n", "code": 400},
        ),
        # What does not fit OpenAI's fields is left out.
        (
            {"message": "no", "type": 3, "param": ["n"], "code": True},
            {"message": "no"},
        ),
        ({"detail": "Not Found"}, {"message": "Not Found"}),
        ({"message": " ", "detail": "why"}, {"message": "why"}),
        # No message at the top: the text quoted.
        (
            {"detail": []},
            {"message": 'The model refused with status 400: {"detail":[]}'},
        ),
    ],
)
def test_a_refusal_body_finds_its_message(
    said: dict[str, object], expected: dict[str, object]
) -> None:
    body = errors.refusal_body(400, orjson.dumps(said))
    assert body == {"error": expected}
