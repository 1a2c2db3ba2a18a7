"""The gRPC door's refusals as REST's: mapped codes, counted, nothing leaked."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import struct_pb2
from google.rpc.error_details_pb2 import ErrorInfo, RetryInfo
from google.rpc.status_pb2 import Status
from grpc_health.v1 import health_pb2, health_pb2_grpc

from citadel.gateway.errors import InvalidRequest
from citadel.gateway.rpc import convert
from citadel.gateway.rpc.server import GrpcServer, listen_address
from citadel.gateway.rpc.status import DETAILS_KEY
from citadel.gateway.rpc.v1 import citadel_pb2 as pb
from citadel.gateway.rpc.v1 import citadel_pb2_grpc as pb_grpc
from citadel.gateway.services.requests import MAX_MESSAGES, MAX_PROMPTS, MAX_STOP
from citadel.gateway.upstream import UpstreamBroken, UpstreamFailure

pytestmark = pytest.mark.unit


@pytest.fixture
async def door(kit: Any) -> AsyncIterator[tuple[Any, pb_grpc.InferenceStub]]:
    harness = kit.build()  # max_body_bytes 4096
    async with kit.grpc_stub(harness) as stub:
        yield harness, stub


@pytest.mark.parametrize(
    ("host", "address"),
    [
        ("0.0.0.0", "0.0.0.0:50051"),
        ("127.0.0.1", "127.0.0.1:50051"),
        # grpc-core reads `:::50051` as a host without a port and fails to bind.
        ("::", "[::]:50051"),
        ("::1", "[::1]:50051"),
        ("[::]", "[::]:50051"),
        ("localhost", "localhost:50051"),
    ],
)
def test_the_listen_address_brackets_ipv6(host: str, address: str) -> None:
    assert listen_address(host, 50051) == address


@pytest.mark.ipv6
async def test_the_door_listens_on_ipv6(kit: Any) -> None:
    """CITADEL_GATEWAY_HOST `::` (the chart's listenHost on IPv6 clusters)."""
    harness = kit.build()
    server = GrpcServer(harness.deps, "::", 0, harness.deps.max_body_bytes)
    await server.start()
    channel = grpc.aio.insecure_channel(f"[::1]:{server.port}")
    try:
        stub = health_pb2_grpc.HealthStub(channel)
        await stub.Check(health_pb2.HealthCheckRequest(), timeout=5)
    finally:
        await channel.close()
        await server.stop()


def _chat(content: str = "hi") -> pb.ChatCompletionRequest:
    message = pb.ChatMessage(role="user", content=content)
    return pb.ChatCompletionRequest(model="chat", messages=[message])


async def _refused(call: Any) -> grpc.aio.AioRpcError:
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        await call
    return caught.value


async def test_a_message_over_the_body_limit_is_refused_as_on_rest(
    door: tuple[Any, pb_grpc.InferenceStub], kit: Any
) -> None:
    harness, stub = door
    key = (("authorization", f"Bearer {kit.key}"),)
    error = await _refused(stub.ChatCompletion(_chat("a" * 10_000), metadata=key))
    # INVALID_ARGUMENT, as for REST's 413; not RESOURCE_EXHAUSTED, which
    # retry policies read as a rate limit.
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert kit.counted(harness, "413", door="grpc", model="unknown") == 1
    assert harness.upstream.calls == []


async def test_metadata_past_grpcs_own_bound_is_refused_before_the_service(
    door: tuple[Any, pb_grpc.InferenceStub], kit: Any
) -> None:
    # The REST door bounds its headers itself (citadel.gateway.protocol);
    # grpc-core bounds metadata by default (8 KiB soft, 16 KiB hard). This pins
    # that default: an option raising it would bring back the unbounded case.
    harness, stub = door
    metadata = (("authorization", f"Bearer {kit.key}"), ("x-pad", "a" * 17_000))
    error = await _refused(stub.ChatCompletion(_chat(), metadata=metadata))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "metadata" in (error.details() or "")
    assert harness.upstream.calls == []


async def test_a_request_that_cannot_become_json_is_invalid(
    door: tuple[Any, pb_grpc.InferenceStub], kit: Any
) -> None:
    harness, stub = door
    request = _chat()
    request.extra.update({"temperature": float("nan")})
    key = (("authorization", f"Bearer {kit.key}"),)
    error = await _refused(stub.ChatCompletion(request, metadata=key))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "Unexpected" not in error.details()
    assert kit.counted(harness, "400", door="grpc", model="unknown") == 1
    # Without a key it is the key that is refused, first.
    error = await _refused(stub.ChatCompletion(request))
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


def _nested(levels: int) -> Any:
    """An object nested `levels` deep."""
    value: Any = "x"
    for _ in range(levels):
        value = {"a": value}
    return value


@pytest.mark.parametrize("streams", [False, True], ids=["unary", "stream"])
async def test_a_message_nested_past_protobufs_limit_is_invalid_as_on_rest(
    door: tuple[Any, pb_grpc.InferenceStub],
    kit: Any,
    caplog: pytest.LogCaptureFixture,
    streams: bool,
) -> None:
    # protobuf reads 100 levels: a Struct object takes three (the Struct, its
    # field's entry, the Value), so 40 objects in `extra` cannot be read. The
    # caller's mistake, as a body too deep is on REST: not grpc's UNKNOWN,
    # naming protobuf's internals, uncounted.
    harness, stub = door
    request = _chat()
    request.extra.update({"deep": _nested(40)})
    key = (("authorization", f"Bearer {kit.key}"),)

    async def call(metadata: Any = None) -> None:
        if streams:
            async for _ in stub.ChatCompletionStream(request, metadata=metadata):
                pass
        else:
            await stub.ChatCompletion(request, metadata=metadata)

    error = await _refused(call(key))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "nested too deeply" in error.details()
    assert "Unexpected" not in error.details() and "upb" not in error.details()
    assert kit.counted(harness, "400", door="grpc", model="unknown") == 1
    assert harness.upstream.calls == []
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []
    # Without a key it is the key that is refused, first, as on REST.
    error = await _refused(call())
    assert error.code() is grpc.StatusCode.UNAUTHENTICATED


async def test_embeddings_other_than_floats_are_refused_before_the_replica(
    door: tuple[Any, pb_grpc.InferenceStub], kit: Any
) -> None:
    harness, stub = door
    extra = struct_pb2.Struct()
    extra.update({"encoding_format": "base64"})
    request = pb.EmbeddingsRequest(model="chat", input=["hi"], extra=extra)
    key = (("authorization", f"Bearer {kit.key}"),)
    error = await _refused(stub.Embeddings(request, metadata=key))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "encoding_format" in error.details()
    assert harness.upstream.calls == []


def _access(caplog: pytest.LogCaptureFixture) -> list[tuple[Any, Any]]:
    """The status and code of each access-log line."""
    return [
        (getattr(r, "status", None), getattr(r, "code", None))
        for r in caplog.records
        if r.name == "citadel.gateway.access" and r.getMessage() == "request"
    ]


UNFIT = {"id": "c", "choices": "not a list", "usage": {"prompt_tokens": 7}}


@pytest.mark.parametrize(
    "answer",
    [orjson.dumps(UNFIT), b'{"choices": [', b"[1]"],
    ids=["unfit", "invalid JSON", "not an object"],
)
async def test_an_answer_the_door_cannot_use_is_counted_as_the_replicas_failure(
    door: tuple[Any, pb_grpc.InferenceStub],
    kit: Any,
    caplog: pytest.LogCaptureFixture,
    answer: bytes,
) -> None:
    # The client gets UNAVAILABLE: the request is counted and logged as the
    # 502 it is, not as the 200 the replica sent.
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness, stub = door
    harness.upstream.handler = lambda url, body: kit.reply(body=answer)
    key = (("authorization", f"Bearer {kit.key}"),)
    error = await _refused(stub.ChatCompletion(_chat(), metadata=key))
    assert error.code() is grpc.StatusCode.UNAVAILABLE
    assert "Unexpected" not in error.details()
    assert kit.counted(harness, "502", door="grpc") == 1
    assert kit.counted(harness, "200", door="grpc") is None
    assert _access(caplog) == [(502, "backend_error")]


async def test_an_unusable_answer_keeps_the_tokens_it_reported_charged(
    door: tuple[Any, pb_grpc.InferenceStub], kit: Any
) -> None:
    # The replica did the work it reports: the key pays for it, as for an
    # answer it could use (or a client could use the replica past its limits).
    harness, stub = door
    harness.upstream.handler = lambda url, body: kit.reply(body=orjson.dumps(UNFIT))
    key = (("authorization", f"Bearer {kit.key}"),)
    await _refused(stub.ChatCompletion(_chat(), metadata=key))
    sample = harness.deps.metrics.registry.get_sample_value
    tokens = {"model": "smollm2", "key": "alice", "kind": "prompt"}
    assert sample("citadel_gateway_tokens_total", tokens) == 7


def _events(*payloads: bytes) -> list[bytes]:
    return [b"data: " + p + b"\n\n" for p in payloads] + [b"data: [DONE]\n\n"]


CHUNK = orjson.dumps({"id": "c", "choices": [{"index": 0, "delta": {"content": "hi"}}]})


@pytest.mark.parametrize(
    "bad", [orjson.dumps(UNFIT), b'{"choices": ['], ids=["unfit", "invalid JSON"]
)
async def test_a_chunk_the_door_cannot_use_ends_the_stream_counted_as_a_failure(
    door: tuple[Any, pb_grpc.InferenceStub],
    kit: Any,
    caplog: pytest.LogCaptureFixture,
    bad: bytes,
) -> None:
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness, stub = door
    reply = kit.reply(
        parts=_events(CHUNK, bad, CHUNK), content_type="text/event-stream"
    )
    harness.upstream.handler = lambda url, body: reply
    key = (("authorization", f"Bearer {kit.key}"),)
    call = stub.ChatCompletionStream(_chat(), metadata=key)
    got: list[pb.ChatCompletionChunk] = []
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for chunk in call:
            got.append(chunk)
    assert [c.choices[0].delta.content for c in got] == ["hi"]
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    # Not 200 `client_closed`: the client did not leave, the replica's
    # answer could not be used.
    assert kit.counted(harness, "502", door="grpc") == 1
    assert kit.counted(harness, "200", door="grpc") is None
    assert _access(caplog) == [(502, "backend_error")]
    assert reply.closed


async def test_a_stream_broken_upstream_is_counted_as_the_failure_its_client_gets(
    door: tuple[Any, pb_grpc.InferenceStub],
    kit: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """REST's client got a 200 before the error event (counted 200
    `stream_broken`); a gRPC client gets UNAVAILABLE, counted as its 502."""
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness, stub = door
    broken = UpstreamFailure("connection reset")
    reply = kit.reply(
        parts=[b"data: " + CHUNK + b"\n\n", broken], content_type="text/event-stream"
    )
    harness.upstream.handler = lambda url, body: reply
    key = (("authorization", f"Bearer {kit.key}"),)
    with pytest.raises(grpc.aio.AioRpcError) as caught:
        async for _ in stub.ChatCompletionStream(_chat(), metadata=key):
            pass
    assert caught.value.code() is grpc.StatusCode.UNAVAILABLE
    assert kit.counted(harness, "502", door="grpc") == 1
    assert kit.counted(harness, "200", door="grpc") is None
    assert _access(caplog) == [(502, "stream_broken")]


async def test_a_stream_broken_before_its_first_chunk_is_answered_by_another(
    door: tuple[Any, pb_grpc.InferenceStub],
    kit: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A replica that dies before its first event sent the client nothing:
    another replica answers, and the client gets its chunks, not
    UNAVAILABLE."""
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness, stub = door
    broken = kit.reply(
        parts=[UpstreamBroken("the response broke off")],
        content_type="text/event-stream",
    )
    whole = kit.reply(parts=_events(CHUNK, CHUNK), content_type="text/event-stream")
    harness.upstream.handler = lambda url, body: (
        broken if len(harness.upstream.calls) == 1 else whole
    )
    key = (("authorization", f"Bearer {kit.key}"),)
    got = [c async for c in stub.ChatCompletionStream(_chat(), metadata=key)]
    assert [c.choices[0].delta.content for c in got] == ["hi", "hi"]
    assert len(harness.upstream.calls) == 2
    assert kit.counted(harness, "200", door="grpc") == 1
    assert _access(caplog) == [(200, None)]


async def test_grpc_core_refuses_what_is_far_over_the_limit_before_any_key(
    door: tuple[Any, pb_grpc.InferenceStub],
) -> None:
    """gRPC reads a whole message before the key is checked: its own limit stays
    close to the gateway's (4096 bytes here), so no anonymous caller makes the
    gateway hold much more."""
    _, stub = door
    error = await _refused(stub.ChatCompletion(_chat("a" * 100_000)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED


async def test_a_replicas_own_refusal_carries_the_limit_values_as_on_rest(
    kit: Any,
) -> None:
    # The estimate was given back when the replica refused: the trailers say
    # so, as REST's headers do.
    harness = kit.build(kit.document(limits={"tpm": 1000}))
    refusal = {"error": {"message": "max_tokens too large", "param": "max_tokens"}}
    harness.upstream.handler = lambda url, body: kit.reply(400, orjson.dumps(refusal))
    async with harness.client() as client:
        rest = await client.post(
            "/v1/chat/completions", json={**kit.chat, "max_tokens": 500}
        )
    request = _chat()
    request.sampling.max_tokens = 500
    key = (("authorization", f"Bearer {kit.key}"),)
    async with kit.grpc_stub(harness) as stub:
        error = await _refused(stub.ChatCompletion(request, metadata=key))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    limits = {k: v for k, v in rest.headers.items() if k.startswith("x-ratelimit-")}
    assert limits["x-ratelimit-remaining-tokens"] == "1000"
    trailers = dict(error.trailing_metadata() or ())
    assert {k: trailers.get(k) for k in limits} == limits


async def test_a_number_too_big_for_an_integer_is_refused_as_on_rest(
    door: tuple[Any, pb_grpc.InferenceStub],
    kit: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A Struct number is a double; 1e30 is whole but no 64-bit integer: sent
    # as the double it is, REST's check refuses it (`max_tokens` 1e30 in a
    # REST body is read as that double too), not the JSON encoder.
    harness, stub = door
    request = _chat()
    request.extra.update({"max_tokens": 1e30})
    key = (("authorization", f"Bearer {kit.key}"),)
    error = await _refused(stub.ChatCompletion(request, metadata=key))
    assert error.code() is grpc.StatusCode.INVALID_ARGUMENT
    assert "max_tokens" in error.details()
    assert kit.counted(harness, "400", door="grpc", model="unknown") == 1
    assert harness.upstream.calls == []
    assert [r for r in caplog.records if r.levelname == "ERROR"] == []


@pytest.mark.parametrize(
    ("status", "body"),
    [(400, b"Invalid HTTP request received."), (404, b"<h1>404 Not Found</h1>")],
    ids=["plain text", "a proxy's HTML page"],
)
async def test_a_replicas_refusal_that_is_not_json_is_a_refusal_not_a_failure(
    door: tuple[Any, pb_grpc.InferenceStub],
    kit: Any,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: bytes,
) -> None:
    # Not UNAVAILABLE (a replica's failure): the replica refused the request,
    # and it is counted with the replica's status, as REST relays it.
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness, stub = door
    reply = kit.reply(status=status, body=body, content_type="text/plain")
    harness.upstream.handler = lambda url, sent: reply
    key = (("authorization", f"Bearer {kit.key}"),)
    error = await _refused(stub.ChatCompletion(_chat(), metadata=key))
    codes = {400: grpc.StatusCode.INVALID_ARGUMENT, 404: grpc.StatusCode.NOT_FOUND}
    assert error.code() is codes[status]
    assert str(status) in error.details() and "<" not in error.details()
    assert kit.counted(harness, str(status), door="grpc") == 1
    assert kit.counted(harness, "502", door="grpc") is None
    assert _access(caplog) == [(status, None)]


async def test_a_replicas_own_404_is_not_found_as_on_rest(
    door: tuple[Any, pb_grpc.InferenceStub], kit: Any
) -> None:
    # vLLM's answer for a model it does not serve (a served name out of step).
    harness, stub = door
    unknown = {"error": {"message": "The model `smollm2` does not exist."}}
    harness.upstream.handler = lambda url, sent: kit.reply(404, orjson.dumps(unknown))
    key = (("authorization", f"Bearer {kit.key}"),)
    error = await _refused(stub.ChatCompletion(_chat(), metadata=key))
    assert error.code() is grpc.StatusCode.NOT_FOUND
    assert error.details() == "The model `smollm2` does not exist."
    assert _reason(error) == "model_not_found"
    assert kit.counted(harness, "404", door="grpc") == 1


async def test_a_replicas_own_429_is_resource_exhausted_with_its_retry_after(
    kit: Any,
) -> None:
    # vLLM's queue is full: the client is told when to retry, as for the
    # gateway's own limits (RetryInfo and the `retry-after` trailer), with
    # what the replica said, which REST relays.
    harness = kit.build()
    busy = {"error": {"message": "The server is busy."}}
    harness.upstream.handler = lambda url, sent: kit.reply(
        429, orjson.dumps(busy), retry_after="7"
    )
    async with harness.client() as client:
        rest = await client.post("/v1/chat/completions", json=kit.chat)
    key = (("authorization", f"Bearer {kit.key}"),)
    async with kit.grpc_stub(harness) as stub:
        error = await _refused(stub.ChatCompletion(_chat(), metadata=key))
    assert (rest.status_code, rest.headers["retry-after"]) == (429, "7")
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
    assert error.details() == "The server is busy."
    assert dict(error.trailing_metadata() or ())["retry-after"] == "7"
    assert _reason(error) == "rate_limit_exceeded"
    (retry,) = _details(error, RetryInfo)
    assert retry.retry_delay.seconds == 7
    assert kit.counted(harness, "429", door="grpc") == 1


def _details(error: grpc.aio.AioRpcError, kind: Any) -> list[Any]:
    """The details of `kind` in the status trailer."""
    trailers = dict(error.trailing_metadata() or ())
    status = Status.FromString(trailers[DETAILS_KEY])
    found = []
    for detail in status.details:
        if detail.Is(kind.DESCRIPTOR):
            found.append(kind())
            detail.Unpack(found[-1])
    return found


def _reason(error: grpc.aio.AioRpcError) -> str:
    (info,) = _details(error, ErrorInfo)
    return str(info.reason)


async def test_a_session_id_that_is_no_id_is_logged_as_its_hash_as_on_rest(
    door: tuple[Any, pb_grpc.InferenceStub],
    kit: Any,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _harness, stub = door
    caplog.set_level("INFO", logger="citadel.gateway.access")
    sent = "x key=root status=200"
    metadata = (("authorization", f"Bearer {kit.key}"), ("x-session-id", sent))
    await stub.ChatCompletion(_chat(), metadata=metadata)
    logged = [r for r in caplog.records if r.name == "citadel.gateway.access"]
    hashed = "sha256:" + hashlib.sha256(sent.encode()).hexdigest()
    assert [getattr(r, "session", None) for r in logged] == [hashed]


@pytest.mark.parametrize(
    ("field", "body_of"),
    [
        (
            "messages",
            lambda n: convert.chat_body(
                pb.ChatCompletionRequest(model="chat", messages=[pb.ChatMessage()] * n),
                stream=False,
            ),
        ),
        (
            "stop",
            lambda n: convert.chat_body(
                pb.ChatCompletionRequest(
                    model="chat",
                    messages=[pb.ChatMessage(role="user", content="hi")],
                    sampling=pb.Sampling(stop=["x"] * n),
                ),
                stream=False,
            ),
        ),
        (
            "stop",
            lambda n: convert.completion_body(
                pb.CompletionRequest(
                    model="chat", prompt="hi", sampling=pb.Sampling(stop=["x"] * n)
                )
            ),
        ),
        (
            "input",
            lambda n: convert.embeddings_body(
                pb.EmbeddingsRequest(model="chat", input=["x"] * n)
            ),
        ),
    ],
)
def test_arrays_past_rests_limits_are_refused_before_they_are_converted(
    field: str, body_of: Any
) -> None:
    # 4.5 million empty messages fit in a 9 MiB message: 1.5 s of the event
    # loop to write out as dicts, before the proxy refused them.
    limit = {
        "messages": MAX_MESSAGES,
        "stop": MAX_STOP,
        "input": MAX_PROMPTS,
    }[field]
    assert len(body_of(limit)[field]) == limit
    with pytest.raises(InvalidRequest) as info:
        body_of(limit + 1)
    assert info.value.param == field
