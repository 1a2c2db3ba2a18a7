"""Load shedding: sheddable requests refused while every replica of their
model is full (`services.shedding`, `ProxyService._handle`)."""

from __future__ import annotations

from typing import Any

import grpc
import httpx
import pytest

from citadel.gateway.routes import RoutingDocument
from citadel.gateway.services.auth import KeyRecord, Priority, hash_key
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.proxy import SPLIT_HEADER
from citadel.gateway.services.replicas import Endpoint, LoadReport
from citadel.gateway.services.scraper import MetricsScraper
from citadel.gateway.services.shedding import (
    PRIORITY_HEADER,
    WATCH_S,
    LoadShedder,
    SheddingSettings,
    priority_of,
)

pytestmark = pytest.mark.unit

SHEDDABLE = {PRIORITY_HEADER: "sheddable"}


def build(kit: Any, priority: str = "standard", **record: Any) -> Any:
    """A harness whose key (`kit.key`, named `batch`) has `priority`; the
    model `smollm2` on replicas r1 and r2."""
    fields = {"models": ("*",), "priority": priority, **record}
    key = KeyRecord(name="batch", hash=hash_key(kit.key), **fields)
    return kit.build(records=(key,))


def load(h: Any, url: str, age_s: float = 0.0, **figures: Any) -> None:
    """Gives the replica at `url` a report read `age_s` ago."""
    replica = h.deps.catalog.all_replicas()[url]
    replica.load = LoadReport(scraped_at=h.clock.now - age_s, **figures)


def fill(h: Any, *urls: str) -> None:
    """Every replica in `urls` (default: both) full by its waiting requests."""
    for url in urls or ("http://r1", "http://r2"):
        load(h, url, running=4, waiting=6, kv_cache_usage=0.3)


async def ask(h: Any, kit: Any, headers: Any = None, **body: Any) -> Any:
    async with h.client() as client:
        return await client.post(
            "/v1/chat/completions", json={**kit.chat, **body}, headers=headers
        )


def shed(h: Any, model: str = "smollm2", key: str = "batch") -> float | None:
    sample = h.deps.metrics.registry.get_sample_value
    return sample("citadel_gateway_shed_total", {"model": model, "key": key})  # type: ignore[no-any-return]


def requests(h: Any, status: str, model: str = "smollm2") -> float | None:
    labels = {"api": "chat", "model": model, "status": status}
    labels.update(key="batch", door="rest")
    sample = h.deps.metrics.registry.get_sample_value
    return sample("citadel_gateway_requests_total", labels)  # type: ignore[no-any-return]


