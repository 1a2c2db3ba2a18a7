"""The REST door on in-memory parts: forwarding, streaming, errors, headers."""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any
from urllib.parse import urlsplit

import httpx
import orjson
import pytest
from openai import AsyncOpenAI, NotFoundError

from citadel.gateway.services.auth import KeyRecord, hash_key
from citadel.gateway.services.replicas import Endpoint, LoadReport
from citadel.gateway.services.requests import CHAT, MAX_MESSAGES
from citadel.gateway.upstream import (
    UpstreamDropped,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from citadel.gateway.versioning import VERSION_HEADER

pytestmark = pytest.mark.unit


async def test_alias_becomes_served_name_and_unknown_fields_pass(
    harness: Any, kit: Any
) -> None:
    async with harness.client() as client:
        body = {**kit.chat, "top_k": 7, "vendor": {"x": [1, 2]}}
        answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 200
    url, sent, headers = harness.upstream.calls[0]
    assert url.endswith("/v1/chat/completions")
    assert sent == {**body, "model": "smollm2"}
    assert headers["x-request-id"] == answer.headers["x-request-id"]


async def test_body_is_forwarded_byte_for_byte_when_nothing_changes(
    harness: Any,
) -> None:
    raw = b'{"model": "smollm2",   "messages": [{"role":"user","content":"x"}]}'
    seen: list[bytes] = []
    post = harness.upstream.post

    async def spy(url: str, body: bytes, headers: Any, timeout_s: Any = None) -> Any:
        seen.append(body)
        return await post(url, body, headers, timeout_s)

    harness.upstream.post = spy
    async with harness.client() as client:
        await client.post("/v1/chat/completions", content=raw)
    assert seen == [raw]


async def test_request_id_is_kept_or_made(harness: Any, kit: Any) -> None:
    async with harness.client() as client:
        given = await client.post(
            "/v1/chat/completions", json=kit.chat, headers={"x-request-id": "abc-1"}
        )
        made = await client.post("/v1/chat/completions", json=kit.chat)
        refused = await client.post(
            "/v1/chat/completions", json=kit.chat, headers={"authorization": "x"}
        )
    assert given.headers["x-request-id"] == "abc-1"
    assert len(made.headers["x-request-id"]) == 32
    assert refused.status_code == 401 and refused.headers["x-request-id"]


def _headers(answer: httpx.Response) -> dict[str, str]:
    """An answer's headers but its (random) request id."""
    return {k: v for k, v in answer.headers.items() if k != "x-request-id"}


def _sse(*payloads: Any) -> list[bytes]:
    return [b"data: " + orjson.dumps(p) + b"\n\n" for p in payloads] + [
        b"data: [DONE]\n\n"
    ]


CHUNK = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


@pytest.mark.parametrize("client_asked", [False, True])
async def test_stream_usage_chunk_reaches_only_clients_that_asked(
    harness: Any, kit: Any, client_asked: bool
) -> None:
    parts = _sse(CHUNK, CHUNK, USAGE)
    # Split one event across two network chunks: it must still arrive whole.
    split = [parts[0], parts[1][:10], parts[1][10:], parts[2], parts[3]]
    harness.upstream.handler = lambda url, body: kit.reply(
        parts=split, content_type="text/event-stream"
    )
    body: dict[str, Any] = {**kit.chat, "stream": True}
    if client_asked:
        body["stream_options"] = {"include_usage": True}
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=body)
    assert answer.headers["content-type"].startswith("text/event-stream")
    sent = harness.upstream.calls[0][1]
    assert sent["stream_options"] == {"include_usage": True}
    expected = parts if client_asked else [parts[0], parts[1], parts[3]]
    assert answer.content == b"".join(expected)
    tokens = harness.deps.metrics.tokens.labels("smollm2", "alice", "completion")
    assert tokens._value.get() == 2


async def test_broken_stream_ends_with_an_error_event(harness: Any, kit: Any) -> None:
    from citadel.gateway.upstream import UpstreamBroken

    parts: list[Any] = [*_sse(CHUNK)[:1], UpstreamBroken("reset")]
    harness.upstream.handler = lambda url, body: kit.reply(parts=parts)
    async with harness.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json={**kit.chat, "stream": True}
        )
    events = answer.content.split(b"\n\n")
    assert events[0].startswith(b"data: {")
    assert orjson.loads(events[1][6:])["error"]["code"] == "backend_error"
    assert _stream_errors(harness, "stream_broken") == 1


def _stream_errors(harness: Any, code: str) -> float | None:
    """`citadel_gateway_stream_errors_total` of the chat fixture's model."""
    labels = {"api": "chat", "model": "smollm2", "code": code}
    sample = harness.deps.metrics.registry.get_sample_value
    value: float | None = sample("citadel_gateway_stream_errors_total", labels)
    return value


def _access(caplog: pytest.LogCaptureFixture) -> list[tuple[Any, Any]]:
    """The status and code of each access-log line."""
    return [
        (getattr(r, "status", None), getattr(r, "code", None))
        for r in caplog.records
        if r.name == "citadel.gateway.access" and r.getMessage() == "request"
    ]


# What vLLM writes into a stream when generation fails after it began.
VLLM_ERROR = {
    "error": {"message": "engine died", "type": "InternalServerError", "code": 500}
}


async def test_a_replicas_error_event_is_logged_with_a_code(
    harness: Any, kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """The client got a 200 before vLLM's own error event, relayed as is; the
    access log says it failed, with the code the gRPC and GraphQL doors count
    the same event as, so the log does not show it as a plain success."""
    caplog.set_level("INFO", logger="citadel.gateway.access")
    parts = _sse(CHUNK, VLLM_ERROR)
    harness.upstream.handler = lambda url, body: kit.reply(
        parts=parts, content_type="text/event-stream"
    )
    async with harness.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json={**kit.chat, "stream": True}
        )
    assert answer.status_code == 200
    assert answer.content == b"".join(parts)
    assert kit.counted(harness, "200") == 1
    assert _access(caplog) == [(200, "backend_error")]
    # Counted apart, so the error ratio sees what the 200 hides.
    assert _stream_errors(harness, "backend_error") == 1


