"""The gRPC door's refusals as REST's: mapped codes, counted, nothing leaked."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import grpc
import orjson
import pytest
from google.protobuf import struct_pb2

from citadel.gateway.rpc.server import GrpcServer
from citadel.gateway.rpc.v1 import citadel_pb2 as pb
from citadel.gateway.rpc.v1 import citadel_pb2_grpc as pb_grpc

pytestmark = pytest.mark.unit


@pytest.fixture
async def door(kit: Any) -> AsyncIterator[tuple[Any, pb_grpc.InferenceStub]]:
    harness = kit.build()  # max_body_bytes 4096
    server = GrpcServer(harness.deps, "127.0.0.1", 0, harness.deps.max_body_bytes)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield harness, pb_grpc.InferenceStub(channel)
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


async def test_an_answer_that_does_not_fit_the_message_is_a_mapped_error(
    door: tuple[Any, pb_grpc.InferenceStub], kit: Any
) -> None:
    harness, stub = door
    odd = {"id": "c", "choices": "not a list"}
    harness.upstream.handler = lambda url, body: kit.reply(body=orjson.dumps(odd))
    key = (("authorization", f"Bearer {kit.key}"),)
    error = await _refused(stub.ChatCompletion(_chat(), metadata=key))
    assert error.code() is grpc.StatusCode.UNAVAILABLE  # REST's 502
    assert "Unexpected" not in error.details()


async def test_grpc_core_refuses_what_is_far_over_the_limit_before_any_key(
    door: tuple[Any, pb_grpc.InferenceStub],
) -> None:
    """gRPC reads a whole message before the key is checked: its own limit stays
    close to the gateway's (4096 bytes here), so no anonymous caller makes the
    gateway hold much more."""
    _, stub = door
    error = await _refused(stub.ChatCompletion(_chat("a" * 100_000)))
    assert error.code() is grpc.StatusCode.RESOURCE_EXHAUSTED
