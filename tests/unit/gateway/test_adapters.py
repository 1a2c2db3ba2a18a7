"""LoRA adapters through the gateway: routed to their model's replicas, sent
by their own name, allowed by their own name, counted under it, limited with
their model, and prefix-hashed apart from it."""

from __future__ import annotations

from typing import Any

import grpc
import orjson
import pytest

from citadel.gateway.metrics import GatewayMetrics
from citadel.gateway.rpc.server import GrpcServer
from citadel.gateway.rpc.v1 import citadel_pb2 as pb
from citadel.gateway.rpc.v1 import citadel_pb2_grpc as pb_grpc
from citadel.gateway.services.auth import ANONYMOUS, KeyRecord, hash_key
from citadel.gateway.services.buckets import InProcessBuckets
from citadel.gateway.services.limits import Limiter
from citadel.gateway.services.proxy import ProxyOptions, ProxyService
from citadel.gateway.services.requests import CHAT
from citadel.gateway.services.routing import Router

pytestmark = pytest.mark.unit

ADAPTER = "sql-expert"
OTHER = "support-bot"
BOB_KEY = "ctd-unit-test-key-bob"


def _build(kit: Any, alice: tuple[str, ...] = ("sql-*",), **route: Any) -> Any:
    """`smollm2` (alias `chat`) with two adapters; alice may use `alice`, bob
    the base model, root everything."""
    records = (
        KeyRecord(name="alice", hash=hash_key(kit.key), models=alice),
        KeyRecord(name="bob", hash=hash_key(BOB_KEY), models=("smollm2",)),
        KeyRecord(name="root", hash=hash_key(kit.admin_key), role="admin"),
    )
    doc = kit.document(adapters=[ADAPTER, OTHER], **route)
    return kit.build(doc=doc, records=records)


def _as(key: str) -> dict[str, str]:
    return {"authorization": f"Bearer {key}"}


@pytest.mark.parametrize(
    ("path", "body"),
    [
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "SELECT"}),
        ("/v1/embeddings", {"input": "a table"}),
        ("/v1/responses", {"input": "hi"}),
    ],
)
async def test_every_endpoint_sends_an_adapter_by_its_own_name(
    kit: Any, path: str, body: dict[str, Any]
) -> None:
    h = _build(kit)
    async with h.client() as client:
        adapter = await client.post(path, json={**body, "model": ADAPTER})
        alias = await client.post(
            path, json={**body, "model": "chat"}, headers=_as(kit.admin_key)
        )
    assert (adapter.status_code, alias.status_code) == (200, 200)
    (url, sent, _), (_, aliased, _) = h.upstream.calls
    assert url.startswith(("http://r1/", "http://r2/"))  # the base's replicas
    assert sent == {**body, "model": ADAPTER}  # not rewritten to the served name
    assert aliased["model"] == "smollm2"  # an alias still is


async def test_an_adapter_is_counted_under_its_own_name(kit: Any) -> None:
    h = _build(kit)
    async with h.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json={**kit.chat, "model": ADAPTER}
        )
    assert answer.status_code == 200
    sample = h.deps.metrics.registry.get_sample_value
    assert kit.counted(h, "200", model=ADAPTER) == 1
    assert kit.counted(h, "200", model="smollm2") is None
    tokens = {"model": ADAPTER, "key": "alice", "kind": "prompt"}
    assert sample("citadel_gateway_tokens_total", tokens) == 10
    # What is counted per replica is the base's: its replicas, its health.
    replica = h.upstream.calls[0][0].removesuffix("/v1/chat/completions")
    in_flight = "citadel_gateway_in_flight_requests"
    assert sample(in_flight, {"model": "smollm2", "replica": replica}) == 0
    assert sample(in_flight, {"model": ADAPTER, "replica": replica}) is None


@pytest.mark.parametrize(
    ("key", "model", "status"),
    [
        (BOB_KEY, "smollm2", 200),
        (BOB_KEY, "chat", 200),
        (BOB_KEY, ADAPTER, 403),  # the base model does not grant its adapters
        ("alice", ADAPTER, 200),
        ("alice", "smollm2", 403),  # nor an adapter its base
        ("alice", "chat", 403),
        ("alice", OTHER, 403),  # nor another adapter
    ],
)
async def test_a_key_may_use_an_adapter_by_its_name_only(
    kit: Any, key: str, model: str, status: int
) -> None:
    h = _build(kit)
    key = kit.key if key == "alice" else key
    async with h.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json={**kit.chat, "model": model}, headers=_as(key)
        )
    assert answer.status_code == status
    if status == 403:
        assert answer.json()["error"]["code"] == "model_not_allowed"
        assert h.upstream.calls == []


async def test_models_list_and_show_the_adapters_a_key_may_use(kit: Any) -> None:
    h = _build(kit)
    lists = {}
    async with h.client() as client:
        for who, key in (("alice", kit.key), ("bob", BOB_KEY), ("root", kit.admin_key)):
            answer = await client.get("/v1/models", headers=_as(key))
            lists[who] = answer.json()["data"]
            for entry in lists[who]:
                one = await client.get(f"/v1/models/{entry['id']}", headers=_as(key))
                assert (one.status_code, one.json()) == (200, entry)
        hidden_base = await client.get("/v1/models/smollm2")  # alice
        hidden_adapter = await client.get(f"/v1/models/{ADAPTER}", headers=_as(BOB_KEY))
    adapter = {
        "id": ADAPTER,
        "object": "model",
        "created": 0,
        "owned_by": "citadel",
        "parent": "smollm2",  # as vLLM lists an adapter
    }
    assert lists["alice"] == [adapter]
    assert [m["id"] for m in lists["bob"]] == ["smollm2", "chat"]
    assert all("parent" not in m for m in lists["bob"])
    assert [m["id"] for m in lists["root"]] == ["smollm2", "chat", ADAPTER, OTHER]
    assert hidden_base.status_code == hidden_adapter.status_code == 404