async def test_a_token_named_error_is_no_error_event(
    harness: Any, kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="citadel.gateway.access")
    token = {"token": "error", "logprob": -0.1, "top_logprobs": []}
    choice = {"index": 0, "delta": {"content": "error"}}
    chunk = {"choices": [{**choice, "logprobs": {"content": [token]}}]}
    harness.upstream.handler = lambda url, body: kit.reply(
        parts=_sse(chunk), content_type="text/event-stream"
    )
    async with harness.client() as client:
        await client.post("/v1/chat/completions", json={**kit.chat, "stream": True})
    assert _access(caplog) == [(200, None)]
    assert _stream_errors(harness, "backend_error") is None


async def _tokens_left_after(kit: Any, first: Any, reply: Any) -> int:
    """Tokens left of a model's 10,000 a minute after `first`, answered with
    `reply`, and a plain chat after it."""
    answers = iter([reply])
    h = kit.build(doc=kit.document(limits={"tpm": 10_000}))
    h.upstream.handler = lambda url, b: next(answers, None) or kit.completion()
    async with h.client() as client:
        await client.post("/v1/chat/completions", json=first)
        after = await client.post("/v1/chat/completions", json=kit.chat)
    return int(after.headers["x-ratelimit-remaining-tokens"])


@pytest.mark.parametrize(
    "reply", ["a stream that breaks", "a stream without usage", "no usage", "a 502"]
)
async def test_an_answer_without_usage_keeps_its_estimate(kit: Any, reply: str) -> None:
    from citadel.gateway.services.limits import estimate_tokens
    from citadel.gateway.upstream import UpstreamBroken

    first = {**kit.chat, "max_tokens": 1_000, "stream": reply.startswith("a stream")}
    replies = {
        "a stream that breaks": kit.reply(
            parts=[*_sse(CHUNK)[:1], UpstreamBroken("x")]
        ),
        "a stream without usage": kit.reply(parts=_sse(CHUNK)[:1]),
        "no usage": kit.reply(body=b'{"choices": []}'),
        "a 502": kit.reply(status=502, body=b"{}"),
    }
    remaining = await _tokens_left_after(kit, first, replies[reply])
    second = estimate_tokens(dict(kit.chat), CHAT, 256)
    kept = 0 if reply == "a 502" else estimate_tokens(first, CHAT, 256)
    # No replica answered the 502 (it counts as a failure): nothing was used.
    assert remaining == 10_000 - kept - second


async def test_connection_failure_is_retried_on_another_replica(
    harness: Any, kit: Any
) -> None:
    def handler(url: str, body: Any) -> Any:
        if url.startswith("http://r1"):
            return UpstreamUnreachable("refused")
        return kit.completion()

    harness.upstream.handler = handler
    async with harness.client() as client:
        for _ in range(4):
            answer = await client.post("/v1/chat/completions", json=kit.chat)
            assert answer.status_code == 200
    urls = [call[0] for call in harness.upstream.calls]
    assert any(u.startswith("http://r1") for u in urls)
    assert sum(u.startswith("http://r2") for u in urls) == 4


async def test_a_retry_goes_to_a_terminating_replica_when_no_ready_one_is_left(
    harness: Any, kit: Any
) -> None:
    # A rolling update: the new pod is ready but cannot be reached yet, the old
    # one is terminating and still serving.
    harness.deps.catalog.set_endpoints(
        "llm",
        "smol",
        [Endpoint("http://r1"), Endpoint("http://r2", ready=False, terminating=True)],
    )

    def handler(url: str, body: Any) -> Any:
        if url.startswith("http://r1"):
            return UpstreamUnreachable("refused")
        return kit.completion()

    harness.upstream.handler = handler
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 200
    urls = [urlsplit(call[0]).netloc for call in harness.upstream.calls]
    assert urls == ["r1", "r2"]


async def test_failing_replica_is_ejected_then_readmitted(
    harness: Any, kit: Any
) -> None:
    def handler(url: str, body: Any) -> Any:
        return UpstreamUnreachable("down") if "r1" in url else kit.completion()

    harness.upstream.handler = handler
    async with harness.client() as client:
        for _ in range(8):
            await client.post("/v1/chat/completions", json=kit.chat)
        r1_calls = sum("r1" in c[0] for c in harness.upstream.calls)
        assert r1_calls == 3  # eject_after=3; then no more tries
        harness.clock.now += 10  # past the 5 s back-off
        harness.upstream.handler = lambda url, body: kit.completion()
        for _ in range(4):
            await client.post("/v1/chat/completions", json=kit.chat)
    assert sum("r1" in c[0] for c in harness.upstream.calls) > r1_calls


@pytest.mark.parametrize(
    ("failure", "status", "code"),
    [
        (
            UpstreamUnreachable("cannot connect to 10.0.0.7:8000: refused"),
            503,
            "model_not_ready",
        ),
        (
            UpstreamTimeout("no answer from 10.0.0.7:8000 in 30 s"),
            504,
            "backend_timeout",
        ),
    ],
)
async def test_backend_failures_map_to_5xx(
    harness: Any, kit: Any, failure: Exception, status: int, code: str
) -> None:
    harness.upstream.handler = lambda url, body: failure
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == status
    assert answer.json()["error"]["code"] == code
    # The pods' addresses are for the logs, not for clients.
    assert "10.0.0.7" not in answer.text


async def test_a_stream_without_usage_is_charged_a_token_an_event(
    kit: Any,
) -> None:
    """A client that reads a long stream and leaves before its usage chunk paid
    only the estimate (10 tokens here) for all it read."""
    from citadel.gateway.services.limits import estimate_tokens

    long = {**kit.chat, "max_tokens": 10, "stream": True}
    remaining = await _tokens_left_after(
        kit, long, kit.reply(parts=_sse(*[CHUNK] * 600))
    )
    second = estimate_tokens(dict(kit.chat), CHAT, 256)
    assert remaining == 10_000 - 601 - second  # 600 events and [DONE]


