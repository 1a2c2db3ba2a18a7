"""The gRPC door of a real gateway process, driven with a grpcio client."""

from __future__ import annotations

import concurrent.futures
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from google.protobuf import struct_pb2
from google.rpc import error_details_pb2
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from grpc_status import rpc_status

from citadel.gateway.rpc.v1 import citadel_pb2 as pb
from citadel.gateway.rpc.v1 import citadel_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

MESSAGES = [pb.ChatMessage(role="user", content="Say hi")]


@pytest.fixture
def setup(
    tmp_path: Path, start_backend: Any, start_gateway: Any, helpers: Any
) -> Iterator[dict[str, Any]]:
    backend = start_backend("a")
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "alice", "--models", "smol*", "chat")
    limited = helpers.create_key(keys, "limited", "--rpm", "1")
    models = [
        helpers.route("smol", [backend], aliases=["chat"]),
        helpers.route("other", [backend]),
        helpers.route("empty", []),
    ]
    port = helpers.free_port()
    gateway = start_gateway(models, keys, grpc_port=str(port), read_timeout_s="5")
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        grpc.channel_ready_future(channel).result(timeout=30)
        yield {
            "backend": backend,
            "gateway": gateway,
            "stub": pb_grpc.InferenceStub(channel),
            "channel": channel,
            "auth": (("authorization", f"Bearer {key}"),),
            "limited": (("authorization", f"Bearer {limited}"),),
        }


def _error(err: grpc.RpcError) -> tuple[grpc.StatusCode, str, dict[str, Any]]:
    """The code, ErrorInfo reason and the decoded details of a failed call."""
    assert isinstance(err, grpc.Call)
    status = rpc_status.from_call(err)
    assert status is not None
    details: dict[str, Any] = {}
    for any_detail in status.details:
        for kind in (error_details_pb2.ErrorInfo, error_details_pb2.RetryInfo):
            if any_detail.Is(kind.DESCRIPTOR):
                message = kind()
                any_detail.Unpack(message)
                details[kind.__name__] = message
    reason = details["ErrorInfo"].reason
    return err.code(), reason, details


def test_unary_calls_answer_like_rest(setup: dict[str, Any]) -> None:
    stub, auth = setup["stub"], setup["auth"]
    extra = struct_pb2.Struct()
    extra.update({"top_k": 5, "vendor_thing": {"nested": [1, 2]}})
    request = pb.ChatCompletionRequest(
        model="chat",
        messages=MESSAGES,
        sampling=pb.Sampling(max_tokens=3, temperature=0.5),
        extra=extra,
    )
    answer, call = stub.ChatCompletion.with_call(
        request, metadata=(*auth, ("x-request-id", "req-7"))
    )
    assert answer.choices[0].message.content == "w0 w1 w2"
    assert answer.usage.completion_tokens == 3
    initial = dict(call.initial_metadata())
    trailing = dict(call.trailing_metadata())
    assert initial["x-citadel-api-version"] == "v1"
    assert trailing["x-citadel-api-version"] == "v1"
    assert trailing["x-request-id"] == "req-7"
    completion = stub.Completion(
        pb.CompletionRequest(
            model="smol", prompt="Once", sampling=pb.Sampling(max_tokens=2)
        ),
        metadata=auth,
    )
    assert completion.choices[0].text == "w0 w1"
    embeddings = stub.Embeddings(
        pb.EmbeddingsRequest(model="smol", input=["a", "b"]), metadata=auth
    )
    assert [e.index for e in embeddings.data] == [0, 1]
    assert list(embeddings.data[0].embedding) == pytest.approx([0.1, 0.2, 0.3])
    models = stub.ListModels(pb.ListModelsRequest(), metadata=auth)
    assert [m.id for m in models.models] == ["smol", "chat"]
    sent = setup["backend"].received()[0]
    assert sent["body"]["model"] == "smol"
    assert sent["body"]["top_k"] == 5  # a whole number from a Struct stays one
    assert sent["body"]["vendor_thing"] == {"nested": [1, 2]}
    assert sent["body"]["temperature"] == 0.5
    assert sent["headers"]["X-Request-ID"] == "req-7"


