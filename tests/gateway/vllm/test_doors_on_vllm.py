"""gRPC and GraphQL in front of the real CPU vLLM (`make vllm`).

Run with `.venv/bin/pytest -m vllm tests/gateway/vllm` (`make vllm-gateway`).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import pytest
from vllm_server import VLLMServer

from citadel.gateway.rpc.v1 import citadel_pb2 as pb
from citadel.gateway.rpc.v1 import citadel_pb2_grpc as pb_grpc

pytestmark = pytest.mark.vllm

QUESTION = "What is the capital of France?"


@pytest.fixture
def doors(
    tmp_path: Path, smollm2_server: VLLMServer, start_gateway: Any, helpers: Any
) -> Iterator[dict[str, Any]]:
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "vllm-user", "--daily-tokens", "100000")
    route = {
        "name": "smollm2",
        "namespace": "llm",
        "servedName": "smollm2",
        "service": "smollm2",
        "endpoints": [smollm2_server.base_url],
    }
    port = helpers.free_port()
    gateway = start_gateway([route], keys, grpc_port=str(port))
    headers = {"authorization": f"Bearer {key}"}
    with (
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
        httpx.Client(base_url=gateway.url, headers=headers, timeout=120) as client,
    ):
        yield {
            "grpc": pb_grpc.InferenceStub(channel),
            "metadata": tuple(headers.items()),
            "graphql": client,
        }


def test_grpc_unary_and_stream_know_paris(doors: dict[str, Any]) -> None:
    request = pb.ChatCompletionRequest(
        model="smollm2",
        messages=[pb.ChatMessage(role="user", content=QUESTION)],
        sampling=pb.Sampling(max_tokens=24, temperature=0),
    )
    answer = doors["grpc"].ChatCompletion(
        request, metadata=doors["metadata"], timeout=120
    )
    assert "Paris" in answer.choices[0].message.content
    assert answer.usage.prompt_tokens > 0
    chunks = list(
        doors["grpc"].ChatCompletionStream(
            request, metadata=doors["metadata"], timeout=120
        )
    )
    text = "".join(c.choices[0].delta.content for c in chunks if c.choices)
    assert "Paris" in text
    assert len(chunks) > 2  # one message per chunk, not one at the end
    assert chunks[-1].usage.completion_tokens > 0
    with pytest.raises(grpc.RpcError) as caught:
        doors["grpc"].ChatCompletion(
            pb.ChatCompletionRequest(
                model="smollm2",
                messages=[pb.ChatMessage(role="user", content=QUESTION)],
                # Past the context (2,048), within the key's daily quota.
                sampling=pb.Sampling(max_tokens=4_096),
            ),
            metadata=doors["metadata"],
            timeout=120,
        )
    # vLLM's own refusal (over the context length) comes back as INVALID_ARGUMENT
    assert caught.value.code() is grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]


def test_graphql_mutation_knows_paris_and_counts_usage(
    doors: dict[str, Any],
) -> None:
    query = """
    mutation Chat($input: ChatCompletionInput!) {
      chatCompletion(input: $input) {
        choices { message { content } } usage { totalTokens }
      }
    }
    """
    variables = {
        "input": {
            "model": "smollm2",
            "messages": [{"role": "user", "content": QUESTION}],
            "maxTokens": 24,
            "temperature": 0,
        }
    }
    reply = doors["graphql"].post(
        "/graphql", json={"query": query, "variables": variables}
    )
    chat = reply.json()["data"]["chatCompletion"]
    assert "Paris" in chat["choices"][0]["message"]["content"]
    usage = doors["graphql"].post(
        "/graphql", json={"query": "{ usage { limits { scope used } } }"}
    )
    (quota,) = usage.json()["data"]["usage"]["limits"]
    assert quota == {"scope": "quota", "used": chat["usage"]["totalTokens"]}
