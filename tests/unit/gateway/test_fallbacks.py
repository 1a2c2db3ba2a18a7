"""Fallbacks: other models that answer a model's requests when none of its own
replicas can (`ModelRoute.fallbacks`, `ProxyService._send_or_fall_back`)."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpc
import orjson
import pytest

from citadel.gateway.errors import RateLimited
from citadel.gateway.routes import RoutingDocument
from citadel.gateway.services.auth import KeyRecord, hash_key
from citadel.gateway.services.limits import Standing
from citadel.gateway.services.proxy import FALLBACK_HEADER, WAKE_SIGNAL_S
from citadel.gateway.services.replicas import Endpoint
from citadel.gateway.services.requests import CHAT
from citadel.gateway.upstream import (
    UpstreamDropped,
    UpstreamTimeout,
    UpstreamUnreachable,
)

pytestmark = pytest.mark.unit

ADAPTER = "sql-expert"
CHUNK = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
USAGE = {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2}}


def route(name: str, served: str, **fields: Any) -> dict[str, Any]:
    """A route of its own Service (`name`), replicas named after it."""
    return {
        "name": name,
        "namespace": "llm",
        "servedName": served,
        "service": name,
        "strategy": "round-robin",
        **fields,
    }


def document(big: dict[str, Any] | None = None, **others: Any) -> RoutingDocument:
    """`big` (falls back to `chat` unless `big` says otherwise), `smollm2`
    (alias `chat`, adapter `sql-expert`) and `tiny`, each changed by its
    keyword's fields."""
    return RoutingDocument.model_validate(
        {
            "models": [
                route("big", "big", **{"fallbacks": ["chat"], **(big or {})}),
                route(
                    "smol",
                    "smollm2",
                    aliases=["chat"],
                    adapters=[ADAPTER],
                    **others.get("smol", {}),
                ),
                route("tiny", "tiny", **others.get("tiny", {})),
            ]
        }
    )


def build(
    kit: Any,
    doc: RoutingDocument | None = None,
    scale_from_zero_s: float = 300.0,
    **replicas: Any,
) -> Any:
    """A harness on `doc`, with alice allowed every model: `big` without a
    replica and one for each other model (`http://<name>1`) unless `replicas`
    says otherwise (a model's name: its replicas' addresses)."""
    h = kit.build(doc=doc or document(), retries=2, scale_from_zero_s=scale_from_zero_s)
    h.keys.replace_all(
        (KeyRecord(name="alice", hash=hash_key(kit.key), models=("*",)),)
    )
    placed = {"big": (), "smol": ("http://smol1",), "tiny": ("http://tiny1",)}
    for name, urls in {**placed, **replicas}.items():
        h.deps.catalog.set_endpoints("llm", name, [Endpoint(u) for u in urls])
    return h


def answering(kit: Any, **by_host: Any) -> Callable[[str, Any], Any]:
    """An upstream handler: a replica whose host is a key of `by_host` gives
    its reply (or raises it); any other answers as the model sent."""

    def handler(url: str, body: Any) -> Any:
        host = url.split("/")[2]
        if host in by_host:
            return by_host[host]
        return kit.completion(model=body["model"])

    return handler


def asked(h: Any) -> list[tuple[str, str]]:
    """Each replica called, and the model its body named."""
    return [(url.split("/")[2], body["model"]) for url, body, _ in h.upstream.calls]


def fallbacks(h: Any, fallback: str, reason: str, model: str = "big") -> float | None:
    sample = h.deps.metrics.registry.get_sample_value
    labels = {"model": model, "fallback": fallback, "reason": reason}
    return sample("citadel_gateway_fallbacks_total", labels)  # type: ignore[no-any-return]


def tried(h: Any) -> float:
    """Every fallback the gateway turned to, whatever the labels."""
    metrics = h.deps.metrics.registry.collect()
    family = next(m for m in metrics if m.name == "citadel_gateway_fallbacks")
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


