"""The GraphQL door against the REST door's rules: keys checked per operation,
the body limit, the session header, request ids, and a client that leaves."""

from __future__ import annotations

import asyncio
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient

pytestmark = pytest.mark.unit

CHUNK = {
    "id": "c",
    "model": "smollm2",
    "created": 1,
    "choices": [{"index": 0, "delta": {"content": "x"}}],
}
STREAM = """subscription S($input: ChatCompletionInput!) {
  chatCompletionStream(input: $input) { choices { delta { content } } } }"""
CHAT = """mutation C($input: ChatCompletionInput!) {
  chatCompletion(input: $input) { choices { message { content } } } }"""
INPUT = {"model": "chat", "messages": [{"role": "user", "content": "hi"}]}


def _sse(*payloads: Any) -> list[bytes]:
    return [b"data: " + orjson.dumps(p) + b"\n\n" for p in payloads] + [
        b"data: [DONE]\n\n"
    ]


def test_a_key_revoked_while_a_socket_is_open_stops_working(kit: Any) -> None:
    harness = kit.build()
    harness.upstream.handler = lambda url, body: kit.reply(
        parts=_sse(CHUNK), content_type="text/event-stream"
    )
    with (
        TestClient(harness.app) as client,
        client.websocket_connect(
            "/graphql", subprotocols=["graphql-transport-ws"]
        ) as ws,
    ):
        auth = {"authorization": f"Bearer {kit.key}"}
        ws.send_json({"type": "connection_init", "payload": auth})
        assert ws.receive_json()["type"] == "connection_ack"

        def run(op: str) -> dict[str, Any]:
            payload = {"query": STREAM, "variables": {"input": INPUT}}
            ws.send_json({"id": op, "type": "subscribe", "payload": payload})
            first: dict[str, Any] = ws.receive_json()
            while first["type"] == "next" and ws.receive_json()["type"] != "complete":
                pass
            return first

        assert run("1")["type"] == "next"
        harness.keys.remove("alice")
        refused = run("2")
    assert refused["payload"]["errors"][0]["extensions"]["code"] == "invalid_api_key"
    assert len(harness.upstream.calls) == 1


async def test_a_body_over_the_limit_is_refused_as_on_rest(kit: Any) -> None:
    harness = kit.build()  # max_body_bytes 4096
    big = {"model": "chat", "messages": [{"role": "user", "content": "a" * 10_000}]}
    async with harness.client() as client:
        rest = await client.post("/v1/chat/completions", json=big)
        graphql = await client.post(
            "/graphql", json={"query": CHAT, "variables": {"input": big}}
        )
    assert rest.status_code == graphql.status_code == 413
    assert graphql.json()["error"]["code"] == "request_too_large"
    assert harness.upstream.calls == []
    assert kit.counted(harness, "413", door="graphql", model="unknown") == 1


async def test_the_session_header_reaches_the_router(kit: Any) -> None:
    harness = kit.build(kit.document(strategy="session-affinity"))
    router = harness.deps.proxy._router
    seen: list[str | None] = []
    choose = router.choose

    def spy(route: Any, request: Any, tried: Any) -> Any:
        seen.append(request.session)
        return choose(route, request, tried)

    router.choose = spy
    async with harness.client() as client:
        await client.post(
            "/graphql",
            json={"query": CHAT, "variables": {"input": INPUT}},
            headers={"x-session-id": "conv-1"},
        )
    assert seen == ["conv-1"]


async def test_each_model_call_of_a_document_has_its_own_request_id(
    kit: Any,
) -> None:
    harness = kit.build()
    both = """mutation C($input: ChatCompletionInput!) {
      a: chatCompletion(input: $input) { id } b: chatCompletion(input: $input) { id }
    }"""
    async with harness.client() as client:
        answer = await client.post(
            "/graphql",
            json={"query": both, "variables": {"input": INPUT}},
            headers={"x-request-id": "doc-1"},
        )
    ids = [headers["x-request-id"] for _, _, headers in harness.upstream.calls]
    assert answer.headers["x-request-id"] == "doc-1"
    assert ids == ["doc-1", "doc-1-2"]


class _Held:
    """A reply that never comes."""

    status = 200
    content_type = "application/json"

    def __init__(self) -> None:
        self.closed = False

    async def read(self) -> bytes:
        await asyncio.sleep(3600)
        return b""

    def close(self) -> None:
        self.closed = True


async def test_a_client_that_leaves_frees_the_replica(kit: Any) -> None:
    """uvicorn never cancels the app: the mutation must watch for the client."""
    harness = kit.build()
    harness.upstream.handler = lambda url, body: _Held()
    raw = orjson.dumps({"query": CHAT, "variables": {"input": INPUT}})
    messages = 0

    async def receive() -> Any:
        nonlocal messages
        messages += 1
        if messages == 1:
            return {"type": "http.request", "body": raw, "more_body": False}
        await asyncio.sleep(0.2)  # the client goes away
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    scope = kit.post_scope("/graphql", kit.key, len(raw))
    await asyncio.wait_for(harness.served(scope, receive, send), 5)
    replicas = harness.deps.catalog.all_replicas().values()
    assert sum(r.in_flight for r in replicas) == 0
    assert kit.counted(harness, "499", door="graphql", model="smollm2") == 1


async def test_a_client_gone_during_the_upload_is_counted_and_not_logged(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    harness = kit.build()

    async def receive() -> Any:
        return {"type": "http.disconnect"}

    async def send(message: Any) -> None:
        pass

    await harness.served(kit.post_scope("/graphql", kit.key), receive, send)
    assert not [r for r in caplog.records if r.levelname == "ERROR"]
    assert harness.upstream.calls == []
    assert kit.counted(harness, "499", door="graphql", model="unknown") == 1
