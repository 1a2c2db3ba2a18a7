"""The GraphQL door of a real gateway process: httpx for queries and the
mutation, a `graphql-transport-ws` WebSocket client for the subscription."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.exceptions import ConnectionClosedError
from websockets.sync.client import connect

pytestmark = pytest.mark.integration

CHAT = """
mutation Chat($input: ChatCompletionInput!) {
  chatCompletion(input: $input) {
    id model choices { index message { role content } finishReason }
    usage { promptTokens completionTokens totalTokens }
  }
}
"""
STREAM = """
subscription Stream($input: ChatCompletionInput!) {
  chatCompletionStream(input: $input) {
    choices { delta { content } } usage { completionTokens }
  }
}
"""
MODELS = (
    "{ models { id aliases ready readyReplicas replicas strategy limits { rpm } } }"
)
USAGE = """
{ usage { key role limits { scope window model limit remaining used } } }
"""


def chat_input(model: str = "chat", **extra: Any) -> dict[str, Any]:
    return {
        "model": model,
        "messages": [{"role": "user", "content": "Say hi"}],
        "maxTokens": 3,
        "extra": extra or None,
    }


@pytest.fixture
def setup(
    tmp_path: Path, start_backend: Any, start_gateway: Any, helpers: Any
) -> Iterator[dict[str, Any]]:
    backend = start_backend("a")
    keys = tmp_path / "keys.json"
    key = helpers.create_key(
        keys, "alice", "--models", "smol*", "chat", "--daily-tokens", "1000"
    )
    limited = helpers.create_key(keys, "limited", "--rpm", "1")
    models = [
        helpers.route("smol", [backend], aliases=["chat"], readyReplicas=1),
        helpers.route("other", [backend], limits={"rpm": 50}),
    ]
    gateway = start_gateway(models, keys)
    headers = {"authorization": f"Bearer {key}"}
    with httpx.Client(base_url=gateway.url, headers=headers, timeout=30) as client:
        yield {
            "backend": backend,
            "gateway": gateway,
            "client": client,
            "key": key,
            "limited": limited,
        }


def test_models_are_those_the_key_may_use(setup: dict[str, Any]) -> None:
    reply = setup["client"].post("/graphql", json={"query": MODELS})
    assert reply.status_code == 200
    assert reply.headers["x-citadel-api-version"] == "v1"
    models = reply.json()["data"]["models"]
    assert models == [
        {
            "id": "smol",
            "aliases": ["chat"],
            "ready": True,
            "readyReplicas": 1,
            "replicas": 1,
            "strategy": "prefix-aware",
            "limits": {"rpm": None},
        }
    ]


def test_chat_mutation_and_usage_count_against_the_quota(
    setup: dict[str, Any],
) -> None:
    client = setup["client"]
    reply = client.post(
        "/graphql",
        json={"query": CHAT, "variables": {"input": chat_input(top_k=5)}},
        headers={"x-request-id": "gql-1"},
    )
    assert reply.headers["x-request-id"] == "gql-1"
    chat = reply.json()["data"]["chatCompletion"]
    assert chat["model"] == "smol"
    assert chat["choices"][0]["message"] == {"role": "assistant", "content": "w0 w1 w2"}
    total = chat["usage"]["totalTokens"]
    sent = setup["backend"].received()[0]["body"]
    assert sent["top_k"] == 5 and sent["max_tokens"] == 3
    usage = client.post("/graphql", json={"query": USAGE}).json()["data"]["usage"]
    assert usage["key"] == "alice"
    (quota,) = [lim for lim in usage["limits"] if lim["scope"] == "quota"]
    assert quota == {
        "scope": "quota",
        "window": "day",
        "model": None,
        "limit": 1000,
        "remaining": 1000 - total,
        "used": total,
    }


def test_errors_carry_the_rest_error_in_extensions(setup: dict[str, Any]) -> None:
    client = setup["client"]
    denied = client.post(
        "/graphql", json={"query": CHAT, "variables": {"input": chat_input("other")}}
    ).json()
    (error,) = denied["errors"]
    assert error["extensions"]["code"] == "model_not_allowed"
    assert error["extensions"]["status"] == 403
    unknown = client.post(
        "/graphql", json={"query": CHAT, "variables": {"input": chat_input("nope")}}
    ).json()
    assert unknown["errors"][0]["extensions"]["code"] == "model_not_found"
    bad_key = httpx.post(
        setup["gateway"].url + "/graphql",
        json={"query": MODELS},
        headers={"authorization": "Bearer wrong"},
    )
    assert bad_key.status_code == 401
    (error,) = bad_key.json()["errors"]  # the door's shape, as every other error
    assert error["extensions"]["code"] == "invalid_api_key"
    assert error["extensions"]["status"] == 401


def test_rate_limit_in_extensions(setup: dict[str, Any]) -> None:
    headers = {"authorization": f"Bearer {setup['limited']}"}
    body = {"query": CHAT, "variables": {"input": chat_input("smol")}}
    client = setup["client"]
    first = client.post("/graphql", json=body, headers=headers)
    assert first.headers["x-ratelimit-limit-requests"] == "1"
    second = client.post("/graphql", json=body, headers=headers).json()
    extensions = second["errors"][0]["extensions"]
    assert extensions["code"] == "rate_limit_exceeded"
    assert extensions["status"] == 429
    assert int(extensions["retryAfter"]) >= 1


def test_depth_tokens_and_aliases_are_bounded(setup: dict[str, Any]) -> None:
    client = setup["client"]
    aliases = " ".join(f"a{i}: apiVersion" for i in range(10))
    many = client.post("/graphql", json={"query": "{ " + aliases + " }"}).json()
    assert "aliases" in many["errors"][0]["message"]
    long = "{ " + " ".join(["apiVersion"] * 2500) + " }"
    tokens = client.post("/graphql", json={"query": long}).json()
    assert "token" in tokens["errors"][0]["message"].lower()


def test_subscription_streams_chunks(setup: dict[str, Any]) -> None:
    url = setup["gateway"].url.replace("http://", "ws://") + "/graphql"
    with connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        ws.send(
            json.dumps(
                {
                    "type": "connection_init",
                    "payload": {"authorization": f"Bearer {setup['key']}"},
                }
            )
        )
        assert json.loads(ws.recv(timeout=30))["type"] == "connection_ack"
        ws.send(
            json.dumps(
                {
                    "id": "1",
                    "type": "subscribe",
                    "payload": {"query": STREAM, "variables": {"input": chat_input()}},
                }
            )
        )
        chunks = []
        while True:
            message = json.loads(ws.recv(timeout=30))
            if message["type"] == "complete":
                break
            assert message["type"] == "next", message
            chunks.append(message["payload"]["data"]["chatCompletionStream"])
    words = [c["choices"][0]["delta"]["content"] for c in chunks if c["choices"]]
    assert words == ["w0 ", "w1 ", "w2 "]
    assert chunks[-1]["usage"]["completionTokens"] == 3


def test_a_refused_key_over_http_is_counted(setup: dict[str, Any]) -> None:
    counted = 'citadel_gateway_requests_total{api="chat",door="graphql",key="anonymous"'
    before = setup["gateway"].metric(counted)
    refused = httpx.post(
        setup["gateway"].url + "/graphql",
        json={"query": MODELS},
        headers={"authorization": "Bearer wrong"},
    )
    assert refused.status_code == 401
    assert setup["gateway"].metric(counted) == before + 1


def test_a_refused_key_over_websocket_is_counted(setup: dict[str, Any]) -> None:
    url = setup["gateway"].url.replace("http://", "ws://") + "/graphql"
    with connect(url, subprotocols=["graphql-transport-ws"]) as ws:  # type: ignore[list-item]
        init = {"type": "connection_init", "payload": {"authorization": "Bearer no"}}
        ws.send(json.dumps(init))
        with pytest.raises(ConnectionClosedError) as closed:
            ws.recv(timeout=30)  # refused at connection_init: never acknowledged
    assert closed.value.rcvd is not None
    assert closed.value.rcvd.code == 4403
    counted = 'citadel_gateway_requests_total{api="chat",door="graphql",key="anonymous"'
    assert setup["gateway"].metric(counted) == 1