@pytest.mark.parametrize("failure", ["timeout", "a 500"])
async def test_a_request_a_replica_worked_on_keeps_its_request(
    kit: Any, failure: str
) -> None:
    """Only a request that reached no replica is given back: a slow or failing
    model must not take any number of requests past the rpm."""
    h = kit.build(doc=kit.document(limits={"rpm": 2}))
    h.upstream.handler = lambda url, body: (
        UpstreamTimeout("slow") if failure == "timeout" else kit.reply(status=500)
    )
    async with h.client() as client:
        statuses = [
            (await client.post("/v1/chat/completions", json=kit.chat)).status_code
            for _ in range(3)
        ]
    assert statuses[2] == 429


async def test_a_dropped_request_is_tried_elsewhere_but_stays_charged(
    kit: Any,
) -> None:
    """A replica that closed the connection without answering, after the
    request was written, may have worked on it (a request that crashes vLLM
    each time): the next replica is tried, but the request and its estimate
    stay charged, so the client's limits bound how often it can repeat it."""
    from citadel.gateway.services.limits import estimate_tokens

    h = kit.build(doc=kit.document(limits={"rpm": 2, "tpm": 10_000}))
    h.upstream.handler = lambda url, body: UpstreamDropped("closed at 10.0.0.7")
    async with h.client() as client:
        answers = [
            await client.post("/v1/chat/completions", json=kit.chat) for _ in range(3)
        ]
    assert [a.status_code for a in answers] == [502, 502, 429]
    assert len(h.upstream.calls) == 4  # both replicas, twice; none after the 429
    first = answers[0]
    assert "closed the connection without answering" in first.json()["error"]["message"]
    assert "no connection could be made" not in first.text
    assert "10.0.0.7" not in first.text
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    left = 10_000 - estimate_tokens(dict(kit.chat), CHAT, 256)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(left)


@pytest.mark.parametrize(
    ("when", "kept"),
    [("waiting for the headers", True), ("mid-body", True), ("connecting", False)],
)
async def test_a_request_that_timed_out_at_its_replica_stays_charged(
    kit: Any, when: str, kept: bool
) -> None:
    """A request that times out after it was written (a huge prompt, a huge
    max_tokens) may have kept its replica busy all along: its estimate stays
    charged, or a client whose requests always time out would never meet its
    tokens per minute or its quotas. One whose connection timed out never got
    to the replica: its estimate is given back."""
    from citadel.gateway.services.limits import estimate_tokens

    h = kit.build(doc=kit.document(limits={"tpm": 10_000}), retries=0)

    def handler(url: str, body: Any) -> Any:
        if when == "connecting":
            return UpstreamUnreachable("connect timeout to 10.0.0.7:8000")
        if when == "mid-body":
            return kit.reply(body=UpstreamTimeout("no answer in 600 s"))
        return UpstreamTimeout("no answer from 10.0.0.7:8000 in 600 s")

    h.upstream.handler = handler
    async with h.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == (504 if kept else 503)
    estimate = estimate_tokens(dict(kit.chat), CHAT, 256)
    left = 10_000 - estimate if kept else 10_000
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(left)


async def test_a_dropped_request_is_answered_by_the_next_replica(
    harness: Any, kit: Any
) -> None:
    """A replica killed with the request in flight loses no request."""
    harness.upstream.handler = lambda url, body: (
        UpstreamDropped("killed") if "r1" in url else kit.completion()
    )
    async with harness.client() as client:
        answers = [
            await client.post("/v1/chat/completions", json=kit.chat) for _ in range(2)
        ]
    assert [a.status_code for a in answers] == [200, 200]
    assert any("r1" in call[0] for call in harness.upstream.calls)


async def test_an_error_after_admission_says_where_the_limits_stand(
    kit: Any,
) -> None:
    h = kit.build(doc=kit.document(limits={"rpm": 5, "tpm": 10_000}))
    h.upstream.handler = lambda url, body: UpstreamUnreachable("refused")
    async with h.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
        assert answer.status_code == 503
        # No replica answered: the request was given back, tokens and all, and
        # the answer's headers say so.
        assert answer.headers["x-ratelimit-remaining-requests"] == "5"
        assert answer.headers["x-ratelimit-remaining-tokens"] == "10000"
        h.upstream.handler = lambda url, body: kit.completion()
        after = await client.post("/v1/chat/completions", json=kit.chat)
    assert after.headers["x-ratelimit-remaining-requests"] == "4"


async def test_backend_4xx_passes_through_and_5xx_becomes_502(
    harness: Any, kit: Any
) -> None:
    error = {"error": {"message": "too long", "type": "BadRequestError"}}
    harness.upstream.handler = lambda url, body: kit.reply(
        status=400, body=orjson.dumps(error)
    )
    async with harness.client() as client:
        bad = await client.post("/v1/chat/completions", json=kit.chat)
        harness.upstream.handler = lambda url, body: kit.reply(status=500)
        failed = await client.post("/v1/chat/completions", json=kit.chat)
    assert bad.status_code == 400 and bad.json() == error
    assert failed.status_code == 502


async def test_a_replicas_4xx_carries_the_limits_once_settled(kit: Any) -> None:
    """vLLM's 400 used nothing: its estimate was given back, and its headers
    say so, as those of an error the gateway raises after admission do."""
    h = kit.build(doc=kit.document(limits={"tpm": 10_000}))
    error = {"error": {"message": "too long", "type": "BadRequestError"}}
    h.upstream.handler = lambda url, body: kit.reply(
        status=400, body=orjson.dumps(error)
    )
    async with h.client() as client:
        bad = await client.post(
            "/v1/chat/completions", json={**kit.chat, "max_tokens": 5_000}
        )
    assert bad.status_code == 400
    assert bad.headers["x-ratelimit-remaining-tokens"] == "10000"