def demand(h: Any, model: str) -> float | None:
    labels = {"model_namespace": "llm", "llmmodel": model, "state": "waiting"}
    value = h.deps.metrics.registry.get_sample_value(
        "citadel_gateway_model_requests", labels
    )
    return value  # type: ignore[no-any-return]


async def standing(h: Any, kit: Any, name: str) -> list[Standing]:
    """Where alice's buckets for the model `name` stand."""
    principal = h.deps.authenticator.authenticate(f"Bearer {kit.key}")
    model = h.deps.catalog.route_named(name)
    return await h.deps.proxy.limiter.standing(principal, [model])  # type: ignore[no-any-return]


async def ask(h: Any, kit: Any, model: str = "big", **body: Any) -> Any:
    async with h.client() as client:
        return await client.post(
            "/v1/chat/completions", json={**kit.chat, "model": model, **body}
        )


async def test_a_model_without_replicas_is_answered_by_its_fallback(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = build(kit)
    caplog.set_level("INFO", logger="citadel.gateway.access")
    answer = await ask(h, kit)
    assert answer.status_code == 200
    # Listed as `chat`, an alias: sent as the served name, named as listed.
    assert answer.headers[FALLBACK_HEADER] == "chat"
    assert answer.json()["model"] == "smollm2"
    assert asked(h) == [("smol1", "smollm2")]
    # Counted once, under the model that answered.
    assert kit.counted(h, "200", model="smollm2") == 1
    assert kit.counted(h, "200", model="big") is None
    assert kit.counted(h, "503", model="big") is None
    assert fallbacks(h, "chat", "no_replica") == 1
    tokens = h.deps.metrics.registry.get_sample_value(
        "citadel_gateway_tokens_total",
        {"model": "smollm2", "key": "alice", "kind": "completion"},
    )
    assert tokens == 5
    [line] = [r for r in caplog.records if r.getMessage() == "request"]
    assert (line.model, line.fallback_from) == ("smollm2", "big")  # type: ignore[attr-defined]


async def test_a_model_without_fallbacks_answers_as_before(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = build(kit, document(big={"fallbacks": []}))
    caplog.set_level("INFO", logger="citadel.gateway.access")
    answer = await ask(h, kit)
    assert answer.status_code == 503
    assert answer.json()["error"]["code"] == "model_not_ready"
    assert FALLBACK_HEADER not in answer.headers
    assert not h.upstream.calls
    assert tried(h) == 0
    [line] = [r for r in caplog.records if r.getMessage() == "request"]
    assert not hasattr(line, "fallback_from")


async def test_a_model_that_answers_keeps_its_requests(kit: Any) -> None:
    h = build(kit, big=("http://big1",))
    answer = await ask(h, kit)
    assert answer.status_code == 200
    assert FALLBACK_HEADER not in answer.headers
    assert asked(h) == [("big1", "big")]
    assert kit.counted(h, "200", model="big") == 1
    assert tried(h) == 0


async def test_the_requested_models_limits_are_final(kit: Any) -> None:
    """A client its own limits refuse is refused, never served elsewhere."""
    h = build(kit, document(big={"limits": {"rpm": 1}}), big=("http://big1",))
    assert (await ask(h, kit)).status_code == 200
    h.deps.catalog.set_endpoints("llm", "big", [])
    refused = await ask(h, kit)
    assert refused.status_code == 429
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    assert FALLBACK_HEADER not in refused.headers
    assert asked(h) == [("big1", "big")]
    assert tried(h) == 0


async def test_a_key_that_may_not_use_the_model_is_refused(kit: Any) -> None:
    h = build(kit)
    h.keys.replace_all(
        (KeyRecord(name="alice", hash=hash_key(kit.key), models=("smollm2",)),)
    )
    refused = await ask(h, kit)
    assert refused.status_code == 403
    assert not h.upstream.calls
    assert tried(h) == 0


async def test_a_fallback_the_key_may_not_use_is_skipped(kit: Any) -> None:
    h = build(kit, document(big={"fallbacks": ["tiny", "chat"]}))
    h.keys.replace_all(
        (KeyRecord(name="alice", hash=hash_key(kit.key), models=("big", "chat")),)
    )
    answer = await ask(h, kit)
    assert answer.status_code == 200
    assert answer.headers[FALLBACK_HEADER] == "chat"
    assert asked(h) == [("smol1", "smollm2")]
    assert fallbacks(h, "tiny", "no_replica") is None  # skipped: not counted
    assert fallbacks(h, "chat", "no_replica") == 1


async def test_a_fallback_whose_limits_refuse_the_key_is_skipped_untouched(
    kit: Any,
) -> None:
    doc = document(
        big={"fallbacks": ["tiny", "chat"]},
        tiny={"limits": {"rpm": 1, "tpm": 100_000}},
    )
    h = build(kit, doc)
    assert (await ask(h, kit, "tiny")).status_code == 200  # its one request
    before = await standing(h, kit, "tiny")
    assert [s.remaining for s in before] == [0, 100_000 - 15]
    answer = await ask(h, kit)
    assert answer.status_code == 200
    assert answer.headers[FALLBACK_HEADER] == "chat"
    assert asked(h) == [("tiny1", "tiny"), ("smol1", "smollm2")]
    # Its refusal took nothing, tokens neither.
    assert await standing(h, kit, "tiny") == before
    assert fallbacks(h, "tiny", "no_replica") is None


async def test_the_models_left_give_their_admissions_back(kit: Any) -> None:
    """The requested model's request and tokens go back to its buckets, and
    the key's own buckets are charged once, by the model that answered."""
    doc = document(
        big={"fallbacks": ["tiny", "chat"], "limits": {"rpm": 1, "tpm": 1000}},
        tiny={"limits": {"rpm": 1}},
        smol={"limits": {"rpm": 10}},
    )
    h = build(kit, doc, tiny=())
    h.keys.replace_all(
        (KeyRecord(name="alice", hash=hash_key(kit.key), models=("*",), rpm=1),)
    )
    answer = await ask(h, kit)
    assert answer.status_code == 200
    assert answer.headers[FALLBACK_HEADER] == "chat"
    # The answering model's limits, as any request for it shows them.
    assert answer.headers["x-ratelimit-limit-requests"] == "1"  # the key's
    assert answer.headers["x-ratelimit-remaining-requests"] == "0"
    assert fallbacks(h, "tiny", "no_replica") == 1
    assert fallbacks(h, "chat", "no_replica") == 1
    big = {(s.scope, s.model): s.remaining for s in await standing(h, kit, "big")}
    assert big[("requests", "big")] == 1
    assert big[("tokens", "big")] == 1000
    assert big[("requests", None)] == 0  # the key's: one request, charged once
    tiny = {(s.scope, s.model): s.remaining for s in await standing(h, kit, "tiny")}
    assert tiny[("requests", "tiny")] == 1
    smol = await standing(h, kit, "chat")
    assert {(s.scope, s.model): s.remaining for s in smol}[("requests", "smollm2")] == 9


async def test_with_every_fallback_failing_the_client_gets_the_models_error(
    kit: Any,
) -> None:
    doc = document(
        big={"fallbacks": ["ghost", "tiny", "chat"], "limits": {"rpm": 5}},
    )
    h = build(kit, doc, tiny=())
    h.upstream.handler = answering(kit, smol1=UpstreamUnreachable("connection refused"))
    answer = await ask(h, kit)
    assert answer.status_code == 503
    error = answer.json()["error"]
    assert error["code"] == "model_not_ready"
    assert "`big` has no ready replica" in error["message"]
    assert answer.headers["retry-after"] == "5"
    assert FALLBACK_HEADER not in answer.headers
    # Its requests-per-minute given back, as its headers say.
    assert answer.headers["x-ratelimit-limit-requests"] == "5"
    assert answer.headers["x-ratelimit-remaining-requests"] == "5"
    assert kit.counted(h, "503", model="big") == 1
    assert kit.counted(h, "503", model="smollm2") is None
    # `ghost` names no model: skipped; the others tried.
    assert tried(h) == 2
    assert fallbacks(h, "tiny", "no_replica") == 1
    assert fallbacks(h, "chat", "no_replica") == 1
    assert asked(h) == [("smol1", "smollm2")]


async def test_with_every_fallback_skipped_the_client_gets_the_models_error(
    kit: Any,
) -> None:
    h = build(kit, document(big={"fallbacks": ["ghost"]}))
    answer = await ask(h, kit)
    assert answer.status_code == 503
    assert "`big` has no ready replica" in answer.json()["error"]["message"]
    assert not h.upstream.calls
    assert tried(h) == 0


async def test_a_busy_model_turns_to_its_fallback(kit: Any) -> None:
    h = build(kit, big=("http://big1", "http://big2"))
    busy = kit.reply(status=429, body=b'{"error": {"message": "queue full"}}')
    h.upstream.handler = answering(kit, big1=busy, big2=busy)
    answer = await ask(h, kit)
    assert answer.status_code == 200
    assert answer.headers[FALLBACK_HEADER] == "chat"
    *both, last = asked(h)
    assert sorted(both) == [("big1", "big"), ("big2", "big")]
    assert last == ("smol1", "smollm2")
    assert fallbacks(h, "chat", "busy") == 1


async def test_the_reason_is_why_the_model_before_could_not_answer(kit: Any) -> None:
    h = build(kit, document(big={"fallbacks": ["tiny", "chat"]}))
    h.upstream.handler = answering(
        kit, tiny1=kit.reply(status=429, body=b"{}", retry_after="1")
    )
    answer = await ask(h, kit)
    assert answer.headers[FALLBACK_HEADER] == "chat"
    assert fallbacks(h, "tiny", "no_replica") == 1
    assert fallbacks(h, "chat", "busy") == 1
    assert tried(h) == 2


async def test_a_busy_model_without_a_fallback_left_says_so(kit: Any) -> None:
    h = build(kit, big=("http://big1",), smol=())
    h.upstream.handler = answering(
        kit, big1=kit.reply(status=429, body=b"{}", retry_after="7")
    )
    answer = await ask(h, kit)
    assert answer.status_code == 429
    assert answer.headers["retry-after"] == "7"
    assert kit.counted(h, "429", model="big") == 1
    assert fallbacks(h, "chat", "busy") == 1


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (UpstreamDropped("connection closed"), 502),
        (UpstreamTimeout("no answer"), 504),
    ],
)
async def test_a_model_that_may_have_worked_on_it_is_final(
    kit: Any, failure: Exception, status: int
) -> None:
    h = build(kit, big=("http://big1", "http://big2"))
    h.upstream.handler = answering(kit, big1=failure, big2=failure)
    answer = await ask(h, kit)
    assert answer.status_code == status
    assert FALLBACK_HEADER not in answer.headers
    assert all(host != "smol1" for host, _ in asked(h))
    assert tried(h) == 0