def test_stream_sends_one_message_per_chunk_and_usage_last(
    setup: dict[str, Any],
) -> None:
    stub, auth = setup["stub"], setup["auth"]
    request = pb.ChatCompletionRequest(
        model="smol", messages=MESSAGES, sampling=pb.Sampling(max_tokens=4)
    )
    chunks = list(stub.ChatCompletionStream(request, metadata=auth))
    words = [c.choices[0].delta.content for c in chunks if c.choices]
    assert words == ["w0 ", "w1 ", "w2 ", "w3 "]
    assert chunks[-1].usage.completion_tokens == 4
    assert not chunks[0].HasField("usage")


def test_stream_arrives_before_the_model_finishes(setup: dict[str, Any]) -> None:
    stub, auth = setup["stub"], setup["auth"]
    extra = struct_pb2.Struct()
    extra.update({"fake_hold": True})
    request = pb.ChatCompletionRequest(
        model="smol", messages=MESSAGES, sampling=pb.Sampling(max_tokens=3), extra=extra
    )
    stream = stub.ChatCompletionStream(request, metadata=auth, timeout=30)
    first = next(stream)  # the backend holds the rest until released
    assert first.choices[0].delta.content == "w0 "
    setup["backend"].release()
    rest = list(stream)
    assert rest[-1].usage.completion_tokens == 3


def test_each_error_has_its_status_code(setup: dict[str, Any]) -> None:
    stub, auth = setup["stub"], setup["auth"]

    def fails(model: str, metadata: Any = auth, **extra: Any) -> Any:
        request = pb.ChatCompletionRequest(model=model, messages=MESSAGES)
        request.extra.update(extra)
        with pytest.raises(grpc.RpcError) as caught:
            stub.ChatCompletion(request, metadata=metadata, timeout=30)
        return _error(caught.value)

    code, reason, _ = fails("smol", metadata=())
    assert (code, reason) == (grpc.StatusCode.UNAUTHENTICATED, "invalid_api_key")
    code, reason, _ = fails("smol", metadata=(("authorization", "Bearer nope"),))
    assert code is grpc.StatusCode.UNAUTHENTICATED
    refused = 'citadel_gateway_requests_total{api="chat",door="grpc",key="anonymous"'
    assert setup["gateway"].metric(refused) == 2  # the two keys refused above
    code, reason, _ = fails("other")
    assert (code, reason) == (grpc.StatusCode.PERMISSION_DENIED, "model_not_allowed")
    code, reason, details = fails("nope", metadata=setup["limited"])
    assert (code, reason) == (grpc.StatusCode.NOT_FOUND, "model_not_found")
    assert details["ErrorInfo"].metadata["param"] == "model"
    code, reason, _ = fails("")
    assert code is grpc.StatusCode.INVALID_ARGUMENT
    code, reason, _ = fails("smol", fake_status=400)
    assert code is grpc.StatusCode.INVALID_ARGUMENT  # the replica's own refusal
    code, reason, _ = fails("smol", fake_status=500)
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "backend_error")
    code, reason, details = fails("empty", metadata=setup["limited"])
    assert (code, reason) == (grpc.StatusCode.UNAVAILABLE, "model_not_ready")
    assert details["RetryInfo"].retry_delay.ToNanoseconds() > 0


def test_rate_limit_is_resource_exhausted_with_retry_info(
    setup: dict[str, Any],
) -> None:
    stub, limited = setup["stub"], setup["limited"]
    request = pb.ChatCompletionRequest(model="smol", messages=MESSAGES)
    _, call = stub.ChatCompletion.with_call(request, metadata=limited)
    assert dict(call.trailing_metadata())["x-ratelimit-limit-requests"] == "1"
    with pytest.raises(grpc.RpcError) as caught:
        stub.ChatCompletion(request, metadata=limited)
    code, reason, details = _error(caught.value)
    assert (code, reason) == (grpc.StatusCode.RESOURCE_EXHAUSTED, "rate_limit_exceeded")
    assert details["RetryInfo"].retry_delay.ToNanoseconds() > 0
    assert caught.value.trailing_metadata() is not None  # type: ignore[attr-defined]
    trailers = dict(caught.value.trailing_metadata())  # type: ignore[attr-defined]
    assert int(trailers["retry-after"]) >= 1


