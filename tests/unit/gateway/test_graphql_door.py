"""The GraphQL door against the REST door's rules: keys checked per operation,
a WebSocket refused without a valid key, the body limit, the session header,
request ids, and a client that leaves."""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import time
from collections.abc import Callable, Iterator
from typing import Any

import orjson
import pytest
from starlette.testclient import TestClient
from starlette.websockets import WebSocketDisconnect

from citadel.gateway.app import create_app, serving
from citadel.gateway.services.buckets import StoreUnavailable
from citadel.gateway.services.sockets import SocketCounts
from citadel.gateway.settings import GatewaySettings
from citadel.gateway.upstream import UpstreamBroken

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
PROTOCOLS = ["graphql-transport-ws", "graphql-ws"]
# How each protocol refuses a connection_init without a valid key: the code
# graphql-transport-ws names for it, and the older protocol's reference server's
# (after its `connection_error` message).
REFUSED = {"graphql-transport-ws": 4403, "graphql-ws": 1011}


def _sse(*payloads: Any) -> list[bytes]:
    return [b"data: " + orjson.dumps(p) + b"\n\n" for p in payloads] + [
        b"data: [DONE]\n\n"
    ]


# What starts an operation, on each protocol.
START = {"graphql-transport-ws": "subscribe", "graphql-ws": "start"}


@pytest.mark.parametrize(
    ("protocol", "document"),
    [
        ("graphql-transport-ws", STREAM),
        # Operations that reach no model, and so check no key themselves.
        ("graphql-transport-ws", "{ apiVersion }"),
        ("graphql-transport-ws", "{ __schema { queryType { name } } }"),
        ("graphql-ws", STREAM),  # the older protocol runs subscriptions only
    ],
)
def test_a_key_revoked_while_a_socket_is_open_stops_every_operation(
    kit: Any, protocol: str, document: str
) -> None:
    harness = kit.build()
    harness.upstream.handler = lambda url, body: kit.reply(
        parts=_sse(CHUNK), content_type="text/event-stream"
    )
    with (
        TestClient(harness.app) as client,
        client.websocket_connect("/graphql", subprotocols=[protocol]) as ws,
    ):
        auth = {"authorization": f"Bearer {kit.key}"}
        ws.send_json({"type": "connection_init", "payload": auth})
        assert ws.receive_json()["type"] == "connection_ack"

        def run(op: str, query: str) -> list[dict[str, Any]]:
            """The operation's messages, up to its last."""
            payload = {"query": query, "variables": {"input": INPUT}}
            ws.send_json({"id": op, "type": START[protocol], "payload": payload})
            messages = [ws.receive_json()]
            while messages[-1]["type"] not in ("complete", "error"):
                messages.append(ws.receive_json())
            return messages

        assert [m["type"] for m in run("1", STREAM)][-1] == "complete"
        harness.keys.remove("alice")
        refused = run("2", document)
    # Refused before it runs, with REST's 401 (graphql-transport-ws sends a
    # list of errors, graphql-ws one).
    assert [m["type"] for m in refused] == ["error"]
    errors = refused[0]["payload"]
    error = errors[0] if isinstance(errors, list) else errors
    assert error["extensions"]["code"] == "invalid_api_key"
    assert error["extensions"]["status"] == 401
    assert len(harness.upstream.calls) == 1
    assert _refused_sockets(harness) == 1


def _refused_sockets(harness: Any) -> float | None:
    """Sockets refused for their key, counted as REST counts a 401."""
    labels = {"api": "chat", "model": "unknown", "status": "401"}
    labels.update(key="anonymous", door="graphql")
    sample = harness.deps.metrics.registry.get_sample_value
    return sample("citadel_gateway_requests_total", labels)  # type: ignore[no-any-return]


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("authorization", [None, "Bearer ctd-wrong"])
def test_a_socket_without_a_valid_key_is_closed_at_connection_init(
    kit: Any, protocol: str, authorization: str | None
) -> None:
    """A socket that never runs an operation must not stay open on a bad key."""
    harness = kit.build()
    payload = {} if authorization is None else {"authorization": authorization}
    with (
        TestClient(harness.app) as client,
        client.websocket_connect("/graphql", subprotocols=[protocol]) as ws,
    ):
        ws.send_json({"type": "connection_init", "payload": payload})
        if protocol == "graphql-ws":  # says why before it closes
            error = ws.receive_json()
            assert error["type"] == "connection_error"
            assert error["payload"]["extensions"]["code"] == "invalid_api_key"
        with pytest.raises(WebSocketDisconnect) as closed:
            ws.receive_json()
    assert closed.value.code == REFUSED[protocol]
    assert _refused_sockets(harness) == 1