async def test_a_fallbacks_own_failure_is_the_answer(kit: Any) -> None:
    h = build(kit, document(big={"fallbacks": ["chat", "tiny"]}))
    h.upstream.handler = answering(kit, smol1=UpstreamTimeout("no answer"))
    answer = await ask(h, kit)
    assert answer.status_code == 504
    assert answer.headers[FALLBACK_HEADER] == "chat"
    assert kit.counted(h, "504", model="smollm2") == 1
    assert all(host != "tiny1" for host, _ in asked(h))


async def test_a_stream_is_answered_by_the_fallback(kit: Any) -> None:
    h = build(kit)
    h.upstream.handler = answering(kit, smol1=kit.sse_reply(CHUNK, USAGE))
    answer, relayed = await kit.stream_chat(h, "big")
    assert answer.status_code == 200
    assert answer.headers[FALLBACK_HEADER] == "chat"
    assert b'"hi"' in relayed
    assert asked(h) == [("smol1", "smollm2")]
    assert kit.counted(h, "200", model="smollm2") == 1


async def test_an_adapter_listed_as_a_fallback_is_sent_by_its_name(kit: Any) -> None:
    h = build(kit, document(big={"fallbacks": [ADAPTER]}))
    answer = await ask(h, kit)
    assert answer.headers[FALLBACK_HEADER] == ADAPTER
    assert asked(h) == [("smol1", ADAPTER)]
    assert kit.counted(h, "200", model=ADAPTER) == 1