def test_deadline_ends_the_call_and_the_upstream_request(
    setup: dict[str, Any],
) -> None:
    stub, auth, gateway = setup["stub"], setup["auth"], setup["gateway"]
    request = pb.ChatCompletionRequest(model="smol", messages=MESSAGES)
    request.extra.update({"fake_delay_s": 30})
    with pytest.raises(grpc.RpcError) as caught:
        stub.ChatCompletion(request, metadata=auth, timeout=1)
    assert caught.value.code() is grpc.StatusCode.DEADLINE_EXCEEDED  # type: ignore[attr-defined]
    _wait_until(lambda: gateway.metric("citadel_gateway_in_flight_requests") == 0)


def test_cancelling_a_stream_stops_the_upstream_request(
    setup: dict[str, Any],
) -> None:
    stub, auth, gateway = setup["stub"], setup["auth"], setup["gateway"]
    request = pb.ChatCompletionRequest(
        model="smol", messages=MESSAGES, sampling=pb.Sampling(max_tokens=3)
    )
    request.extra.update({"fake_hold": True})
    stream = stub.ChatCompletionStream(request, metadata=auth, timeout=60)
    assert next(stream).choices[0].delta.content == "w0 "
    assert gateway.metric("citadel_gateway_in_flight_requests") == 1
    stream.cancel()
    _wait_until(lambda: gateway.metric("citadel_gateway_in_flight_requests") == 0)


def test_cancelling_a_unary_call_frees_the_replica(setup: dict[str, Any]) -> None:
    stub, auth, gateway = setup["stub"], setup["auth"], setup["gateway"]
    request = pb.ChatCompletionRequest(model="smol", messages=MESSAGES)
    request.extra.update({"fake_delay_s": 30})
    future = stub.ChatCompletion.future(request, metadata=auth, timeout=60)
    _wait_until(lambda: gateway.metric("citadel_gateway_in_flight_requests") == 1)
    future.cancel()
    _wait_until(lambda: gateway.metric("citadel_gateway_in_flight_requests") == 0)
    counted = 'citadel_gateway_requests_total{api="chat",door="grpc"'
    assert gateway.metric(counted) >= 1


def test_health_and_reflection(setup: dict[str, Any]) -> None:
    channel = setup["channel"]
    health = health_pb2_grpc.HealthStub(channel)
    serving = health_pb2.HealthCheckResponse.SERVING
    for service in ("", "citadel.v1.Inference"):
        # In step with /readyz within the health service's poll (HEALTH_PERIOD_S):
        # the routes are read off the event loop, so the first poll may come
        # before them.
        check = health_pb2.HealthCheckRequest(service=service)
        _wait_until(
            lambda c=check: health.Check(c).status == serving,
            timeout_s=5,
        )
    reflect = reflection_pb2_grpc.ServerReflectionStub(channel)
    ask = reflection_pb2.ServerReflectionRequest(list_services="")
    (reply,) = list(reflect.ServerReflectionInfo(iter([ask])))
    names = {s.name for s in reply.list_services_response.service}
    assert {"citadel.v1.Inference", "grpc.health.v1.Health"} <= names


def _wait_until(condition: Any, timeout_s: float = 30.0) -> None:
    """Waits (bounded) until `condition()` holds."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not reached in {timeout_s}s")
        time.sleep(0.05)


def test_sigterm_drains_grpc_beside_rest(setup: dict[str, Any]) -> None:
    # gRPC used to stop only after REST had drained, taking new calls all the
    # while (and the grace a second time, past the pod's period).
    gateway, stub, auth = setup["gateway"], setup["stub"], setup["auth"]
    slow = pb.ChatCompletionRequest(model="chat", messages=MESSAGES)
    slow.extra.update({"fake_delay_s": 3})
    in_flight = stub.ChatCompletion.future(slow, metadata=auth, timeout=30)
    # A REST request in flight keeps uvicorn draining.
    rest = httpx.Client(base_url=gateway.url, headers={"authorization": auth[0][1]})
    body = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}
    with rest, concurrent.futures.ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            rest.post, "/v1/chat/completions", json={**body, "fake_delay_s": 3}
        )
        backend = setup["backend"]
        deadline = time.monotonic() + 30
        while len(backend.received()) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        gateway.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(grpc.RpcError) as refused:
            stub.ChatCompletion(
                pb.ChatCompletionRequest(model="chat", messages=MESSAGES),
                metadata=auth,
                timeout=10,
            )
        assert refused.value.code() is grpc.StatusCode.UNAVAILABLE
        assert in_flight.result().choices  # the calls from before finish
        assert answer.result().status_code == 200
    assert gateway.proc.wait(timeout=60) in (0, -signal.SIGTERM)
