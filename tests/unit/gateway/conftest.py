"""Gateway unit-test helpers: an app on in-memory parts and a fake upstream."""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import grpc
import httpx
import orjson
import pytest
from fastapi import FastAPI
from starlette.types import ASGIApp

from citadel.gateway.app import create_app, serving
from citadel.gateway.deps import Deps
from citadel.gateway.metrics import GatewayMetrics
from citadel.gateway.routes import RoutingDocument
from citadel.gateway.rpc.server import GrpcServer
from citadel.gateway.rpc.v1 import citadel_pb2 as pb
from citadel.gateway.rpc.v1 import citadel_pb2_grpc as pb_grpc
from citadel.gateway.services.auth import (
    Authenticator,
    InMemoryKeyStore,
    KeyRecord,
    hash_key,
)
from citadel.gateway.services.buckets import InProcessBuckets
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.limits import Limiter
from citadel.gateway.services.proxy import ProxyOptions, ProxyService
from citadel.gateway.services.replicas import Endpoint
from citadel.gateway.services.routing import Router
from citadel.gateway.settings import GatewaySettings

KEY = "ctd-unit-test-key-alice"
ADMIN_KEY = "ctd-unit-test-key-root"


class Clock:
    """A clock the test moves by hand."""

    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class FakeReply:
    """A canned upstream reply; `body`, or one of `parts`, may be an exception
    to raise when it is read."""

    status: int = 200
    body: bytes | Exception = b"{}"
    parts: list[bytes | Exception] = field(default_factory=list)
    content_type: str = "application/json"
    retry_after: str | None = None
    closed: bool = False

    async def read(self, timeout_s: float | None = None) -> bytes:
        if isinstance(self.body, Exception):
            raise self.body
        return self.body

    async def chunks(self, timeout_s: float | None = None) -> AsyncIterator[bytes]:
        for part in self.parts:
            if isinstance(part, Exception):
                raise part
            yield part

    def lift(self) -> None:
        pass

    def close(self) -> None:
        self.closed = True


Handler = Callable[[str, dict[str, Any]], FakeReply | Exception]


def completion(model: str = "smollm2", usage: tuple[int, int] = (10, 5)) -> FakeReply:
    body = {
        "model": model,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": usage[0], "completion_tokens": usage[1]},
    }
    return FakeReply(body=orjson.dumps(body))


class FakeUpstream:
    """Answers with `handler(url, body)`; remembers every call, and the time
    each was given (`timeouts`)."""

    def __init__(self, handler: Handler | None = None) -> None:
        self.handler: Handler = handler or (lambda url, body: completion())
        self.calls: list[tuple[str, dict[str, Any], Mapping[str, str]]] = []
        self.timeouts: list[float | None] = []

    async def post(
        self,
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float | None = None,
    ) -> FakeReply:
        parsed = orjson.loads(body)
        self.calls.append((url, parsed, headers))
        self.timeouts.append(timeout_s)
        result = self.handler(url, parsed)
        if isinstance(result, Exception):
            raise result
        return result


def document(*others: str, **route: Any) -> RoutingDocument:
    """The model `smollm2` (alias `chat`) changed by `route`, and one more model
    for each name in `others`."""
    base = {
        "name": "smol",
        "namespace": "llm",
        "servedName": "smollm2",
        "aliases": ["chat"],
        "service": "smol",
        "strategy": "round-robin",
    }
    extra = [{**base, "name": n, "servedName": n, "aliases": []} for n in others]
    return RoutingDocument.model_validate({"models": [{**base, **route}, *extra]})


@dataclass
class Harness:
    """An app on in-memory parts, and handles on those parts."""

    app: FastAPI
    deps: Deps
    upstream: FakeUpstream
    keys: InMemoryKeyStore
    clock: Clock

    @property
    def served(self) -> ASGIApp:
        """The app as the server runs it (the fast path in front)."""
        return serving(self.app)

    def client(self) -> httpx.AsyncClient:
        return asgi_client(self.served)