def test_a_key_in_the_handshake_header_opens_a_socket(kit: Any) -> None:
    harness = kit.build()
    harness.upstream.handler = lambda url, body: kit.reply(
        parts=_sse(CHUNK), content_type="text/event-stream"
    )
    headers = {"authorization": f"Bearer {kit.key}"}
    payload = {"query": STREAM, "variables": {"input": INPUT}}
    with (
        TestClient(harness.app) as client,
        client.websocket_connect(
            "/graphql", subprotocols=["graphql-transport-ws"], headers=headers
        ) as ws,
    ):
        ws.send_json({"type": "connection_init"})
        assert ws.receive_json()["type"] == "connection_ack"
        ws.send_json({"id": "1", "type": "subscribe", "payload": payload})
        assert ws.receive_json()["type"] == "next"
        assert ws.receive_json()["type"] == "complete"
    assert _refused_sockets(harness) is None


def test_the_older_protocol_streams_with_a_key_in_connection_init(kit: Any) -> None:
    harness = kit.build()
    harness.upstream.handler = lambda url, body: kit.reply(
        parts=_sse(CHUNK), content_type="text/event-stream"
    )
    auth = {"authorization": f"Bearer {kit.key}"}
    payload = {"query": STREAM, "variables": {"input": INPUT}}
    with (
        TestClient(harness.app) as client,
        client.websocket_connect("/graphql", subprotocols=["graphql-ws"]) as ws,
    ):
        ws.send_json({"type": "connection_init", "payload": auth})
        assert ws.receive_json()["type"] == "connection_ack"
        ws.send_json({"id": "1", "type": "start", "payload": payload})
        data = ws.receive_json()
        assert ws.receive_json()["type"] == "complete"
    chunk = data["payload"]["data"]["chatCompletionStream"]
    assert chunk["choices"][0]["delta"]["content"] == "x"
    assert len(harness.upstream.calls) == 1


def _open_socket(
    client: TestClient, protocol: str, key: str
) -> contextlib.AbstractContextManager[Any]:
    """A socket of `key`, past its `connection_init` (acknowledged or not)."""

    @contextlib.contextmanager
    def opened() -> Iterator[Any]:
        with client.websocket_connect("/graphql", subprotocols=[protocol]) as ws:
            auth = {"authorization": f"Bearer {key}"}
            ws.send_json({"type": "connection_init", "payload": auth})
            yield ws

    return opened()


def _until(check: Callable[[], bool]) -> bool:
    """Whether `check` comes true within 5 s (the server ends a socket in its
    own thread, after the client's side is done with it)."""
    deadline = time.monotonic() + 5
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_a_key_past_its_sockets_is_refused_until_one_closes(
    kit: Any, protocol: str
) -> None:
    harness = kit.build()
    harness.deps.sockets = SocketCounts(2)
    with TestClient(harness.app) as client:
        with (
            _open_socket(client, protocol, kit.key) as first,
            _open_socket(client, protocol, kit.key) as second,
        ):
            assert first.receive_json()["type"] == "connection_ack"
            assert second.receive_json()["type"] == "connection_ack"
            with _open_socket(client, protocol, kit.key) as third:
                if protocol == "graphql-ws":  # says why before it closes
                    error = third.receive_json()
                    assert error["type"] == "connection_error"
                    extensions = error["payload"]["extensions"]
                    assert extensions["code"] == "too_many_sockets"
                    assert extensions["status"] == 429
                with pytest.raises(WebSocketDisconnect) as closed:
                    third.receive_json()
            assert closed.value.code == 4429
            # Another key has a cap of its own.
            with _open_socket(client, protocol, kit.admin_key) as other:
                assert other.receive_json()["type"] == "connection_ack"
            assert harness.deps.sockets.held("alice") == 2
        # Both closed: the key may open two again.
        assert _until(lambda: harness.deps.sockets.held("alice") == 0)
        with (
            _open_socket(client, protocol, kit.key) as first,
            _open_socket(client, protocol, kit.key) as second,
        ):
            assert first.receive_json()["type"] == "connection_ack"
            assert second.receive_json()["type"] == "connection_ack"
    # The refusal counted as REST counts a 429, under the key's name.
    assert kit.counted(harness, "429", door="graphql", model="unknown") == 1