async def test_an_adapter_shares_its_model_s_per_key_limits(kit: Any) -> None:
    """The same replicas serve both: a key's per-model budget is the model's,
    whichever of its adapters (or the base) spends it."""
    h = _build(kit, alice=("*",), limits={"rpm": 2})
    async with h.client() as client:
        first = await client.post(
            "/v1/chat/completions", json={**kit.chat, "model": ADAPTER}
        )
        second = await client.post(
            "/v1/chat/completions", json={**kit.chat, "model": OTHER}
        )
        third = await client.post(
            "/v1/chat/completions", json={**kit.chat, "model": "smollm2"}
        )
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert second.headers["x-ratelimit-remaining-requests"] == "0"
    assert third.status_code == 429
    assert "model `smollm2`" in third.json()["error"]["message"]
    sample = h.deps.metrics.registry.get_sample_value
    labels = {"model": "smollm2", "key": "alice", "scope": "requests"}
    assert sample("citadel_gateway_rate_limited_total", labels) == 1


async def test_an_adapter_shares_no_cached_prefix_with_its_base(kit: Any) -> None:
    """vLLM's prefix cache keeps an adapter's blocks apart from the base's: a
    prompt the base was sent is no cached prefix for the adapter."""
    h = _build(kit, strategy="prefix-aware")
    decisions: list[tuple[str, str]] = []
    catalog, clock = h.deps.catalog, h.clock
    proxy = ProxyService(
        catalog,
        Router(catalog, clock, lambda model, _, how: decisions.append((model, how))),
        Limiter(InProcessBuckets(), clock),
        h.upstream,
        GatewayMetrics(),
        ProxyOptions(),
        clock,
    )
    long_chat = {"messages": [{"role": "user", "content": "x" * 2000}]}
    for model in ("smollm2", "chat", ADAPTER, ADAPTER, OTHER):
        raw = orjson.dumps({**long_chat, "model": model})
        answer = await proxy.handle(CHAT, ANONYMOUS, raw, "r")
        assert answer.status == 200
    # The base: new, then cached (by its alias too); the adapter: new, then
    # cached; the other adapter: new again. One strategy (one table) for all.
    assert decisions == [
        ("smollm2", "hash"),
        ("smollm2", "cache"),
        ("smollm2", "hash"),
        ("smollm2", "cache"),
        ("smollm2", "hash"),
    ]


async def test_the_grpc_door_lists_and_calls_an_adapter(kit: Any) -> None:
    h = _build(kit)
    server = GrpcServer(h.deps, "127.0.0.1", 0, h.deps.max_body_bytes)
    await server.start()
    channel = grpc.aio.insecure_channel(f"127.0.0.1:{server.port}")
    try:
        stub = pb_grpc.InferenceStub(channel)
        key = (("authorization", f"Bearer {kit.key}"),)
        listed = await stub.ListModels(pb.ListModelsRequest(), metadata=key)
        message = pb.ChatMessage(role="user", content="hi")
        chat = pb.ChatCompletionRequest(model=ADAPTER, messages=[message])
        await stub.ChatCompletion(chat, metadata=key)
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            base = pb.ChatCompletionRequest(model="chat", messages=[message])
            await stub.ChatCompletion(base, metadata=key)
    finally:
        await channel.close()
        await server.stop()
    assert [(m.id, m.parent) for m in listed.models] == [(ADAPTER, "smollm2")]
    assert refused.value.code() is grpc.StatusCode.PERMISSION_DENIED
    ((_, sent, _),) = h.upstream.calls
    assert sent["model"] == ADAPTER
    assert kit.counted(h, "200", door="grpc", model=ADAPTER) == 1


async def test_the_graphql_door_lists_and_calls_an_adapter(kit: Any) -> None:
    h = _build(kit)
    chat = """mutation C($input: ChatCompletionInput!) {
      chatCompletion(input: $input) { choices { message { content } } } }"""
    message = {"role": "user", "content": "hi"}
    async with h.client() as client:
        listed = await client.post(
            "/graphql", json={"query": "{ models { id parent aliases } }"}
        )
        bobs = await client.post(
            "/graphql", json={"query": "{ models { id parent } }"}, headers=_as(BOB_KEY)
        )
        answer = await client.post(
            "/graphql",
            json={
                "query": chat,
                "variables": {"input": {"model": ADAPTER, "messages": [message]}},
            },
        )
    assert listed.json()["data"]["models"] == [
        {"id": ADAPTER, "parent": "smollm2", "aliases": []}
    ]
    assert bobs.json()["data"]["models"] == [{"id": "smollm2", "parent": None}]
    assert "errors" not in answer.json()
    ((_, sent, _),) = h.upstream.calls
    assert sent["model"] == ADAPTER
    assert kit.counted(h, "200", door="graphql", model=ADAPTER) == 1


async def test_admin_replicas_names_each_model_s_adapters(kit: Any) -> None:
    h = _build(kit)
    async with h.client() as client:
        answer = await client.get("/admin/replicas", headers=_as(kit.admin_key))
    [model] = answer.json()["models"]
    assert model["adapters"] == [ADAPTER, OTHER]