def _quota_key(kit: Any, **limits: int) -> Any:
    """A harness whose key `alice` has `limits`, its replies 1,000 tokens."""
    from citadel.gateway.services.auth import KeyRecord, hash_key

    record = KeyRecord(name="alice", hash=hash_key(kit.key), **limits)
    h = kit.build(records=(record,))
    h.upstream.handler = lambda url, body: kit.completion(usage=(900, 100))
    return h


async def test_a_quota_429_carries_the_quotas_headers(kit: Any) -> None:
    h = _quota_key(kit, tpm=100_000, daily_tokens=1_000)
    async with h.client() as client:
        ok = await client.post("/v1/chat/completions", json=kit.chat)
        refused = await client.post("/v1/chat/completions", json=kit.chat)
    # The day's quota was the tighter budget: 1,000 less the first estimate.
    assert ok.headers["x-ratelimit-limit-tokens"] == "1000"
    assert ok.headers["x-ratelimit-remaining-tokens"] == "741"
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert refused.headers["x-ratelimit-limit-tokens"] == "1000"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    # 08:00 UTC: the day ends in 16 hours.
    assert refused.headers["x-ratelimit-reset-tokens"] == "16h0m0s"
    assert refused.headers["retry-after"] == str(16 * 3600)


@pytest.mark.parametrize(
    ("path", "body", "tokens"),
    [
        # The chat's prompt (11 characters) and its reply: `input` names no
        # embedding here.
        ("/v1/chat/completions", {"input": "x" * 400}, 3 + 256),
        # The completion's prompt, not the chat's messages it carries.
        ("/v1/completions", {"prompt": "x" * 4000}, 1000 + 256),
        # The embedding's input, not a stray prompt or messages; no reply.
        ("/v1/embeddings", {"input": "x" * 4000, "prompt": "x"}, 1000),
    ],
)
async def test_an_estimate_follows_the_endpoint_called_not_the_body(
    kit: Any, path: str, body: dict[str, Any], tokens: int
) -> None:
    """Told from the body, a chat carrying an unrelated `input` was estimated
    as an embedding, without its reply, and a completion carrying `messages`
    as that chat."""
    h = kit.build(doc=kit.document(limits={"tpm": 100_000}))
    async with h.client() as client:
        answer = await client.post(path, json={**kit.chat, **body})
    assert answer.status_code == 200
    assert answer.headers["x-ratelimit-remaining-tokens"] == str(100_000 - tokens)


async def test_a_quota_refuses_a_batch_larger_than_what_is_left(kit: Any) -> None:
    """Estimated as its first prompt with one reply, a batch of prompts went
    through a quota with a fraction of its size left."""
    h = _quota_key(kit, daily_tokens=1_700)
    batch = {"model": "chat", "prompt": ["x" * 400] * 8, "max_tokens": 10}
    half = {**batch, "prompt": batch["prompt"][:4]}
    async with h.client() as client:
        await client.post("/v1/chat/completions", json=kit.chat)  # 700 left
        refused = await client.post("/v1/completions", json=batch)  # 880
        admitted = await client.post("/v1/completions", json=half)  # 440
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "insufficient_quota"
    assert admitted.status_code == 200


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"{nope", 400, None, None),
        (b"[1]", 400, None, None),
        (b'{"messages": []}', 400, None, "model"),
        (b'{"model": "chat", "messages": "hi"}', 400, None, "messages"),
        (b'{"model": "chat", "messages": [{}], "max_tokens": 0}', 400, None, None),
        (b'{"model": "nope", "messages": [{}]}', 404, "model_not_found", "model"),
        (b'{"model": "other", "messages": [{}]}', 403, "model_not_allowed", "model"),
        (b"x" * 5000, 413, "request_too_large", None),
    ],
)
async def test_client_errors_in_openai_shape(
    kit: Any, body: bytes, status: int, code: str | None, param: str | None
) -> None:
    h = kit.build(doc=kit.document("other"))
    async with h.client() as client:
        answer = await client.post("/v1/chat/completions", content=body)
    assert answer.status_code == status
    error = answer.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code or (code is None and status == 400)
    if param:
        assert error["param"] == param


@pytest.mark.parametrize(
    ("model", "stream", "field"),
    [
        ("chat", False, "deep"),
        ("smollm2", True, "deep"),
        ("smollm2", False, "deep"),
        # The estimate writes a chat's tools to measure them: never deeper.
        ("smollm2", False, "tools"),
    ],
    ids=["alias", "stream", "unchanged", "tools"],
)
async def test_a_body_nested_too_deeply_is_a_400_whatever_is_done_with_it(
    kit: Any, caplog: pytest.LogCaptureFixture, model: str, stream: bool, field: str
) -> None:
    """orjson reads 1,024 levels but writes 254: a body between the two is
    refused as it is read, not failed with a 500 when the gateway writes it
    again (an alias, a stream's usage option, the estimate's tools), nor sent
    on when it does not."""
    h = kit.build()
    deep = b"[" * 300 + b"]" * 300
    raw = orjson.dumps({**kit.chat, "model": model, "stream": stream})
    raw = raw[:-1] + f', "{field}": '.encode() + deep + b"}"
    async with h.client() as client:
        answer = await client.post(
            "/v1/chat/completions",
            content=raw,
            headers={"content-type": "application/json"},
        )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert "nested too deeply" in error["message"]
    assert h.upstream.calls == []
    assert kit.counted(h, "400", model="unknown") == 1
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


async def test_auth_errors(harness: Any, kit: Any) -> None:
    async with harness.client() as client:
        missing = await client.post(
            "/v1/chat/completions", json=kit.chat, headers={"authorization": ""}
        )
        wrong = await client.post(
            "/v1/chat/completions",
            json=kit.chat,
            headers={"authorization": "Bearer ctd-wrong"},
        )
    assert missing.status_code == wrong.status_code == 401
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    assert "ctd-wrong" not in wrong.text