# How the gateway closes a socket on each protocol: a message it does not
# know (graphql-transport-ws closes with 4400), `connection_terminate`.
GATEWAY_CLOSES = {
    "graphql-transport-ws": ({"type": "no-such-message"}, 4400),
    "graphql-ws": ({"type": "connection_terminate"}, 1000),
}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("ending", ["client", "gateway", "revoked", "error"])
def test_a_socket_counts_until_it_closes_however_it_does(
    kit: Any, protocol: str, ending: str
) -> None:
    harness = kit.build()
    harness.deps.sockets = SocketCounts(1)
    harness.upstream.handler = lambda url, body: kit.reply(
        parts=_sse(CHUNK), content_type="text/event-stream"
    )
    # An error in the gateway ends the socket, and comes to the test client as
    # the socket ends.
    fails = ending == "error"
    ended = pytest.raises(RuntimeError, match="a bug") if fails else None
    with TestClient(harness.app) as client:
        with (
            ended or contextlib.nullcontext(),
            _open_socket(client, protocol, kit.key) as ws,
        ):
            assert ws.receive_json()["type"] == "connection_ack"
            assert harness.deps.sockets.held("alice") == 1
            if ending == "gateway":
                message, code = GATEWAY_CLOSES[protocol]
                ws.send_json(message)
                with pytest.raises(WebSocketDisconnect) as closed:
                    ws.receive_json()
                assert closed.value.code == code
            elif ending == "revoked":
                # Revoked while open: still counted under the key it opened with.
                harness.keys.remove("alice")
                assert harness.deps.sockets.held("alice") == 1
            elif ending == "error":

                def fail(authorization: str | None) -> Any:
                    raise RuntimeError("a bug in the gateway")

                # The next operation's key check fails unexpectedly.
                harness.deps.authenticator.authenticate = fail
                payload = {"query": STREAM, "variables": {"input": INPUT}}
                ws.send_json({"id": "1", "type": START[protocol], "payload": payload})
        assert _until(lambda: harness.deps.sockets.held("alice") == 0)


def test_a_socket_initialised_again_with_another_key_counts_under_it(
    kit: Any,
) -> None:
    """The older protocol takes a second connection_init, whose key then runs
    the socket's operations: counted under the first key, a socket let the
    second hold one past its cap."""
    harness = kit.build()
    harness.deps.sockets = SocketCounts(1)
    protocol = "graphql-ws"
    with (
        TestClient(harness.app) as client,
        _open_socket(client, protocol, kit.key) as first,
    ):
        assert first.receive_json()["type"] == "connection_ack"
        with _open_socket(client, protocol, kit.admin_key) as other:
            assert other.receive_json()["type"] == "connection_ack"
            auth = {"authorization": f"Bearer {kit.key}"}
            other.send_json({"type": "connection_init", "payload": auth})
            error = other.receive_json()
            assert error["type"] == "connection_error"
            assert error["payload"]["extensions"]["code"] == "too_many_sockets"
            with pytest.raises(WebSocketDisconnect) as closed:
                other.receive_json()
            assert closed.value.code == 4429
        assert _until(lambda: harness.deps.sockets.held("admin") == 0)
        assert harness.deps.sockets.held("alice") == 1


def test_sockets_without_keys_have_no_cap(kit: Any) -> None:
    """With auth disabled every socket is anonymous: one cap for them all
    would let anyone hold every other client out."""
    harness = kit.build(auth=False)
    harness.deps.sockets = SocketCounts(1)
    protocol = "graphql-transport-ws"
    with (
        TestClient(harness.app) as client,
        _open_socket(client, protocol, "") as first,
        _open_socket(client, protocol, "") as second,
    ):
        assert first.receive_json()["type"] == "connection_ack"
        assert second.receive_json()["type"] == "connection_ack"


