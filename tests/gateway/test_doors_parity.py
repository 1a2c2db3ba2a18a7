"""REST, gRPC and GraphQL give the same answers and share the same limits, and
the examples in docs/grpc.md and docs/graphql.md run as written."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import httpx
import openai
import pytest

from citadel.gateway.rpc.v1 import citadel_pb2 as pb
from citadel.gateway.rpc.v1 import citadel_pb2_grpc as pb_grpc

pytestmark = pytest.mark.integration

DOCS = Path(__file__).resolve().parents[2] / "docs"
CHAT = """
mutation Chat($input: ChatCompletionInput!) {
  chatCompletion(input: $input) {
    model choices { message { role content } finishReason }
    usage { promptTokens completionTokens }
  }
}
"""
USAGE = "{ usage { limits { scope window limit remaining used } } }"


@pytest.fixture
def doors(
    tmp_path: Path, start_backend: Any, start_gateway: Any, helpers: Any
) -> Iterator[dict[str, Any]]:
    backend = start_backend("a")
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "alice", "--rpm", "3", "--daily-tokens", "100000")
    port = helpers.free_port()
    gateway = start_gateway(
        [helpers.route("smol", [backend])], keys, grpc_port=str(port)
    )
    headers = {"authorization": f"Bearer {key}"}
    with (
        openai.OpenAI(base_url=gateway.url + "/v1", api_key=key, max_retries=0) as rest,
        httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as graphql,
        grpc.insecure_channel(f"127.0.0.1:{port}") as channel,
    ):
        yield {
            "rest": rest,
            "graphql": graphql,
            "grpc": pb_grpc.InferenceStub(channel),
            "metadata": tuple(headers.items()),
            "key": key,
            "gateway": gateway,
            "grpc_target": f"127.0.0.1:{port}",
        }


def ask_rest(doors: dict[str, Any]) -> dict[str, Any]:
    answer = doors["rest"].chat.completions.create(
        model="smol", messages=[{"role": "user", "content": "Say hi"}], max_tokens=3
    )
    choice = answer.choices[0]
    return {
        "model": answer.model,
        "content": choice.message.content,
        "role": choice.message.role,
        "finish": choice.finish_reason,
        "usage": (answer.usage.prompt_tokens, answer.usage.completion_tokens),
    }


def ask_grpc(doors: dict[str, Any]) -> dict[str, Any]:
    request = pb.ChatCompletionRequest(
        model="smol",
        messages=[pb.ChatMessage(role="user", content="Say hi")],
        sampling=pb.Sampling(max_tokens=3),
    )
    answer = doors["grpc"].ChatCompletion(request, metadata=doors["metadata"])
    choice = answer.choices[0]
    return {
        "model": answer.model,
        "content": choice.message.content,
        "role": choice.message.role,
        "finish": choice.finish_reason,
        "usage": (answer.usage.prompt_tokens, answer.usage.completion_tokens),
    }


def ask_graphql(doors: dict[str, Any]) -> dict[str, Any]:
    variables = {
        "input": {
            "model": "smol",
            "messages": [{"role": "user", "content": "Say hi"}],
            "maxTokens": 3,
        }
    }
    reply = doors["graphql"].post(
        "/graphql", json={"query": CHAT, "variables": variables}
    )
    body = reply.json()
    if "errors" in body:
        return {"error": body["errors"][0]["extensions"]["code"]}
    answer = body["data"]["chatCompletion"]
    choice = answer["choices"][0]
    return {
        "model": answer["model"],
        "content": choice["message"]["content"],
        "role": choice["message"]["role"],
        "finish": choice["finishReason"],
        "usage": (answer["usage"]["promptTokens"], answer["usage"]["completionTokens"]),
    }


def test_same_answers_same_limits_same_quota(doors: dict[str, Any]) -> None:
    answers = [ask_rest(doors), ask_grpc(doors), ask_graphql(doors)]
    assert answers[0] == answers[1] == answers[2]
    assert answers[0]["content"] == "w0 w1 w2"
    # rpm 3 is spent across the three doors: each now refuses.
    with pytest.raises(openai.RateLimitError):
        ask_rest(doors)
    with pytest.raises(grpc.RpcError) as caught:
        ask_grpc(doors)
    assert caught.value.code() is grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
    assert ask_graphql(doors) == {"error": "rate_limit_exceeded"}
    used = sum(sum(a["usage"]) for a in answers)
    limits = doors["graphql"].post("/graphql", json={"query": USAGE}).json()
    (quota,) = [x for x in limits["data"]["usage"]["limits"] if x["scope"] == "quota"]
    assert quota["used"] == used  # every door's tokens count against one quota
    text = httpx.get(doors["gateway"].url + "/metrics").text
    served = [
        line
        for line in text.splitlines()
        if line.startswith("citadel_gateway_requests_total{")
        and 'api="chat"' in line
        and 'status="200"' in line
    ]
    # One answer through each door, each counted under its own.
    assert sorted(
        (line.split('door="', 1)[1].split('"', 1)[0], float(line.rsplit(" ", 1)[1]))
        for line in served
    ) == [("graphql", 1.0), ("grpc", 1.0), ("rest", 1.0)]


@pytest.mark.parametrize("page", ["grpc.md", "graphql.md"])
def test_docs_examples_run(doors: dict[str, Any], page: str, tmp_path: Path) -> None:
    text = (DOCS / page).read_text()
    (code,) = re.findall(r"```python\n(.*?)```", text, re.DOTALL)
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {
        **os.environ,
        "PYTHONSAFEPATH": "1",
        "API_KEY": doors["key"],
        "GATEWAY_URL": doors["gateway"].url,
        "GRPC_TARGET": doors["grpc_target"],
    }
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
        check=True,
    ).stdout
    assert "w0" in out