async def test_a_model_at_zero_turns_to_its_fallback_at_once_and_is_woken(
    kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The loop's timers run a hundred times faster: the wake signal's 5 s
    # pass in 50 ms, its delay recorded as asked.
    loop = asyncio.get_running_loop()
    real = loop.call_later
    delays: list[float] = []

    def faster(delay: float, callback: Any, *args: Any, **kw: Any) -> Any:
        delays.append(delay)
        return real(delay / 100, callback, *args, **kw)

    monkeypatch.setattr(loop, "call_later", faster)
    h = build(kit, document(big={"scaleFromZero": True}))
    began = loop.time()
    answer = await ask(h, kit)
    assert loop.time() - began < 0.5  # not held
    assert answer.status_code == 200
    assert answer.headers[FALLBACK_HEADER] == "chat"
    assert fallbacks(h, "chat", "waking") == 1
    assert demand(h, "big") == 1  # what the autoscaler reads to start it
    assert WAKE_SIGNAL_S in delays
    async with asyncio.timeout(1):
        while demand(h, "big") != 0:
            await asyncio.sleep(0.005)
    assert WAKE_SIGNAL_S == 5.0


def faster_timers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The loop's timers run twenty times faster (the wake signal's 5 s pass
    in 0.25 s)."""
    loop = asyncio.get_running_loop()
    real = loop.call_later

    def faster(delay: float, callback: Any, *args: Any, **kw: Any) -> Any:
        return real(delay / 20, callback, *args, **kw)

    monkeypatch.setattr(loop, "call_later", faster)


async def test_a_model_at_zero_with_no_fallback_left_is_held_for_itself(
    kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As it would be without fallbacks: they make an answer come sooner,
    # never a 503 where the model would have answered once awake.
    faster_timers(monkeypatch)
    doc = document(
        big={"scaleFromZero": True, "limits": {"rpm": 2}},
        smol={"limits": {"rpm": 10}},
    )
    h = build(kit, doc, smol=())
    h.keys.replace_all(
        (KeyRecord(name="alice", hash=hash_key(kit.key), models=("*",), rpm=5),)
    )
    asking = asyncio.create_task(ask(h, kit))
    async with asyncio.timeout(1):
        while not fallbacks(h, "chat", "waking"):
            await asyncio.sleep(0.005)
    # Held, and counted as waiting once (by the hold; the wake signal's
    # count ends when the hold begins): twice would ask for two replicas.
    await asyncio.sleep(0.05)
    assert not asking.done()
    assert demand(h, "big") == 1
    h.deps.catalog.set_endpoints("llm", "big", [Endpoint("http://big1")])
    answer = await asyncio.wait_for(asking, 1)
    assert answer.status_code == 200
    assert FALLBACK_HEADER not in answer.headers
    assert asked(h) == [("big1", "big")]
    assert kit.counted(h, "200", model="big") == 1
    assert demand(h, "big") == 0
    await asyncio.sleep(0.3)  # the signal's own end, now, takes nothing
    assert demand(h, "big") == 0
    # The fallback that could not answer gave its admission back; the model
    # and the key are charged one request each.
    big = {(s.scope, s.model): s.remaining for s in await standing(h, kit, "big")}
    assert big[("requests", "big")] == 1
    assert big[("requests", None)] == 4
    smol = await standing(h, kit, "chat")
    assert {(s.scope, s.model): s.remaining for s in smol}[
        ("requests", "smollm2")
    ] == 10


async def test_a_model_at_zero_held_after_its_fallbacks_says_why_it_timed_out(
    kit: Any,
) -> None:
    h = build(kit, document(big={"scaleFromZero": True}), 0.2, smol=())
    answer = await asyncio.wait_for(ask(h, kit), 2)
    assert answer.status_code == 503
    error = answer.json()["error"]["message"]
    assert "`big` is starting from zero and had no ready replica within 0.2 s" in error
    assert FALLBACK_HEADER not in answer.headers
    assert kit.counted(h, "503", model="big") == 1
    assert demand(h, "big") == 0


@pytest.mark.parametrize("listed", [[], ["chat"]])
async def test_a_hold_that_times_out_after_busy_fallbacks_charges_nothing(
    kit: Any, listed: list[str]
) -> None:
    # The fallback's replica said 429 (it reached one); the model's own hold
    # then ended with no replica of it ever reached: given back in full, as
    # the same hold without fallbacks.
    doc = document(
        big={"scaleFromZero": True, "fallbacks": listed, "limits": {"rpm": 5}}
    )
    h = build(kit, doc, 0.2)
    h.keys.replace_all(
        (KeyRecord(name="alice", hash=hash_key(kit.key), models=("*",), rpm=10),)
    )
    h.upstream.handler = answering(kit, smol1=kit.reply(429, b'{"error": {}}'))
    answer = await asyncio.wait_for(ask(h, kit), 3)
    assert answer.status_code == 503
    big = {(s.scope, s.model): s.remaining for s in await standing(h, kit, "big")}
    assert big[("requests", "big")] == 5
    assert big[("requests", None)] == 10


async def test_a_refused_second_admission_leaves_the_model_woken(kit: Any) -> None:
    # Held after its fallback failed, the model's admission is taken again;
    # refused (the key's last request went meanwhile to another model), the
    # refusal is the answer, and the wake signal still counts the request.
    h = build(kit, document(big={"scaleFromZero": True}))
    h.upstream.handler = answering(kit, smol1=kit.reply(429, b'{"error": {}}'))
    limiter = h.deps.proxy.limiter
    admit = limiter.admit
    asked_for: list[str] = []

    async def refusing_the_second(principal: Any, route: Any, estimate: int) -> Any:
        asked_for.append(route.served_name)
        if asked_for.count("big") == 2:
            raise RateLimited(
                "The key's requests per minute are used up.", retry_after_s=30
            )
        return await admit(principal, route, estimate)

    limiter.admit = refusing_the_second
    answer = await asyncio.wait_for(ask(h, kit), 2)
    assert answer.status_code == 429
    assert asked_for == ["big", "smollm2", "big"]
    assert demand(h, "big") == 1


async def test_a_model_at_zero_with_no_hold_and_no_fallback_left_answers_at_once(
    kit: Any,
) -> None:
    h = build(kit, document(big={"scaleFromZero": True}), 0, smol=())
    answer = await asyncio.wait_for(ask(h, kit), 0.5)
    assert answer.status_code == 503
    assert "`big` is starting from zero" in answer.json()["error"]["message"]
    assert kit.counted(h, "503", model="big") == 1
    assert demand(h, "big") == 1  # the signal wakes it all the same
    assert fallbacks(h, "chat", "waking") == 1


async def test_a_model_at_zero_with_a_ready_replica_answers_itself(kit: Any) -> None:
    h = build(kit, document(big={"scaleFromZero": True}), big=("http://big1",))
    answer = await ask(h, kit)
    assert FALLBACK_HEADER not in answer.headers
    assert asked(h) == [("big1", "big")]
    assert demand(h, "big") == 0


async def test_a_fallback_at_zero_is_skipped_not_held(kit: Any) -> None:
    doc = document(big={"fallbacks": ["tiny", "chat"]}, tiny={"scaleFromZero": True})
    h = build(kit, doc, tiny=())
    answer = await asyncio.wait_for(ask(h, kit), 0.5)
    assert answer.headers[FALLBACK_HEADER] == "chat"
    assert fallbacks(h, "tiny", "no_replica") is None
    assert demand(h, "tiny") == 0


async def test_a_fallbacks_own_fallbacks_are_not_followed(kit: Any) -> None:
    doc = document(big={"fallbacks": ["tiny"]}, tiny={"fallbacks": ["chat"]})
    h = build(kit, doc, tiny=())
    answer = await ask(h, kit)
    assert answer.status_code == 503
    assert "`big` has no ready replica" in answer.json()["error"]["message"]
    assert not h.upstream.calls
    assert fallbacks(h, "tiny", "no_replica") == 1
    assert tried(h) == 1


async def test_a_fallback_naming_the_model_itself_is_skipped(kit: Any) -> None:
    # The document refuses such a route; one made past its checks still
    # never sends the request back to the replicas that failed it.
    doc = document()
    big = doc.models[0].model_copy(update={"fallbacks": ("big", "chat")})
    h = build(kit, RoutingDocument(models=(big, *doc.models[1:])))
    answer = await ask(h, kit)
    assert answer.headers[FALLBACK_HEADER] == "chat"
    assert fallbacks(h, "big", "no_replica") is None
    assert tried(h) == 1


async def test_every_door_goes_through_it(kit: Any) -> None:
    """The other doors call `handle` as REST does (their own headers aside)."""
    h = build(kit)
    principal = h.deps.authenticator.authenticate(f"Bearer {kit.key}")
    raw = orjson.dumps({**kit.chat, "model": "big"})
    answer = await h.deps.proxy.handle(CHAT, principal, raw, "r-1")
    assert answer.status == 200
    assert answer.headers[FALLBACK_HEADER] == "chat"


async def test_grpc_passes_the_fallback_on_in_its_trailers(kit: Any) -> None:
    h = build(kit)
    async with kit.grpc_stub(h) as stub:
        code, trailers = await kit.grpc_chat(stub, "big")
        assert (code, trailers[FALLBACK_HEADER]) == (grpc.StatusCode.OK, "chat")
        # A fallback's own failure says whose it is, as on REST.
        h.upstream.handler = answering(kit, smol1=kit.reply(500, b"boom"))
        code, trailers = await kit.grpc_chat(stub, "big")
        assert (code, trailers[FALLBACK_HEADER]) == (
            grpc.StatusCode.UNAVAILABLE,
            "chat",
        )


async def test_graphql_passes_the_fallback_on_in_its_response(kit: Any) -> None:
    answer = await kit.graphql_chat(build(kit), "big")
    assert answer.json()["data"]["chatCompletion"]["model"] == "smollm2"
    assert answer.headers[FALLBACK_HEADER] == "chat"


async def test_a_fallbacks_failed_answer_names_it(kit: Any) -> None:
    # Its replica answered 500: the 502 says whose failure it is, as the
    # failures raised while it was tried do.
    h = build(kit)
    h.upstream.handler = answering(
        kit, smol1=kit.reply(status=500, body=b'{"error": {"message": "boom"}}')
    )
    answer = await ask(h, kit)
    assert answer.status_code == 502
    assert answer.headers[FALLBACK_HEADER] == "chat"
    assert kit.counted(h, "502", model="smollm2") == 1


class SlowAdjust:
    """The in-process buckets with an adjust that takes a round trip, as
    Redis's does."""

    def __init__(self, inner: Any) -> None:
        self.inner = inner
        self.entered = asyncio.Event()

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def adjust(self, takes: Any, now: float) -> Any:
        self.entered.set()
        await asyncio.sleep(0.05)
        return await self.inner.adjust(takes, now)


async def test_a_client_that_leaves_during_the_give_back_does_not_cut_it(
    kit: Any,
) -> None:
    h = build(kit, document(big={"limits": {"rpm": 3, "tpm": 1000}}))
    limiter = h.deps.proxy.limiter
    slow = SlowAdjust(limiter._store)
    limiter._store = slow
    principal = h.deps.authenticator.authenticate(f"Bearer {kit.key}")
    raw = orjson.dumps({**kit.chat, "model": "big"})
    task = asyncio.create_task(h.deps.proxy.handle(CHAT, principal, raw, "r-1"))
    await slow.entered.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await asyncio.sleep(0.1)  # the give-back, spared, ends
    limiter._store = slow.inner
    left = {(s.scope, s.model): s.remaining for s in await standing(h, kit, "big")}
    assert left[("requests", "big")] == 3
    assert left[("tokens", "big")] == 1000