@pytest.mark.parametrize("protocol", PROTOCOLS)
async def test_a_socket_that_never_sends_connection_init_is_closed(
    kit: Any, protocol: str
) -> None:
    harness = kit.build()
    settings = GatewaySettings(routes_source="file", graphql_init_timeout_s=0.1)
    app = serving(create_app(settings, harness.deps))
    sent: list[dict[str, Any]] = []
    closed = asyncio.Event()

    async def receive() -> Any:
        if not sent:  # the handshake
            return {"type": "websocket.connect"}
        await closed.wait()  # silent until the gateway closes the socket
        return {"type": "websocket.disconnect", "code": 1000}

    async def send(message: Any) -> None:
        sent.append(message)
        if message["type"] == "websocket.close":
            closed.set()

    scope = {
        "type": "websocket",
        "asgi": {"version": "3.0"},
        "scheme": "ws",
        "path": "/graphql",
        "raw_path": b"/graphql",
        "query_string": b"",
        "root_path": "",
        "headers": [(b"sec-websocket-protocol", protocol.encode())],
        "subprotocols": [protocol],
        "server": ("gateway", 80),
        "client": ("client", 1234),
    }
    await asyncio.wait_for(app(scope, receive, send), 5)
    assert [m["type"] for m in sent] == ["websocket.accept", "websocket.close"]
    assert sent[-1]["code"] == 4408


async def test_a_body_over_the_limit_is_refused_as_on_rest(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness = kit.build()  # max_body_bytes 4096
    big = {"model": "chat", "messages": [{"role": "user", "content": "a" * 10_000}]}
    async with harness.client() as client:
        rest = await client.post("/v1/chat/completions", json=big)
        graphql = await client.post(
            "/graphql",
            json={"query": CHAT, "variables": {"input": big}},
            headers={"x-request-id": "big-1"},
        )
    assert rest.status_code == graphql.status_code == 413
    # REST's shape on REST, the door's own on GraphQL, as every other error.
    assert rest.json()["error"]["code"] == "request_too_large"
    _as_rest_in_door_shape(graphql, rest, "big-1", 413, "request_too_large")
    assert harness.upstream.calls == []
    assert kit.counted(harness, "413", door="graphql", model="unknown") == 1
    assert _access(caplog) == [(413, "request_too_large")] * 2  # REST's, GraphQL's


def _as_rest_in_door_shape(
    answer: Any, rest: Any, request_id: str, status: int, code: str
) -> None:
    """GraphQL's answer is REST's error (`rest`) in the door's own shape."""
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-request-id"] == request_id
    (error,) = answer.json()["errors"]
    assert error["message"] == rest.json()["error"]["message"]
    extensions = error["extensions"]
    assert (extensions["status"], extensions["code"]) == (status, code)


@pytest.mark.parametrize(
    "authorization", ["", "Bearer ctd-wrong"], ids=["no key", "a bad key"]
)
@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_a_refused_key_over_http_is_a_graphql_error_counted_as_on_rest(
    kit: Any, caplog: pytest.LogCaptureFixture, authorization: str, method: str
) -> None:
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness = kit.build()
    headers = {"authorization": authorization, "x-request-id": "key-1"}
    async with harness.client() as client:
        rest = await client.post("/v1/chat/completions", json=kit.chat, headers=headers)
        answer = await client.request(
            method,
            "/graphql",
            params={"query": "{ apiVersion }"} if method == "GET" else None,
            json={"query": CHAT, "variables": {"input": INPUT}}
            if method == "POST"
            else None,
            headers=headers,
        )
    assert answer.status_code == rest.status_code == 401
    assert rest.json()["error"]["code"] == "invalid_api_key"  # REST unchanged
    _as_rest_in_door_shape(answer, rest, "key-1", 401, "invalid_api_key")
    assert "ctd-wrong" not in answer.text
    assert harness.upstream.calls == []
    labels = {"api": "chat", "model": "unknown", "status": "401"}
    labels.update(key="anonymous", door="graphql")
    sample = harness.deps.metrics.registry.get_sample_value
    assert sample("citadel_gateway_requests_total", labels) == 1
    assert _access(caplog) == [(401, "invalid_api_key")] * 2  # REST's, GraphQL's


@pytest.mark.parametrize(
    ("sent", "routed"),
    [
        ("conv-1", "conv-1"),
        # One that is no id reaches it hashed.
        ("x" * 4096, "sha256:" + hashlib.sha256(b"x" * 4096).hexdigest()),
    ],
    ids=["an id", "no id"],
)
async def test_the_session_header_reaches_the_router(
    kit: Any, sent: str, routed: str
) -> None:
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
            headers={"x-session-id": sent},
        )
    assert seen == [routed]


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
    retry_after = None

    def __init__(self) -> None:
        self.closed = False

    async def read(self, timeout_s: float | None = None) -> bytes:
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


