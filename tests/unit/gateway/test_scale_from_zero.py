"""Each model's demand (`citadel_gateway_model_requests`), and requests held for
a model at zero (`scaleFromZero`) until a replica is ready."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest
from pydantic import ValidationError

from citadel.gateway.services.auth import KeyRecord, hash_key
from citadel.gateway.services.replicas import Endpoint
from citadel.gateway.services.requests import CHAT
from citadel.gateway.settings import GatewaySettings, explain
from citadel.gateway.upstream import UpstreamUnreachable
from citadel.gateway.wiring import proxy_options

pytestmark = pytest.mark.unit

ADAPTER = "sql-expert"
BOB_KEY = "ctd-unit-test-key-bob"
SMOL = ("llm", "smol")
CHUNK = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}


def demand(h: Any, state: str, model: tuple[str, str] = SMOL) -> float | None:
    """The model's `model_requests` sample in `state` (None: no series)."""
    labels = {"model_namespace": model[0], "llmmodel": model[1], "state": state}
    value = h.deps.metrics.registry.get_sample_value(
        "citadel_gateway_model_requests", labels
    )
    return value  # type: ignore[no-any-return]


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    """Waits for `condition` to hold, failing after `within_s`."""
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.005)


def at_zero(kit: Any, scale_from_zero_s: float = 300.0, **route: Any) -> Any:
    """A harness whose `smollm2` scales from zero and has no replica yet."""
    doc = kit.document(scaleFromZero=True, **route)
    return kit.build(doc=doc, replicas=(), scale_from_zero_s=scale_from_zero_s)


def give_replica(h: Any, *endpoints: Endpoint) -> None:
    h.deps.catalog.set_endpoints(
        "llm", "smol", list(endpoints) or [Endpoint("http://r1")]
    )


def blocking_upstream(h: Any, kit: Any) -> tuple[asyncio.Event, asyncio.Event]:
    """Makes the replica hold each request until `answer` is set; `working`
    says one arrived."""
    working, answer = asyncio.Event(), asyncio.Event()

    async def post(url: str, body: bytes, headers: Any, timeout_s: Any = None) -> Any:
        working.set()
        await answer.wait()
        return kit.completion()

    h.upstream.post = post
    return working, answer


def test_each_routed_model_has_its_series_at_zero_until_it_goes(kit: Any) -> None:
    h = kit.build(doc=kit.document("big"))
    for model in (SMOL, ("llm", "big")):
        assert demand(h, "in_flight", model) == 0
        assert demand(h, "waiting", model) == 0
    h.deps.catalog.set_document(kit.document())
    assert demand(h, "in_flight", ("llm", "big")) is None
    assert demand(h, "waiting", ("llm", "big")) is None
    assert demand(h, "in_flight") == 0


@pytest.mark.parametrize("name", ["smollm2", "chat", ADAPTER])
async def test_a_request_is_in_flight_under_its_models_route_while_answered(
    kit: Any, name: str
) -> None:
    """Any name of the model (served name, alias, adapter) counts under the
    LLMModel's (namespace, name), not under the name sent."""
    h = kit.build(doc=kit.document(adapters=[ADAPTER]))
    working, answer = blocking_upstream(h, kit)
    async with kit.asgi_client(h.served, key=kit.admin_key) as client:
        asking = asyncio.create_task(
            client.post("/v1/chat/completions", json={**kit.chat, "model": name})
        )
        await asyncio.wait_for(working.wait(), 5)
        assert demand(h, "in_flight") == 1
        assert demand(h, "waiting") == 0
        answer.set()
        assert (await asking).status_code == 200
    assert demand(h, "in_flight") == 0


async def test_a_stream_is_in_flight_until_it_ends(kit: Any) -> None:
    h = kit.build()
    parts = [b"data: " + orjson.dumps(CHUNK) + b"\n\n", b"data: [DONE]\n\n"]
    h.upstream.handler = lambda url, body: kit.reply(
        parts=parts, content_type="text/event-stream"
    )
    principal = h.deps.authenticator.authenticate(f"Bearer {kit.key}")
    raw = orjson.dumps({**kit.chat, "stream": True})
    response = await h.deps.proxy.handle(CHAT, principal, raw, "r-1")
    assert response.stream is not None
    assert demand(h, "in_flight") == 1  # its 200 went out, its events not yet
    relayed = [chunk async for chunk in response.stream]
    assert relayed
    assert demand(h, "in_flight") == 0