async def test_refusals_before_the_proxy_are_counted(kit: Any) -> None:
    h = kit.build()  # bodies up to 4,096 bytes
    async with h.client() as client:
        wrong = await client.post(
            "/v1/chat/completions",
            json=kit.chat,
            headers={"authorization": "Bearer ctd-wrong"},
        )
        big = await client.post(
            "/v1/completions",
            content=b'{"model": "chat", "prompt": "' + b"x" * 5_000 + b'"}',
            headers={"content-type": "application/json"},
        )
    assert (wrong.status_code, big.status_code) == (401, 413)
    sample = h.deps.metrics.registry.get_sample_value
    common = {"model": "unknown", "door": "rest"}
    counted = "citadel_gateway_requests_total"
    assert (
        sample(counted, {**common, "api": "chat", "status": "401", "key": "anonymous"})
        == 1
    )
    assert (
        sample(
            counted,
            {**common, "api": "completions", "status": "413", "key": "alice"},
        )
        == 1
    )


async def test_revoked_key_stops_working_at_once(harness: Any, kit: Any) -> None:
    async with harness.client() as client:
        assert (await client.post("/v1/chat/completions", json=kit.chat)).is_success
        harness.keys.remove("alice")
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 401


async def test_rate_limit_429_with_retry_after_and_headers(kit: Any) -> None:
    h = kit.build(doc=kit.document(limits={"rpm": 2}))
    async with h.client() as client:
        ok = [await client.post("/v1/chat/completions", json=kit.chat) for _ in "ab"]
        refused = await client.post("/v1/chat/completions", json=kit.chat)
        h.clock.now += 30  # one request's worth of refill
        again = await client.post("/v1/chat/completions", json=kit.chat)
    assert [a.status_code for a in ok] == [200, 200]
    assert ok[0].headers["x-ratelimit-limit-requests"] == "2"
    assert ok[0].headers["x-ratelimit-remaining-requests"] == "1"
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert refused.headers["retry-after"] == "30"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert again.status_code == 200
    assert len(h.upstream.calls) == 3


async def test_no_replica_is_503_with_retry_after(kit: Any) -> None:
    h = kit.build(replicas=())
    async with h.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "5"


async def test_models_lists_only_allowed_ones(kit: Any) -> None:
    h = kit.build(doc=kit.document("big"))
    async with h.client() as client:
        user = await client.get("/v1/models")
        admin = await client.get(
            "/v1/models", headers={"authorization": f"Bearer {kit.admin_key}"}
        )
    assert [m["id"] for m in user.json()["data"]] == ["smollm2", "chat"]
    assert {m["id"] for m in admin.json()["data"]} == {"smollm2", "chat", "big"}


async def test_a_model_is_retrieved_as_the_list_shows_it(kit: Any) -> None:
    h = kit.build(doc=kit.document("big"))
    admin = {"authorization": f"Bearer {kit.admin_key}"}
    async with h.client() as client:
        for headers in ({}, admin):
            listed = (await client.get("/v1/models", headers=headers)).json()["data"]
            for entry in listed:
                one = await client.get(f"/v1/models/{entry['id']}", headers=headers)
                assert (one.status_code, one.json()) == (200, entry)
        hidden = await client.get("/v1/models/big")  # alice may not use it
        unknown = await client.get("/v1/models/nope", headers={"x-request-id": "r-1"})
        chat = await client.post(
            "/v1/chat/completions", json={**kit.chat, "model": "nope"}
        )
        anonymous = await client.get("/v1/models/chat", headers={"authorization": ""})
    # The same refusal as a chat with a model that does not exist.
    assert (unknown.status_code, unknown.json()) == (404, chat.json())
    assert unknown.json()["error"]["code"] == "model_not_found"
    assert unknown.headers["x-request-id"] == "r-1"
    assert hidden.status_code == 404
    assert hidden.json()["error"] == {
        **chat.json()["error"],
        "message": "The model `big` does not exist.",
    }
    assert anonymous.status_code == 401


async def test_models_named_with_slashes_are_retrieved(kit: Any) -> None:
    name = "meta-llama/Llama-3-8B"
    records = (KeyRecord(name="alice", hash=hash_key(kit.key), models=("meta-*",)),)
    h = kit.build(doc=kit.document(servedName=name), records=records)
    http = httpx.AsyncClient(transport=httpx.ASGITransport(app=h.served))
    openai = AsyncOpenAI(
        base_url="http://gateway/v1", api_key=kit.key, http_client=http
    )
    async with openai:
        # The client sends the slash as %2F.
        model = await openai.models.retrieve(name)
        alias = await openai.models.retrieve("chat")
        with pytest.raises(NotFoundError) as refused:
            await openai.models.retrieve("meta-llama/nope")
    assert (model.id, model.object, alias.id) == (name, "model", "chat")
    assert refused.value.code == "model_not_found"
    async with h.client() as client:
        plain = await client.get(f"/v1/models/{name}")  # a bare slash
    assert plain.json()["id"] == name


async def test_retrieving_a_model_before_the_routes_load_is_a_503(kit: Any) -> None:
    async with kit.build(loaded=False).client() as client:
        answer = await client.get("/v1/models/chat")
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "gateway_not_ready"


async def test_health_readiness_and_metrics(kit: Any) -> None:
    empty = kit.build(loaded=False)
    async with empty.client() as client:
        assert (await client.get("/healthz")).status_code == 200
        assert (await client.get("/readyz")).status_code == 503
        answer = await client.post("/v1/chat/completions", json=kit.chat)
        assert answer.status_code == 503
    h = kit.build()
    async with h.client() as client:
        assert (await client.get("/readyz")).status_code == 200
        await client.post("/v1/chat/completions", json=kit.chat)
        text = (await client.get("/metrics")).text
    assert 'citadel_gateway_requests_total{api="chat",door="rest",key="alice"' in text
    assert kit.key not in text


async def test_auth_disabled_needs_no_key(kit: Any) -> None:
    h = kit.build(auth=False)
    async with h.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json=kit.chat, headers={"authorization": ""}
        )
    assert answer.status_code == 200


async def test_embeddings_and_completions_forward_to_their_paths(
    harness: Any,
) -> None:
    async with harness.client() as client:
        await client.post("/v1/embeddings", json={"model": "chat", "input": "x"})
        await client.post("/v1/completions", json={"model": "chat", "prompt": "x"})
    paths = [urlsplit(call[0]).path for call in harness.upstream.calls]
    assert paths == ["/v1/embeddings", "/v1/completions"]