async def test_a_failed_call_of_a_document_keeps_the_answers_before_it(
    kit: Any,
) -> None:
    # Charged for `a` and `b`, the caller must get them: the error nulls only
    # the field that failed, not the whole of `data`.
    harness = kit.build(kit.document(limits={"rpm": 2}))
    three = """mutation C($input: ChatCompletionInput!) {
      a: chatCompletion(input: $input) { model }
      b: chatCompletion(input: $input) { model }
      c: chatCompletion(input: $input) { model }
    }"""
    async with harness.client() as client:
        answer = await client.post(
            "/graphql", json={"query": three, "variables": {"input": INPUT}}
        )
    body = answer.json()
    done = {"model": "smollm2"}
    assert body["data"] == {"a": done, "b": done, "c": None}
    (error,) = body["errors"]
    assert error["path"] == ["c"]
    assert error["extensions"]["code"] == "rate_limit_exceeded"
    assert len(harness.upstream.calls) == 2


async def test_retry_after_is_a_number_of_seconds_as_in_its_header(
    kit: Any,
) -> None:
    harness = kit.build(kit.document(limits={"rpm": 1}))
    async with harness.client() as client:
        for _ in "ab":
            answer = await client.post(
                "/graphql", json={"query": CHAT, "variables": {"input": INPUT}}
            )
    extensions = answer.json()["errors"][0]["extensions"]
    assert extensions["retryAfter"] == 60
    assert extensions["headers"]["retry-after"] == "60"


async def test_a_replicas_own_refusal_carries_the_limit_values_as_on_rest(
    kit: Any,
) -> None:
    # The estimate was given back when the replica refused: the values say so,
    # as REST's headers do.
    harness = kit.build(kit.document(limits={"tpm": 1000}))
    refusal = {"error": {"message": "max_tokens too large", "param": "max_tokens"}}
    harness.upstream.handler = lambda url, body: kit.reply(400, orjson.dumps(refusal))
    big = {**INPUT, "maxTokens": 500}
    async with harness.client() as client:
        rest = await client.post(
            "/v1/chat/completions", json={**kit.chat, "max_tokens": 500}
        )
        graphql = await client.post(
            "/graphql", json={"query": CHAT, "variables": {"input": big}}
        )
    extensions = graphql.json()["errors"][0]["extensions"]
    assert (extensions["status"], extensions["param"]) == (400, "max_tokens")
    limits = {k: v for k, v in rest.headers.items() if k.startswith("x-ratelimit-")}
    assert limits["x-ratelimit-remaining-tokens"] == "1000"
    assert {k: extensions["headers"].get(k) for k in limits} == limits


@pytest.mark.parametrize(
    ("status", "retry_after", "expected"),
    [
        (404, None, (404, "model_not_found", None)),
        (429, "7", (429, "rate_limit_exceeded", 7)),
    ],
    ids=["model unknown to the replica", "replica busy"],
)
async def test_a_replicas_own_404_and_429_keep_their_status_as_on_rest(
    kit: Any, status: int, retry_after: str | None, expected: tuple[Any, ...]
) -> None:
    harness = kit.build()
    said = {"error": {"message": f"The replica said {status}."}}
    harness.upstream.handler = lambda url, sent: kit.reply(
        status, orjson.dumps(said), retry_after=retry_after
    )
    async with harness.client() as client:
        answer = await client.post(
            "/graphql", json={"query": CHAT, "variables": {"input": INPUT}}
        )
    (error,) = answer.json()["errors"]
    assert error["message"] == f"The replica said {status}."
    extensions = error["extensions"]
    got = (extensions["status"], extensions["code"], extensions.get("retryAfter"))
    assert got == expected
    assert kit.counted(harness, str(status), door="graphql") == 1


def _errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]


def _access(caplog: pytest.LogCaptureFixture) -> list[tuple[Any, Any]]:
    """The status and code of each access-log line."""
    return [
        (getattr(r, "status", None), getattr(r, "code", None))
        for r in caplog.records
        if r.name == "citadel.gateway.access" and r.getMessage() == "request"
    ]