def build(
    doc: RoutingDocument | None = None,
    loaded: bool = True,
    replicas: tuple[str, ...] = ("http://r1", "http://r2"),
    records: tuple[KeyRecord, ...] | None = None,
    auth: bool = True,
    retries: int = 2,
    scale_from_zero_s: float = 300.0,
    draw: Callable[[], float] = random.random,
    queue_s: float = 60.0,
) -> Harness:
    clock = Clock()
    metrics = GatewayMetrics()
    catalog = Catalog()
    if loaded:
        doc = doc or document()
        catalog.set_document(doc)
        for route in doc.models:
            catalog.set_endpoints(
                route.namespace, route.service, [Endpoint(u) for u in replicas]
            )
    if records is None:
        records = (
            KeyRecord(name="alice", hash=hash_key(KEY), models=("smollm2",)),
            KeyRecord(name="root", hash=hash_key(ADMIN_KEY), role="admin"),
        )
    keys = InMemoryKeyStore(records)
    upstream = FakeUpstream()
    proxy = ProxyService(
        catalog,
        Router(catalog, clock),
        Limiter(InProcessBuckets(), clock),
        upstream,
        metrics,
        ProxyOptions(
            retries=retries,
            scale_from_zero_within_s=scale_from_zero_s,
            queue_within_s=queue_s,
        ),
        clock,
        draw,
    )
    deps = Deps(
        catalog=catalog,
        authenticator=Authenticator(keys, required=auth),
        proxy=proxy,
        metrics=metrics,
        max_body_bytes=4096,
        clock=clock,
    )
    app = create_app(GatewaySettings(routes_source="file"), deps)
    return Harness(app, deps, upstream, keys, clock)


def asgi_client(app: ASGIApp, key: str = KEY) -> httpx.AsyncClient:
    """An HTTP client of `app` in process, sending `key`."""
    return httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://gateway",
        headers={"authorization": f"Bearer {key}"},
    )


def post_scope(path: str, key: str = KEY, length: int | None = None) -> dict[str, Any]:
    """The ASGI scope of a JSON POST to `path` with `key` (and a content-length),
    for tests that drive the app's receive and send themselves."""
    headers = [
        (b"authorization", f"Bearer {key}".encode()),
        (b"content-type", b"application/json"),
    ]
    if length is not None:
        headers.append((b"content-length", str(length).encode()))
    return {
        "type": "http",
        "asgi": {"version": "3.0"},
        "http_version": "1.1",
        "method": "POST",
        "scheme": "http",
        "path": path,
        "raw_path": path.encode(),
        "query_string": b"",
        "root_path": "",
        "headers": headers,
        "server": ("gateway", 80),
        "client": ("client", 1234),
    }


def staying(body: bytes) -> Callable[[], Awaitable[dict[str, Any]]]:
    """An ASGI receive of a client that sends `body` whole and then stays on
    (never disconnects), for tests that drive the app's receive themselves."""
    messages = [{"type": "http.request", "body": body}]

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await asyncio.Event().wait()
        return {}

    return receive


def counted(
    harness: Harness, status: str, *, door: str = "rest", model: str = "smollm2"
) -> float | None:
    """How many chats of alice's key came in by `door` and were counted with
    `status` (None: none)."""
    labels = {"api": "chat", "model": model, "status": status}
    labels.update(key="alice", door=door)
    sample = harness.deps.metrics.registry.get_sample_value
    return sample("citadel_gateway_requests_total", labels)  # type: ignore[no-any-return]


@contextlib.asynccontextmanager
async def grpc_stub(harness: Harness) -> AsyncIterator[pb_grpc.InferenceStub]:
    """A stub on a gRPC server running on `harness`'s parts."""
    server = GrpcServer(harness.deps, "127.0.0.1", 0, harness.deps.max_body_bytes)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        yield pb_grpc.InferenceStub(channel)
    finally:
        await channel.close()
        await server.stop()