async def test_a_request_for_a_model_at_zero_waits_for_a_replica(kit: Any) -> None:
    h = at_zero(kit)
    loop = asyncio.get_running_loop()
    async with h.client() as client:
        asking = asyncio.create_task(client.post("/v1/chat/completions", json=kit.chat))
        await until(lambda: demand(h, "waiting") == 1)
        # A pod that is not ready yet (vLLM loading the weights): still held.
        give_replica(h, Endpoint("http://r1", ready=False, serving=False))
        await asyncio.sleep(0.05)
        assert not asking.done()
        assert demand(h, "waiting") == 1
        assert demand(h, "in_flight") == 0
        ready = loop.time()
        give_replica(h, Endpoint("http://r1"))
        answer = await asyncio.wait_for(asking, 5)
    # Woken by the change, not by the re-check each second.
    assert loop.time() - ready < 0.5
    assert answer.status_code == 200
    assert [url for url, _, _ in h.upstream.calls] == ["http://r1/v1/chat/completions"]
    assert demand(h, "waiting") == 0
    assert demand(h, "in_flight") == 0
    assert kit.counted(h, "200") == 1


async def test_a_model_scaling_to_zero_holds_requests_past_its_last_pod(
    kit: Any,
) -> None:
    # Its last pod shuts down (the autoscaler's 1 -> 0): terminating, still
    # listed as serving until its readiness probe fails, refusing connections.
    h = at_zero(kit)
    give_replica(h, Endpoint("http://r1", ready=False, serving=True, terminating=True))
    h.upstream.handler = lambda url, body: UpstreamUnreachable("connection refused")
    async with h.client() as client:
        asking = asyncio.create_task(client.post("/v1/chat/completions", json=kit.chat))
        # Held and counted as waiting (what wakes the model), not sent there.
        await until(lambda: demand(h, "waiting") == 1)
        assert not h.upstream.calls
        h.upstream.handler = lambda url, body: kit.reply()
        give_replica(h, Endpoint("http://r2"))
        answer = await asyncio.wait_for(asking, 5)
    assert answer.status_code == 200
    assert [url for url, _, _ in h.upstream.calls] == ["http://r2/v1/chat/completions"]
    assert demand(h, "waiting") == 0


async def test_a_request_held_too_long_gets_a_503_saying_why(kit: Any) -> None:
    h = at_zero(kit, scale_from_zero_s=0.2)
    loop = asyncio.get_running_loop()
    began = loop.time()
    async with h.client() as client:
        answer = await client.post("/v1/chat/completions", json=kit.chat)
    assert loop.time() - began >= 0.2
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "5"
    error = answer.json()["error"]
    assert error["code"] == "model_not_ready"
    assert error["type"] == "server_error"
    assert "starting from zero" in error["message"]
    assert "within 0.2 s" in error["message"]
    assert demand(h, "waiting") == 0
    assert kit.counted(h, "503") == 1
    assert not h.upstream.calls