async def test_admin_replicas_shows_state_to_admins_only(
    harness: Any, kit: Any
) -> None:
    harness.upstream.handler = lambda url, body: UpstreamUnreachable("down")
    async with harness.client() as client:
        for _ in range(3):
            await client.post("/v1/chat/completions", json=kit.chat)
        user = await client.get("/admin/replicas")
        admin = await client.get(
            "/admin/replicas", headers={"authorization": f"Bearer {kit.admin_key}"}
        )
    assert user.status_code == 403 and user.json()["error"]["code"] == "admin_only"
    [model] = admin.json()["models"]
    assert model["servedName"] == "smollm2" and model["strategy"] == "round-robin"
    assert {r["url"] for r in model["replicas"]} == {"http://r1", "http://r2"}
    assert any(r["ejected"] for r in model["replicas"])
    # Its strategy is not kv-aware: /metrics is never read, the load unknown.
    assert all(r["loadAgeS"] is None and r["loadStale"] for r in model["replicas"])


async def test_admin_replicas_tells_an_unknown_load_from_an_idle_one(
    harness: Any, kit: Any
) -> None:
    # A failed read of /metrics drops the figures: the zeros it left showed as
    # an idle replica's would, with nothing to say since when. Now null.
    harness.deps.load_max_age_s = 10.0
    now = harness.clock.now
    idle, unknown = harness.deps.catalog.replicas(harness.deps.catalog.resolve("chat"))
    idle.load = LoadReport(running=0, scraped_at=now - 2)
    idle.load_read_at = now - 2
    unknown.load_read_at = now - 30  # read then, and every read since failed
    admin = {"authorization": f"Bearer {kit.admin_key}"}
    async with harness.client() as client:
        first = (await client.get("/admin/replicas", headers=admin)).json()
        harness.clock.now += 9
        later = (await client.get("/admin/replicas", headers=admin)).json()

    def load(answer: Any) -> list[tuple[str, float | None, float | None, bool]]:
        [model] = answer["models"]
        return [
            (r["url"], r["running"], r["loadAgeS"], r["loadStale"])
            for r in model["replicas"]
        ]

    assert load(first) == [
        ("http://r1", 0, 2.0, False),
        ("http://r2", None, 30.0, True),
    ]
    # Older than a report may be and count (kv-aware's bound): stale too.
    assert load(later)[0] == ("http://r1", 0, 11.0, True)


async def test_cost_is_observed_when_the_model_is_priced(kit: Any) -> None:
    pricing = {"promptPerMillion": 1.0, "completionPerMillion": 2.0}
    h = kit.build(doc=kit.document(pricing=pricing))
    async with h.client() as client:
        await client.post("/v1/chat/completions", json=kit.chat)
    cost = h.deps.metrics.cost.labels("smollm2", "alice")
    # usage (10, 5): 10 x 1.0 + 5 x 2.0 per million tokens
    assert cost._sum.get() == pytest.approx(20 / 1_000_000)


async def test_unexpected_failure_is_a_500_in_openai_shape(
    harness: Any, kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # The forwarding endpoints skip FastAPI's exception handlers (a fast path):
    # a bug in the request path must still answer like everything else.
    def broken(url: str, body: bytes) -> Any:
        raise RuntimeError("a bug")

    harness.upstream.handler = broken
    async with harness.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json=kit.chat, headers={"x-request-id": "r-9"}
        )
        listed = await client.get("/v1/models")
    assert answer.status_code == 500
    assert answer.json()["error"]["type"] == "server_error"
    assert answer.headers["x-request-id"] == "r-9"
    assert "a bug" not in answer.text
    assert any(r.exc_info and "a bug" in str(r.exc_info[1]) for r in caplog.records)
    # The replica it was sent to is free again, and the request is counted.
    catalog = harness.deps.catalog
    replicas = [r for route in catalog.routes() for r in catalog.replicas(route)]
    assert replicas and all(r.in_flight == 0 for r in replicas)
    labels = {"api": "chat", "model": "smollm2", "status": "500"}
    labels.update(key="alice", door="rest")
    sample = harness.deps.metrics.registry.get_sample_value
    assert sample("citadel_gateway_requests_total", labels) == 1
    # Both doors add the same version header.
    version = [h for h in listed.headers if "version" in h]
    assert version and all(answer.headers.get(h) for h in version)


async def test_a_405_names_the_allowed_methods(harness: Any) -> None:
    async with harness.client() as client:
        answer = await client.get("/v1/chat/completions")
    assert answer.status_code == 405
    assert answer.headers["allow"] == "POST"
    assert answer.json()["error"]["type"] == "invalid_request_error"


async def test_the_routes_answer_as_the_fast_path_does(harness: Any, kit: Any) -> None:
    """Without ForwardingFastPath the FastAPI routes serve the same bytes and
    headers."""
    parts = _sse(CHUNK, USAGE)
    harness.upstream.handler = lambda url, body: (
        kit.reply(parts=parts, content_type="text/event-stream")
        if body.get("stream")
        else kit.completion()
    )
    stream = {**kit.chat, "stream": True, "stream_options": {"include_usage": True}}

    async def answers(app: Any) -> list[tuple[int, dict[str, str], bytes]]:
        async with kit.asgi_client(app) as client:
            got = [
                await client.post("/v1/chat/completions", json=body)
                for body in (kit.chat, stream, {"model": "chat"})
            ]
        return [(a.status_code, _headers(a), a.content) for a in got]

    fast = await answers(harness.served)
    assert await answers(harness.app) == fast
    assert all(VERSION_HEADER in headers for _, headers, _ in fast)
    assert [status for status, _, _ in fast] == [200, 200, 400]
    assert fast[1][2] == b"".join(parts)