async def grpc_chat(
    stub: pb_grpc.InferenceStub,
    model: str,
    key: str = KEY,
    metadata: tuple[tuple[str, str], ...] = (),
) -> tuple[grpc.StatusCode, dict[str, Any]]:
    """A chat completion for `model` over gRPC, with `metadata` besides the
    key: its status code and trailers, answered or refused."""
    message = pb.ChatMessage(role="user", content="hi")
    request = pb.ChatCompletionRequest(model=model, messages=[message])
    sent = (("authorization", f"Bearer {key}"), *metadata)
    call = stub.ChatCompletion(request, metadata=sent)
    try:
        await call
    except grpc.aio.AioRpcError as err:
        return err.code(), dict(err.trailing_metadata() or ())
    return grpc.StatusCode.OK, dict(await call.trailing_metadata() or ())


async def graphql_chat(
    harness: Harness, model: str, headers: Mapping[str, str] | None = None
) -> httpx.Response:
    """A `chatCompletion` mutation for `model` asking for the answer's model,
    with `headers` besides the key."""
    mutation = """mutation C($input: ChatCompletionInput!) {
      chatCompletion(input: $input) { model } }"""
    said = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    async with harness.client() as client:
        return await client.post(
            "/graphql",
            json={"query": mutation, "variables": {"input": said}},
            headers=headers,
        )


async def stream_chat(harness: Harness, model: str) -> tuple[httpx.Response, bytes]:
    """A streamed chat completion for `model` (its replica's answer is what
    `harness.upstream` gives: `sse_reply` makes one): the response and the
    bytes relayed."""
    async with (
        harness.client() as client,
        client.stream(
            "POST",
            "/v1/chat/completions",
            json={
                "model": model,
                "messages": [{"role": "user", "content": "hello"}],
                "stream": True,
            },
        ) as answer,
    ):
        relayed = b"".join([chunk async for chunk in answer.aiter_bytes()])
    return answer, relayed


def sse_reply(*chunks: Any) -> FakeReply:
    """A replica's streamed answer: each of `chunks` as an SSE event, then
    `[DONE]`."""
    parts: list[bytes | Exception] = [
        b"data: " + orjson.dumps(chunk) + b"\n\n" for chunk in chunks
    ]
    parts.append(b"data: [DONE]\n\n")
    return FakeReply(parts=parts, content_type="text/event-stream")


@dataclass(frozen=True)
class Kit:
    """What tests build harnesses and replies with (conftest is not importable)."""

    build: Callable[..., Harness] = build
    document: Callable[..., RoutingDocument] = document
    completion: Callable[..., FakeReply] = completion
    reply: type[FakeReply] = FakeReply
    post_scope: Callable[..., dict[str, Any]] = post_scope
    asgi_client: Callable[..., httpx.AsyncClient] = asgi_client
    staying: Callable[[bytes], Callable[[], Awaitable[dict[str, Any]]]] = staying
    counted: Callable[..., float | None] = counted
    grpc_stub: Callable[
        [Harness], contextlib.AbstractAsyncContextManager[pb_grpc.InferenceStub]
    ] = grpc_stub
    grpc_chat: Callable[..., Awaitable[tuple[grpc.StatusCode, dict[str, Any]]]] = (
        grpc_chat
    )
    graphql_chat: Callable[..., Awaitable[httpx.Response]] = graphql_chat
    stream_chat: Callable[..., Awaitable[tuple[httpx.Response, bytes]]] = stream_chat
    sse_reply: Callable[..., FakeReply] = sse_reply
    key: str = KEY
    admin_key: str = ADMIN_KEY
    chat: Mapping[str, Any] = field(
        default_factory=lambda: {
            "model": "chat",
            "messages": [{"role": "user", "content": "hello"}],
        }
    )


@pytest.fixture
def kit() -> Kit:
    return Kit()


@pytest.fixture
def harness() -> Harness:
    return build()