async def test_no_timeout_answers_503_at_once(
    kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CITADEL_GATEWAY_SCALE_FROM_ZERO_TIMEOUT_S", "0")
    options = proxy_options(GatewaySettings(routes_source="file"))
    assert options.scale_from_zero_within_s == 0
    h = at_zero(kit, scale_from_zero_s=options.scale_from_zero_within_s)
    async with h.client() as client:
        answer = await asyncio.wait_for(
            client.post("/v1/chat/completions", json=kit.chat), 0.5
        )
    assert answer.status_code == 503
    assert answer.headers["retry-after"] == "5"
    assert "has no ready replica" in answer.json()["error"]["message"]


async def test_only_a_model_that_scales_from_zero_holds_its_requests(
    kit: Any,
) -> None:
    h = kit.build(doc=kit.document("big", scaleFromZero=True), replicas=())
    records = (KeyRecord(name="root", hash=hash_key(kit.admin_key), role="admin"),)
    h.keys.replace_all(records)
    async with kit.asgi_client(h.served, key=kit.admin_key) as client:
        held = asyncio.create_task(client.post("/v1/chat/completions", json=kit.chat))
        other = {**kit.chat, "model": "big"}
        answer = await asyncio.wait_for(
            client.post("/v1/chat/completions", json=other), 0.5
        )
        assert answer.status_code == 503  # `big` has no scaleFromZero: as today
        assert demand(h, "waiting", ("llm", "big")) == 0
        await until(lambda: demand(h, "waiting") == 1)
        give_replica(h)
        assert (await asyncio.wait_for(held, 5)).status_code == 200


async def test_a_refused_request_never_waits(kit: Any) -> None:
    """Keys, permissions and limits come first: a refusal wakes no model."""
    h = at_zero(kit, limits={"rpm": 1})
    h.keys.replace_all(
        (
            KeyRecord(name="alice", hash=hash_key(kit.key), models=("smollm2",)),
            KeyRecord(name="bob", hash=hash_key(BOB_KEY), models=("other",)),
        )
    )
    async with h.client() as client:
        held = asyncio.create_task(client.post("/v1/chat/completions", json=kit.chat))
        await until(lambda: demand(h, "waiting") == 1)
        over = await asyncio.wait_for(
            client.post("/v1/chat/completions", json=kit.chat), 0.5
        )
        bad_key = await asyncio.wait_for(
            client.post(
                "/v1/chat/completions",
                json=kit.chat,
                headers={"authorization": "Bearer ctd-nope"},
            ),
            0.5,
        )
        async with kit.asgi_client(h.served, key=BOB_KEY) as bob:
            not_allowed = await asyncio.wait_for(
                bob.post("/v1/chat/completions", json=kit.chat), 0.5
            )
        assert demand(h, "waiting") == 1  # the first request alone
        give_replica(h)
        assert (await asyncio.wait_for(held, 5)).status_code == 200
    assert over.status_code == 429
    assert bad_key.status_code == 401
    assert not_allowed.status_code == 403
    assert demand(h, "waiting") == 0


async def test_a_client_that_leaves_while_held_ends_its_wait(kit: Any) -> None:
    h = at_zero(kit)
    messages = [{"type": "http.request", "body": orjson.dumps(kit.chat)}]
    leave = asyncio.Event()

    async def receive() -> dict[str, Any]:
        if messages:
            return messages.pop()
        await leave.wait()
        return {"type": "http.disconnect"}

    sent: list[Any] = []

    async def send(message: Any) -> None:
        sent.append(message)

    serving = asyncio.create_task(
        h.served(kit.post_scope("/v1/chat/completions"), receive, send)
    )
    await until(lambda: demand(h, "waiting") == 1)
    await asyncio.sleep(0.1)  # past the client watch's start
    leave.set()
    await asyncio.wait_for(serving, 5)
    assert not sent
    assert demand(h, "waiting") == 0
    assert kit.counted(h, "499") == 1


async def test_a_gateway_that_stops_ends_the_waits(kit: Any) -> None:
    h = at_zero(kit)
    async with h.client() as client:
        held = asyncio.create_task(client.post("/v1/chat/completions", json=kit.chat))
        await until(lambda: demand(h, "waiting") == 1)
        h.deps.proxy.stopping(30)
        answer = await asyncio.wait_for(held, 0.5)
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "shutting_down"
    assert "retry-after" in answer.headers
    assert demand(h, "waiting") == 0


async def test_a_route_that_stops_scaling_from_zero_ends_the_wait(kit: Any) -> None:
    h = at_zero(kit)
    async with h.client() as client:
        held = asyncio.create_task(client.post("/v1/chat/completions", json=kit.chat))
        await until(lambda: demand(h, "waiting") == 1)
        h.deps.catalog.set_document(kit.document())
        answer = await asyncio.wait_for(held, 0.5)
    assert answer.status_code == 503
    assert "has no ready replica" in answer.json()["error"]["message"]
    assert demand(h, "waiting") == 0


async def test_metrics_can_be_filtered_by_name(kit: Any) -> None:
    h = kit.build()
    async with h.client() as client:
        await client.post("/v1/chat/completions", json=kit.chat)
        text = (await client.get("/metrics?name[]=citadel_gateway_model_requests")).text
        everything = (await client.get("/metrics")).text
    samples = [line for line in text.splitlines() if not line.startswith("#")]
    assert sorted(samples) == [
        'citadel_gateway_model_requests{llmmodel="smol",model_namespace="llm",'
        'state="in_flight"} 0.0',
        'citadel_gateway_model_requests{llmmodel="smol",model_namespace="llm",'
        'state="waiting"} 0.0',
    ]
    assert "# TYPE citadel_gateway_model_requests gauge" in text
    assert "citadel_gateway_requests_total" in everything


def test_the_timeout_is_read_from_its_variable(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    assert GatewaySettings().scale_from_zero_timeout_s == 300
    monkeypatch.setenv("CITADEL_GATEWAY_SCALE_FROM_ZERO_TIMEOUT_S", "-1")
    with pytest.raises(ValidationError) as refused:
        GatewaySettings()
    assert explain(refused.value).startswith(
        "CITADEL_GATEWAY_SCALE_FROM_ZERO_TIMEOUT_S='-1': "
    )