async def test_the_access_log_names_the_session_and_replica(
    harness: Any, kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="citadel.gateway.access")
    async with harness.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json=kit.chat, headers={"x-session-id": "conv-7"}
        )
        await client.post("/v1/chat/completions", json=kit.chat)
    assert answer.status_code == 200
    logged = [r for r in caplog.records if r.name == "citadel.gateway.access"]
    assert [getattr(r, "session", "absent") for r in logged] == ["conv-7", None]
    assert all(getattr(r, "replica", "").startswith("http://r") for r in logged)


async def test_a_session_id_that_is_no_id_is_routed_and_logged_as_its_hash(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A 4 MB header was a 4 MB log line, and `x key=root status=200` forged
    fields of a text one; refusing it would break clients over a hint."""
    harness = kit.build(kit.document(strategy="session-affinity"))
    caplog.set_level("INFO", logger="citadel.gateway.access")
    sent = "x key=root status=200"
    hashed = "sha256:" + hashlib.sha256(sent.encode()).hexdigest()
    async with harness.client() as client:
        for _ in range(4):
            answer = await client.post(
                "/v1/chat/completions", json=kit.chat, headers={"x-session-id": sent}
            )
            assert answer.status_code == 200
    logged = [r for r in caplog.records if r.name == "citadel.gateway.access"]
    assert [getattr(r, "session", None) for r in logged] == [hashed] * 4
    # Pinned all the same: every request went to one replica.
    assert len({url for url, _, _ in harness.upstream.calls}) == 1


async def test_an_array_past_its_limit_is_a_400_that_reaches_no_replica(
    harness: Any,
) -> None:
    harness.deps.max_body_bytes = 1 << 20
    body = {"model": "chat", "messages": [{}] * (MAX_MESSAGES + 1)}
    async with harness.client() as client:
        answer = await client.post("/v1/chat/completions", json=body)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == "messages"
    assert (
        error["message"] == "`messages` has 10,001 items; at most 10,000 are allowed."
    )
    assert harness.upstream.calls == []


async def test_the_access_log_names_the_api_as_the_metrics_do(
    harness: Any, kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # `api`, the metrics' label, so that logs and metrics join on one name.
    caplog.set_level("INFO", logger="citadel.gateway.access")
    async with harness.client() as client:
        await client.post("/v1/chat/completions", json=kit.chat)
    [line] = [r for r in caplog.records if r.name == "citadel.gateway.access"]
    assert getattr(line, "api", None) == "chat"
    assert not hasattr(line, "endpoint")


def _in_flight(harness: Any) -> int:
    catalog = harness.deps.catalog
    return sum(
        r.in_flight for route in catalog.routes() for r in catalog.replicas(route)
    )


async def _handle(harness: Any, kit: Any, **body: Any) -> Any:
    principal = harness.deps.authenticator.authenticate(f"Bearer {kit.key}")
    raw = orjson.dumps({**kit.chat, **body})
    return await harness.deps.proxy.handle(CHAT, principal, raw, "r-1")


async def _stream(harness: Any, kit: Any) -> Any:
    return await _handle(harness, kit, stream=True)


def _slow_settle(
    harness: Any, monkeypatch: pytest.MonkeyPatch
) -> tuple[asyncio.Event, asyncio.Event]:
    """Makes the token settle wait 50 ms, as a Redis round trip would; the
    events say when it started and when it finished."""
    limiter = harness.deps.proxy.limiter
    original = limiter.settle
    started, done = asyncio.Event(), asyncio.Event()

    async def slow(admission: Any, used: int, *, served: bool = True) -> None:
        started.set()
        await asyncio.sleep(0.05)
        await original(admission, used, served=served)
        done.set()

    monkeypatch.setattr(limiter, "settle", slow)
    return started, done


async def test_a_stream_closed_before_it_is_read_frees_its_replica(
    harness: Any, kit: Any
) -> None:
    # A client can leave before the first chunk is asked for (uvicorn holds the
    # send of the headers): closing the stream must still free what it holds.
    reply = kit.reply(parts=_sse(CHUNK))
    harness.upstream.handler = lambda url, body: reply
    result = await _stream(harness, kit)
    assert _in_flight(harness) == 1
    await result.stream.aclose()
    assert _in_flight(harness) == 0
    assert reply.closed
    assert kit.counted(harness, "200") == 1


async def test_a_client_leaving_during_the_settle_is_still_counted(
    kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The client reads [DONE] and hangs up while the token correction (a Redis
    # round trip with shared limits) is under way.
    harness = kit.build(doc=kit.document(limits={"tpm": 100_000}))
    harness.upstream.handler = lambda url, body: kit.reply(parts=_sse(CHUNK, USAGE))
    started, done = _slow_settle(harness, monkeypatch)
    result = await _stream(harness, kit)

    async def read() -> None:
        async for _ in result.stream:
            pass

    reader = asyncio.create_task(read())
    await started.wait()
    reader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await reader
    assert kit.counted(harness, "200") == 1
    await asyncio.wait_for(done.wait(), 5)  # the settle ran to its end
    sample = harness.deps.metrics.registry.get_sample_value
    tokens = {"model": "smollm2", "key": "alice", "kind": "prompt"}
    assert sample("citadel_gateway_tokens_total", tokens) == 3


def _collect(sent: list[Any]) -> Any:
    async def send(message: Any) -> None:
        sent.append(message)

    return send


async def test_a_client_that_leaves_stops_a_whole_answer(
    harness: Any, kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # uvicorn does not cancel the app when a client leaves: the gateway must
    # notice, or the replica generates an answer nobody reads.
    started, stopped = asyncio.Event(), asyncio.Event()

    async def generating(
        url: str, body: bytes, headers: Any, timeout_s: Any = None
    ) -> Any:
        started.set()
        try:
            await asyncio.Event().wait()
        finally:
            stopped.set()

    monkeypatch.setattr(harness.upstream, "post", generating)
    messages = [{"type": "http.request", "body": orjson.dumps(kit.chat)}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await started.wait()
        return {"type": "http.disconnect"}

    sent: list[Any] = []
    await asyncio.wait_for(
        harness.served(kit.post_scope("/v1/chat/completions"), receive, _collect(sent)),
        5,
    )
    assert stopped.is_set() and not sent
    assert _in_flight(harness) == 0
    assert kit.counted(harness, "499") == 1
    assert kit.counted(harness, "200") is None


async def test_a_client_gone_during_the_upload_is_counted_not_an_error(
    harness: Any, kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    messages = [
        {"type": "http.disconnect"},
        {"type": "http.request", "body": b'{"model": "ch', "more_body": True},
    ]

    async def receive() -> dict[str, Any]:
        return messages.pop()

    sent: list[Any] = []
    await harness.served(
        kit.post_scope("/v1/chat/completions"), receive, _collect(sent)
    )
    assert not sent
    assert kit.counted(harness, "499", model="unknown") == 1  # its body never came
    assert not [r for r in caplog.records if r.levelname == "ERROR"]


@pytest.mark.parametrize(
    ("reply", "status"),
    [("a whole answer", "200"), ("a failed replica", "502")],
)
async def test_a_cancel_during_the_settle_cuts_neither_it_nor_the_count(
    kit: Any, monkeypatch: pytest.MonkeyPatch, reply: str, status: str
) -> None:
    # The client leaves (or a gRPC deadline passes) while its answer's, or
    # its failure's, token correction waits on Redis.
    harness = kit.build(doc=kit.document(limits={"tpm": 100_000}))
    answer = kit.completion() if reply == "a whole answer" else kit.reply(status=500)
    harness.upstream.handler = lambda url, body: answer
    started, done = _slow_settle(harness, monkeypatch)
    handling = asyncio.create_task(_handle(harness, kit))
    await started.wait()
    handling.cancel()
    with pytest.raises(asyncio.CancelledError):
        await handling
    assert kit.counted(harness, status) == 1
    assert kit.counted(harness, "499") is None
    await asyncio.wait_for(done.wait(), 5)
    assert _in_flight(harness) == 0


@pytest.mark.parametrize("stream", [False, True])
async def test_a_request_the_server_cuts_gets_an_openai_error(
    harness: Any, kit: Any, stream: bool
) -> None:
    """At the end of its shutdown grace uvicorn cancels what still runs: the
    client gets a 503 `shutting_down` (an error event in a stream), not a
    plain-text 500 or a stream cut without a word, and it is counted so."""

    class Endless(kit.reply):  # type: ignore[misc,name-defined]
        async def chunks(self, timeout_s: float | None = None) -> Any:
            yield _sse(CHUNK)[0]
            await asyncio.Event().wait()

    waiting = asyncio.Event()

    async def post(url: str, body: bytes, headers: Any, timeout_s: Any = None) -> Any:
        waiting.set()
        if not stream:
            await asyncio.Event().wait()  # a long answer
        return Endless(content_type="text/event-stream")

    harness.upstream.post = post
    receive = kit.staying(orjson.dumps({**kit.chat, "stream": stream}))
    sent: list[Any] = []
    task = asyncio.create_task(
        harness.served(kit.post_scope("/v1/chat/completions"), receive, _collect(sent))
    )
    while not waiting.is_set() or (stream and not sent):
        await asyncio.sleep(0.01)
    await asyncio.sleep(0.01)
    harness.deps.proxy.stopping(0)
    task.cancel()  # what uvicorn does when the grace has run out
    await asyncio.wait_for(task, 5)
    bodies = b"".join(m.get("body", b"") for m in sent)
    if stream:
        assert sent[0]["status"] == 200
        assert b'"shutting_down"' in bodies.split(b"\n\n")[-2]
        assert sent[-1] == {
            "type": "http.response.body",
            "body": b"",
            "more_body": False,
        }
        assert kit.counted(harness, "200") == 1
    else:
        assert sent[0]["status"] == 503
        assert orjson.loads(bodies)["error"]["code"] == "shutting_down"
        assert kit.counted(harness, "503") == 1
    assert _in_flight(harness) == 0


@pytest.mark.parametrize("ended_by", ["the client", "the server"])
async def test_a_stream_ended_before_its_first_event_sends_no_200(
    harness: Any, kit: Any, ended_by: str
) -> None:
    """The gateway waits for a stream's first event before it commits its
    200: a client that leaves meanwhile is counted as one that left while
    it waited (499, the replica freed and its connection closed, judged on
    nothing), and one the server cuts at the end of its shutdown grace gets
    a 503 `shutting_down` in OpenAI's shape, not a 200 and an error event."""

    class Silent(kit.reply):  # type: ignore[misc,name-defined]
        async def chunks(self, timeout_s: float | None = None) -> Any:
            waiting.set()
            await asyncio.Event().wait()
            yield b""  # never reached

    waiting = asyncio.Event()
    reply = Silent(content_type="text/event-stream")
    harness.upstream.handler = lambda url, body: reply
    messages = [
        {"type": "http.request", "body": orjson.dumps({**kit.chat, "stream": True})}
    ]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await waiting.wait()
        if ended_by == "the server":
            await asyncio.Event().wait()  # the client stays
        return {"type": "http.disconnect"}

    sent: list[Any] = []
    task = asyncio.create_task(
        harness.served(kit.post_scope("/v1/chat/completions"), receive, _collect(sent))
    )
    await asyncio.wait_for(waiting.wait(), 5)
    if ended_by == "the server":
        await asyncio.sleep(0.01)
        harness.deps.proxy.stopping(0)
        task.cancel()  # what uvicorn does when the grace has run out
    await asyncio.wait_for(task, 5)
    assert reply.closed
    assert _in_flight(harness) == 0
    assert all(r.failures == 0 for r in harness.deps.catalog.all_replicas().values())
    assert kit.counted(harness, "200") is None
    if ended_by == "the client":
        assert not sent
        assert kit.counted(harness, "499") == 1
    else:
        assert sent[0]["status"] == 503
        body = b"".join(m.get("body", b"") for m in sent)
        assert orjson.loads(body)["error"]["code"] == "shutting_down"
        assert kit.counted(harness, "503") == 1