async def test_a_sheddable_request_is_refused_while_every_replica_is_full(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    # One request a minute: a shed request must not take it.
    h = build(kit, "sheddable", rpm=1)
    fill(h)
    caplog.set_level("INFO", logger="citadel.gateway.access")
    answer = await ask(h, kit)
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert (error["code"], error["type"]) == ("model_overloaded", "server_error")
    assert "smollm2" in error["message"] and "sheddable" in error["message"]
    # Half the time a report counts (two 2 s scrape periods): one period.
    assert answer.headers["retry-after"] == "2"
    assert h.upstream.calls == []
    assert shed(h) == 1
    assert requests(h, "503") == 1
    [line] = [r for r in caplog.records if r.getMessage() == "request"]
    assert (line.status, line.code, line.priority) == (
        503,
        "model_overloaded",
        "sheddable",
    )
    # Room again: answered, within the minute's one request (not charged).
    load(h, "http://r2", running=3, waiting=0, kv_cache_usage=0.5)
    assert (await ask(h, kit)).status_code == 200
    assert shed(h) == 1


async def test_a_standard_request_is_never_shed(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = build(kit)
    fill(h)
    caplog.set_level("INFO", logger="citadel.gateway.access")
    answer = await ask(h, kit)
    assert answer.status_code == 200
    assert shed(h) is None
    [line] = [r for r in caplog.records if r.getMessage() == "request"]
    assert not hasattr(line, "priority")
    # Nor watched: its model's replicas are not read for it.
    assert h.deps.proxy.shedding_watched() == set()


@pytest.mark.parametrize(
    ("figures", "full"),
    [
        # More than 5 waiting, more than 80% of the cache: as the Gateway API
        # Inference Extension bounds a pod with room.
        ({"waiting": 6}, True),
        ({"waiting": 5}, False),
        ({"kv_cache_usage": 0.81}, True),
        ({"kv_cache_usage": 0.8}, False),
        ({"waiting": 0, "kv_cache_usage": 0.95}, True),
        # Not exported: unknown, never full.
        ({"running": 200}, False),
    ],
)
async def test_a_replica_is_full_by_its_queue_or_its_kv_cache(
    kit: Any, figures: dict[str, float], full: bool
) -> None:
    h = build(kit, "sheddable")
    fill(h, "http://r1")
    load(h, "http://r2", **figures)
    answer = await ask(h, kit)
    assert answer.status_code == (503 if full else 200)


@pytest.mark.parametrize(("age_s", "shed_it"), [(3.9, True), (4.1, False)])
async def test_a_report_counts_for_two_scrape_periods(
    kit: Any, age_s: float, shed_it: bool
) -> None:
    h = build(kit, "sheddable")
    fill(h, "http://r1")
    load(h, "http://r2", age_s=age_s, waiting=9)
    assert (await ask(h, kit)).status_code == (503 if shed_it else 200)


async def test_a_replica_without_a_report_is_not_taken_for_full(kit: Any) -> None:
    """No report (never read, or its last read failed): nothing is shed, as
    the limits admit requests unchecked without their store."""
    h = build(kit, "sheddable")
    fill(h, "http://r1")
    assert (await ask(h, kit)).status_code == 200


async def test_an_ejected_replica_does_not_count(kit: Any) -> None:
    """It takes no requests: the model's room is what the others have."""
    h = build(kit, "sheddable")
    fill(h, "http://r1")
    ejected = h.deps.catalog.all_replicas()["http://r2"]
    ejected.ejected_until = h.clock.now + 30
    assert (await ask(h, kit)).status_code == 503


async def test_replicas_that_are_shutting_down_alone_are_not_shed(kit: Any) -> None:
    """The last pods of a model going to zero (or replaced) still serve, full:
    no ready replica, so its requests fare as any other's (a model that
    scales from zero holds them for the next one)."""
    h = build(kit, "sheddable")
    going = [
        Endpoint(u, ready=False, serving=True, terminating=True)
        for u in ("http://r1", "http://r2")
    ]
    h.deps.catalog.set_endpoints("llm", "smol", going)
    fill(h)
    assert (await ask(h, kit)).status_code == 200
    assert shed(h) is None


async def test_a_sheddable_keys_request_refused_early_is_logged_as_such(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = build(kit, "sheddable")
    caplog.set_level("INFO", logger="citadel.gateway.access")
    assert (await ask(h, kit, model="nope")).status_code == 404
    [line] = [r for r in caplog.records if r.getMessage() == "request"]
    assert (line.status, line.priority) == (404, "sheddable")


async def test_a_repeated_header_counts_its_lowest_value(kit: Any) -> None:
    """A proxy in front that adds `sheddable` to a batch job's requests is not
    undone by a client that sends `standard` first."""
    h = build(kit)
    fill(h)
    twice = [(PRIORITY_HEADER, "standard"), (PRIORITY_HEADER, "sheddable")]
    async with h.client() as client:
        answer = await client.post(
            "/v1/chat/completions", json=kit.chat, headers=httpx.Headers(twice)
        )
    assert answer.json()["error"]["code"] == "model_overloaded"
    async with kit.grpc_stub(h) as stub:
        code, _ = await kit.grpc_chat(stub, "chat", metadata=tuple(twice))
    assert code is grpc.StatusCode.UNAVAILABLE
    assert shed(h) == 2


async def test_a_model_without_a_ready_replica_is_not_shed(kit: Any) -> None:
    """No load to protect: the request fares as any other (here a 503
    model_not_ready), and is not counted as shed."""
    h = build(kit, "sheddable")
    h.deps.catalog.set_endpoints("llm", "smol", [])
    answer = await ask(h, kit)
    assert answer.json()["error"]["code"] == "model_not_ready"
    assert shed(h) is None


@pytest.mark.parametrize("asked", ["sheddable", "Sheddable", " sheddable "])
async def test_the_header_lowers_a_standard_keys_request(kit: Any, asked: str) -> None:
    h = build(kit)
    fill(h)
    answer = await ask(h, kit, headers={PRIORITY_HEADER: asked})
    assert answer.json()["error"]["code"] == "model_overloaded"
    assert (await ask(h, kit, headers={PRIORITY_HEADER: "standard"})).is_success


async def test_the_header_never_raises_a_sheddable_keys_request(kit: Any) -> None:
    h = build(kit, "sheddable")
    fill(h)
    answer = await ask(h, kit, headers={PRIORITY_HEADER: "standard"})
    assert answer.json()["error"]["code"] == "model_overloaded"


async def test_a_header_that_names_no_priority_is_refused(kit: Any) -> None:
    h = build(kit)
    answer = await ask(h, kit, headers={PRIORITY_HEADER: "urgent"})
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert PRIORITY_HEADER in error["message"]
    assert "`standard` or `sheddable`" in error["message"]
    assert requests(h, "400") == 1
    assert h.upstream.calls == []


async def test_without_keys_requests_are_standard_unless_they_ask(kit: Any) -> None:
    h = kit.build(auth=False)
    fill(h)
    async with kit.asgi_client(h.served, key="") as client:
        assert (await client.post("/v1/chat/completions", json=kit.chat)).is_success
        answer = await client.post(
            "/v1/chat/completions", json=kit.chat, headers=SHEDDABLE
        )
    assert answer.json()["error"]["code"] == "model_overloaded"


async def test_a_split_request_is_shed_by_its_targets_replicas(kit: Any) -> None:
    """The split comes first: the request is the target's, and so is the room
    that counts."""
    doc = kit.document(split=[{"model": "big", "weight": 100}])
    big = {**doc.models[0].model_dump(by_alias=True), "split": []}
    big.update(name="big", servedName="big", aliases=[], service="big")
    doc = RoutingDocument.model_validate({"models": [doc.models[0], big]})
    h = kit.build(doc=doc, records=(KeyRecord(name="batch", hash=hash_key(kit.key)),))
    h.deps.catalog.set_endpoints("llm", "big", [Endpoint("http://b1")])
    fill(h)  # smollm2's replicas; big's has room
    assert (await ask(h, kit, headers=SHEDDABLE)).is_success
    big = h.deps.catalog.all_replicas()["http://b1"]
    big.load = LoadReport(waiting=6, scraped_at=h.clock.now)
    answer = await ask(h, kit, headers=SHEDDABLE)
    assert answer.json()["error"]["code"] == "model_overloaded"
    assert answer.headers[SPLIT_HEADER] == "big"
    assert shed(h, model="big") == 1


async def test_sheddable_requests_have_their_models_replicas_read(kit: Any) -> None:
    h = build(kit, "sheddable")
    assert h.deps.proxy.shedding_watched() == set()
    assert (await ask(h, kit)).is_success
    assert h.deps.proxy.shedding_watched() == {("llm", "smol")}
    h.clock.now += WATCH_S - 1
    assert h.deps.proxy.shedding_watched() == {("llm", "smol")}
    h.clock.now += 2
    assert h.deps.proxy.shedding_watched() == set()


async def test_the_scraper_reads_the_watched_models_replicas() -> None:
    """Only `kv-aware` models' replicas were read: a round-robin model's
    sheddable requests would never have found one full."""
    route = {
        "name": "m",
        "namespace": "llm",
        "servedName": "m",
        "service": "m",
        "strategy": "round-robin",
    }
    catalog = Catalog(clock=lambda: 0.0)
    catalog.set_document(RoutingDocument.model_validate({"models": [route]}))
    catalog.set_endpoints("llm", "m", [Endpoint("http://a")])
    read: list[str] = []

    class Upstream:
        async def request(self, method: str, url: str, timeout_s: float) -> Any:
            read.append(url)

            class Response:
                status = 200

                async def read(self) -> bytes:
                    return b"vllm:num_requests_waiting 7\n"

            return Response()

    watched: set[tuple[str, str]] = set()
    scraper = MetricsScraper(catalog, Upstream(), 2.0, lambda: 0.0, lambda: watched)  # type: ignore[arg-type]
    await scraper.scrape_once()
    assert read == []
    watched.add(("llm", "m"))
    await scraper.scrape_once()
    assert read == ["http://a/metrics"]
    assert catalog.all_replicas()["http://a"].load.waiting == 7


async def test_grpc_metadata_asks_for_the_priority(kit: Any) -> None:
    h = build(kit)
    fill(h)
    async with kit.grpc_stub(h) as stub:
        code, _ = await kit.grpc_chat(stub, "chat")
        assert code is grpc.StatusCode.OK
        code, trailers = await kit.grpc_chat(
            stub, "chat", metadata=(("x-citadel-priority", "sheddable"),)
        )
    assert code is grpc.StatusCode.UNAVAILABLE
    assert trailers["retry-after"] == "2"
    assert shed(h) == 1


async def test_graphql_requests_ask_by_the_header(kit: Any) -> None:
    h = build(kit)
    fill(h)
    answer = await kit.graphql_chat(h, "chat")
    assert answer.json()["data"]["chatCompletion"]["model"] == "smollm2"
    answer = await kit.graphql_chat(h, "chat", SHEDDABLE)
    [error] = answer.json()["errors"]
    assert error["extensions"]["code"] == "model_overloaded"
    assert shed(h) == 1


@pytest.mark.parametrize(
    ("key", "asked", "served"),
    [
        (Priority.STANDARD, (), Priority.STANDARD),
        (Priority.SHEDDABLE, (), Priority.SHEDDABLE),
        (Priority.STANDARD, ("sheddable",), Priority.SHEDDABLE),
        (Priority.STANDARD, ("STANDARD",), Priority.STANDARD),
        (Priority.SHEDDABLE, ("standard",), Priority.SHEDDABLE),
        # Repeated, or listed with commas: the lowest, whatever the order.
        (Priority.STANDARD, ("standard", "sheddable"), Priority.SHEDDABLE),
        (Priority.STANDARD, ("sheddable", "standard"), Priority.SHEDDABLE),
        (Priority.STANDARD, ("standard, sheddable",), Priority.SHEDDABLE),
        (Priority.STANDARD, ("standard", "urgent"), None),
        (Priority.STANDARD, ("critical",), None),
        (Priority.STANDARD, ("",), None),
    ],
)
def test_priority_of(
    key: Priority, asked: tuple[str, ...], served: Priority | None
) -> None:
    assert priority_of(key, asked) is served


def test_saturated_needs_every_replica_full() -> None:
    doc = RoutingDocument.model_validate(
        {
            "models": [
                {
                    "name": "m",
                    "namespace": "llm",
                    "servedName": "m",
                    "service": "m",
                    "strategy": "least-load",
                }
            ]
        }
    )
    catalog = Catalog(clock=lambda: 0.0)
    catalog.set_document(doc)
    catalog.set_endpoints("llm", "m", [Endpoint("http://a"), Endpoint("http://b")])
    [route] = doc.models
    shedder = LoadShedder(catalog, SheddingSettings(queue_depth=2), lambda: 10.0)
    a, b = (catalog.all_replicas()[u] for u in ("http://a", "http://b"))
    a.load = LoadReport(waiting=3, scraped_at=10.0)
    b.load = LoadReport(waiting=2, scraped_at=10.0)
    assert not shedder.saturated(route)
    b.load = LoadReport(waiting=3, scraped_at=10.0)
    assert shedder.saturated(route)
    # 0: full once a request waits.
    zero = LoadShedder(catalog, SheddingSettings(queue_depth=0), lambda: 10.0)
    a.load = b.load = LoadReport(waiting=1, scraped_at=10.0)
    assert zero.saturated(route)
    a.load = LoadReport(waiting=0, scraped_at=10.0)
    assert not zero.saturated(route)


@pytest.mark.parametrize("priority", ["standard", "sheddable"])
async def test_graphql_usage_tells_the_keys_priority(kit: Any, priority: str) -> None:
    h = build(kit, priority)
    async with h.client() as client:
        answer = await client.post(
            "/graphql", json={"query": "{ usage { key role priority } }"}
        )
    usage = answer.json()["data"]["usage"]
    assert usage == {"key": "batch", "role": "user", "priority": priority}