async def test_an_integer_json_cannot_carry_is_refused_as_on_rest(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # orjson writes integers up to 64 bits: a bigger one in `extra` is the
    # caller's mistake (REST's 400), not the gateway's failure.
    harness = kit.build()
    variables = {"input": {**INPUT, "extra": {"max_tokens": 10**30}}}
    raw = json.dumps({"query": CHAT, "variables": variables})  # orjson cannot
    async with harness.client() as client:
        answer = await client.post(
            "/graphql", content=raw, headers={"content-type": "application/json"}
        )
    extensions = answer.json()["errors"][0]["extensions"]
    assert (extensions["status"], extensions["type"]) == (400, "invalid_request_error")
    assert harness.upstream.calls == []
    assert kit.counted(harness, "400", door="graphql", model="unknown") == 1
    assert _errors_logged(caplog) == []


UNFIT = {
    "id": "c",
    "model": "smollm2",
    "created": 1,
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
    "usage": {"prompt_tokens": 7, "completion_tokens": 3},
}


@pytest.mark.parametrize(
    "change",
    [
        {"created": "yesterday"},
        {"created": 2**40},  # GraphQL's Int is 32-bit
        {"choices": [{"index": 0, "message": {"content": {"text": "hi"}}}]},
    ],
    ids=["not a number", "too big for Int", "not a string"],
)
async def test_an_answer_that_does_not_fit_the_schema_is_counted_as_its_502(
    kit: Any, caplog: pytest.LogCaptureFixture, change: dict[str, Any]
) -> None:
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness = kit.build()
    unfit = orjson.dumps({**UNFIT, **change})
    harness.upstream.handler = lambda url, body: kit.reply(body=unfit)
    query = """mutation C($input: ChatCompletionInput!) {
      chatCompletion(input: $input) { created choices { message { content } } } }"""
    async with harness.client() as client:
        answer = await client.post(
            "/graphql", json={"query": query, "variables": {"input": INPUT}}
        )
    extensions = answer.json()["errors"][0]["extensions"]
    assert (extensions["status"], extensions["code"]) == (502, "backend_error")
    assert kit.counted(harness, "502", door="graphql") == 1
    assert kit.counted(harness, "200", door="graphql") is None
    assert _access(caplog) == [(502, "backend_error")]
    assert _errors_logged(caplog) == []
    # The replica did the work it reports: the key pays for it.
    sample = harness.deps.metrics.registry.get_sample_value
    tokens = {"model": "smollm2", "key": "alice", "kind": "prompt"}
    assert sample("citadel_gateway_tokens_total", tokens) == 7


def test_a_chunk_that_does_not_fit_ends_the_stream_counted_as_its_502(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness = kit.build()
    reply = kit.reply(
        parts=_sse(CHUNK, {**CHUNK, "created": "x"}, CHUNK),
        content_type="text/event-stream",
    )
    harness.upstream.handler = lambda url, body: reply
    auth = {"authorization": f"Bearer {kit.key}"}
    payload = {"query": STREAM, "variables": {"input": INPUT}}
    with (
        TestClient(harness.app) as client,
        client.websocket_connect(
            "/graphql", subprotocols=["graphql-transport-ws"]
        ) as ws,
    ):
        ws.send_json({"type": "connection_init", "payload": auth})
        assert ws.receive_json()["type"] == "connection_ack"
        ws.send_json({"id": "1", "type": "subscribe", "payload": payload})
        first, broken = ws.receive_json(), ws.receive_json()
        assert ws.receive_json()["type"] == "complete"
    assert first["payload"]["data"]["chatCompletionStream"] is not None
    extensions = broken["payload"]["errors"][0]["extensions"]
    assert (extensions["status"], extensions["code"]) == (502, "backend_error")
    # Not 200 `client_closed`: the client did not leave, the replica's answer
    # could not be used.
    assert kit.counted(harness, "502", door="graphql") == 1
    assert kit.counted(harness, "200", door="graphql") is None
    assert _access(caplog) == [(502, "backend_error")]
    assert _errors_logged(caplog) == []
    assert reply.closed


def test_a_stream_broken_before_its_first_chunk_is_answered_by_another(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica that dies before its first event sent the client nothing:
    another replica answers, and the subscription gets its chunks, not an
    error."""
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness = kit.build()
    broken = kit.reply(
        parts=[UpstreamBroken("the response broke off")],
        content_type="text/event-stream",
    )
    whole = kit.reply(parts=_sse(CHUNK, CHUNK), content_type="text/event-stream")
    harness.upstream.handler = lambda url, body: (
        broken if len(harness.upstream.calls) == 1 else whole
    )
    auth = {"authorization": f"Bearer {kit.key}"}
    payload = {"query": STREAM, "variables": {"input": INPUT}}
    with (
        TestClient(harness.app) as client,
        client.websocket_connect(
            "/graphql", subprotocols=["graphql-transport-ws"]
        ) as ws,
    ):
        ws.send_json({"type": "connection_init", "payload": auth})
        assert ws.receive_json()["type"] == "connection_ack"
        ws.send_json({"id": "1", "type": "subscribe", "payload": payload})
        messages = [ws.receive_json()]
        while messages[-1]["type"] not in ("complete", "error"):
            messages.append(ws.receive_json())
    assert [m["type"] for m in messages] == ["next", "next", "complete"]
    assert all("errors" not in m["payload"] for m in messages[:-1])
    assert len(harness.upstream.calls) == 2
    assert kit.counted(harness, "200", door="graphql") == 1
    assert _access(caplog) == [(200, None)]


async def test_a_body_nested_too_deeply_is_refused_as_on_rest(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # JSON's `extra` nests 300 levels: more than orjson writes (254).
    harness = kit.build()
    deep = "[" * 300 + "]" * 300
    inputs = json.dumps(INPUT)[:-1] + f', "extra": {{"deep": {deep}}}}}'
    raw = f'{{"query": {json.dumps(CHAT)}, "variables": {{"input": {inputs}}}}}'
    rest_raw = orjson.dumps(kit.chat)[:-1] + b', "deep": ' + deep.encode() + b"}"
    json_type = {"content-type": "application/json"}
    async with harness.client() as client:
        rest = await client.post(
            "/v1/chat/completions", content=rest_raw, headers=json_type
        )
        answer = await client.post("/graphql", content=raw, headers=json_type)
    error = answer.json()["errors"][0]
    assert error["message"] == rest.json()["error"]["message"]
    extensions = error["extensions"]
    assert (extensions["status"], extensions["type"]) == (400, "invalid_request_error")
    assert harness.upstream.calls == []
    assert kit.counted(harness, "400", door="graphql", model="unknown") == 1
    assert _errors_logged(caplog) == []


@pytest.mark.parametrize(
    "raw",
    [
        b'{"query": ',
        # Deeper than the JSON reader recurses: still the caller's mistake.
        f'{{"query": {json.dumps(CHAT)}, "variables": {{"input": '.encode()
        + b"[" * 1500
        + b"]" * 1500
        + b"}}",
        # Bytes that are no UTF-8: the reader decodes before it parses.
        b'{"query": "\xff"}',
    ],
    ids=["malformed", "nested past what python reads", "not utf-8"],
)
async def test_a_body_that_is_no_json_is_a_graphql_error_counted_as_on_rest(
    kit: Any, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    # Not strawberry's plain text, uncounted: the door's JSON errors, with
    # REST's status and message, counted as REST counts its 400.
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness = kit.build()
    json_type = {"content-type": "application/json", "x-request-id": "bad-1"}
    async with harness.client() as client:
        rest = await client.post(
            "/v1/chat/completions", content=b'{"model": ', headers=json_type
        )
        answer = await client.post("/graphql", content=raw, headers=json_type)
    assert answer.status_code == rest.status_code == 400
    assert answer.headers["content-type"] == "application/json"
    assert answer.headers["x-request-id"] == "bad-1"
    (error,) = answer.json()["errors"]
    said = "We could not parse the JSON body of your request"
    assert error["message"].startswith(said)
    assert rest.json()["error"]["message"].startswith(said)
    extensions = error["extensions"]
    assert (extensions["status"], extensions["code"]) == (400, "invalid_request_error")
    assert harness.upstream.calls == []
    assert kit.counted(harness, "400", door="graphql", model="unknown") == 1
    assert _access(caplog) == [(400, None)] * 2  # REST's, then GraphQL's
    assert _errors_logged(caplog) == []


@pytest.mark.parametrize("raw", [b"1", b'"query"', b"null"])
async def test_a_json_body_that_is_no_object_is_a_400_as_on_rest(
    kit: Any, caplog: pytest.LogCaptureFixture, raw: bytes
) -> None:
    # strawberry reads it as an object: an AttributeError, the gateway's 500.
    harness = kit.build()
    json_type = {"content-type": "application/json"}
    async with harness.client() as client:
        rest = await client.post("/v1/chat/completions", content=raw, headers=json_type)
        answer = await client.post("/graphql", content=raw, headers=json_type)
    assert answer.status_code == rest.status_code == 400
    (error,) = answer.json()["errors"]
    assert error["message"] == rest.json()["error"]["message"]
    assert error["extensions"]["status"] == 400
    assert kit.counted(harness, "400", door="graphql", model="unknown") == 1
    assert _errors_logged(caplog) == []


async def test_an_unreachable_limit_store_nulls_usage_alone(kit: Any) -> None:
    # `usage` fails alone: the fields asked beside it keep their answers.
    harness = kit.build()

    async def down(*args: Any) -> Any:
        raise StoreUnavailable("redis: connection refused")

    harness.deps.proxy.limiter.standing = down
    query = "{ models { id } usage { key } apiVersion }"
    async with harness.client() as client:
        answer = await client.post("/graphql", json={"query": query})
    got = answer.json()
    assert got["data"] == {
        "models": [{"id": "smollm2"}],
        "usage": None,
        "apiVersion": "v1",
    }
    (error,) = got["errors"]
    assert error["path"] == ["usage"]
    assert error["message"] == "The limit store is unreachable."
    # As every other field's errors: REST's shape in `extensions`.
    extensions = error["extensions"]
    assert (extensions["status"], extensions["code"], extensions["type"]) == (
        503,
        "limit_store_unavailable",
        "server_error",
    )


@pytest.mark.parametrize(
    ("status", "body", "said"),
    [
        (
            404,
            b"<html><head><title>404 Not Found</title></head></html>",
            "404 Not Found",
        ),
        (400, b"Invalid HTTP request received.", "Invalid HTTP request received."),
        (400, b"", "status 400"),
    ],
    ids=["a proxy's HTML page", "plain text", "empty"],
)
async def test_a_replicas_refusal_that_is_not_json_is_a_refusal_not_a_failure(
    kit: Any,
    caplog: pytest.LogCaptureFixture,
    status: int,
    body: bytes,
    said: str,
) -> None:
    # As a refusal in OpenAI's shape, not as the replica's failure (502): the
    # request is counted with the replica's status, as REST relays it.
    caplog.set_level("INFO", logger="citadel.gateway.access")
    harness = kit.build()
    reply = kit.reply(status=status, body=body, content_type="text/html")
    harness.upstream.handler = lambda url, sent: reply
    async with harness.client() as client:
        answer = await client.post(
            "/graphql", json={"query": CHAT, "variables": {"input": INPUT}}
        )
    error = answer.json()["errors"][0]
    codes = {400: "invalid_request_error", 404: "model_not_found"}
    extensions = error["extensions"]
    assert (extensions["status"], extensions["code"]) == (status, codes[status])
    assert said in error["message"] and "<" not in error["message"]
    assert str(status) in error["message"]
    assert kit.counted(harness, str(status), door="graphql") == 1
    assert kit.counted(harness, "502", door="graphql") is None
    assert _access(caplog) == [(status, None)]


@pytest.mark.parametrize(
    ("field", "items"),
    [("messages", {"role": "user", "content": ""}), ("stop", "x")],
)
async def test_a_list_in_the_variables_past_the_limit_is_refused_before_coercion(
    kit: Any, field: str, items: object
) -> None:
    """graphql-core coerced the 300,000 messages that fit in 8 MiB for 8 s
    before the proxy could refuse them: the refusal names the variable, which
    the proxy's (`messages` has ...) would not."""
    harness = kit.build()
    harness.deps.max_body_bytes = 1 << 20
    variables = {"input": {**INPUT, field: [items] * 10_001}}
    async with harness.client() as client:
        answer = await client.post(
            "/graphql", json={"query": CHAT, "variables": variables}
        )
    error = answer.json()["errors"][0]
    assert error["message"] == (
        f"`$input.{field}` has 10,001 items; at most 10,000 are allowed."
    )
    assert error["extensions"]["status"] == 400
    assert harness.upstream.calls == []
    assert kit.counted(harness, "400", door="graphql", model="unknown") == 1


async def test_lists_in_the_variables_up_to_the_limit_are_taken(kit: Any) -> None:
    harness = kit.build()
    harness.deps.max_body_bytes = 1 << 20
    messages = [{"role": "user", "content": "hi"}] * 10_000
    variables = {"input": {**INPUT, "messages": messages}}
    async with harness.client() as client:
        answer = await client.post(
            "/graphql", json={"query": CHAT, "variables": variables}
        )
    assert "errors" not in answer.json()
    assert len(harness.upstream.calls[0][1]["messages"]) == 10_000
