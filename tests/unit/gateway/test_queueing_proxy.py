"""A model with `maxRequestsPerReplica` through the proxy: at most that many
requests at each replica, more waiting at the gateway (`ReplicaQueue`) for the
first replica with room, standard before sheddable, up to the queue timeout."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import orjson
import pytest

from citadel.gateway.routes import RoutingDocument
from citadel.gateway.services import queueing
from citadel.gateway.services.auth import KeyRecord, hash_key
from citadel.gateway.services.replicas import Endpoint
from citadel.gateway.services.requests import CHAT
from citadel.gateway.services.shedding import PRIORITY_HEADER
from citadel.gateway.settings import GatewaySettings
from citadel.gateway.wiring import proxy_options

pytestmark = pytest.mark.unit

SMOL = ("llm", "smol")
CHUNK = {"choices": [{"index": 0, "delta": {"content": "hi"}}]}
R1, R2 = "http://r1", "http://r2"


@pytest.fixture(autouse=True)
def no_recheck(monkeypatch: pytest.MonkeyPatch) -> None:
    """Waiting requests look again only when told to (a replica freed, the
    route changed): what serves them here is what should."""
    monkeypatch.setattr(queueing, "RECHECK_S", 60.0)


def bounded(
    kit: Any, bound: int | None = 1, replicas: tuple[str, ...] = (R1,), **build: Any
) -> Any:
    """A harness whose `smollm2` has at most `bound` requests at each of
    `replicas` (None: no bound)."""
    doc = kit.document() if bound is None else kit.document(maxRequestsPerReplica=bound)
    return kit.build(doc=doc, replicas=replicas, **build)


class Held:
    """Replicas that hold each request until the test answers it, by what its
    last message says; `arrived` lists (replica, said) in arrival order and
    `timeouts` the time each try was given."""

    def __init__(self, h: Any, kit: Any) -> None:
        self.kit = kit
        self.arrived: list[tuple[str, str]] = []
        self.timeouts: list[float | None] = []
        self.refuse: set[str] = set()
        """What a replica answers 429 to, once."""
        self._gates: dict[str, asyncio.Event] = {}
        h.upstream.post = self.post

    async def post(
        self, url: str, body: bytes, headers: Any, timeout_s: float | None = None
    ) -> Any:
        said = orjson.loads(body)["messages"][-1]["content"]
        self.arrived.append((url.removesuffix("/v1/chat/completions"), said))
        self.timeouts.append(timeout_s)
        if said in self.refuse:
            self.refuse.discard(said)
            return self.kit.reply(status=429, body=b'{"error": "busy"}')
        await self._gate(said).wait()
        return self.kit.completion()

    def answer(self, said: str) -> None:
        self._gate(said).set()

    def at(self, said: str) -> str | None:
        """The replica that holds the request that says `said`, if one does."""
        held = [r for r, s in self.arrived if s == said]
        return held[-1] if held else None

    def _gate(self, said: str) -> asyncio.Event:
        return self._gates.setdefault(said, asyncio.Event())


def ask(
    h: Any, kit: Any, said: str, headers: dict[str, str] | None = None
) -> asyncio.Task[Any]:
    """A chat that says `said`, sent over HTTP as a task."""

    async def send() -> Any:
        body = {**kit.chat, "messages": [{"role": "user", "content": said}]}
        async with h.client() as client:
            return await client.post("/v1/chat/completions", json=body, headers=headers)

    return asyncio.create_task(send())


async def first_held(kit: Any) -> tuple[Any, Held, asyncio.Task[Any]]:
    """A harness whose one replica, at its bound of 1, holds the request that
    says "first": the harness, its held replica, and that request."""
    h = bounded(kit)
    held = Held(h, kit)
    first = await arrived(held, h, kit, "first")
    return h, held, first


def handled(h: Any, kit: Any) -> asyncio.Task[Any]:
    """A chat handed to the proxy itself, as a task: cancelling it is a client
    that leaves (a gRPC cancel), which HTTP tests cannot send."""
    principal = h.deps.authenticator.authenticate(f"Bearer {kit.key}")
    return asyncio.create_task(
        h.deps.proxy.handle(CHAT, principal, orjson.dumps(kit.chat), "r-2")
    )


async def arrived(
    held: Held, h: Any, kit: Any, said: str, headers: dict[str, str] | None = None
) -> asyncio.Task[Any]:
    """`ask`, once the request is held at a replica."""
    task = ask(h, kit, said, headers)
    await until(lambda: held.at(said) is not None)
    return task


def demand(h: Any, state: str) -> float | None:
    labels = {"model_namespace": SMOL[0], "llmmodel": SMOL[1], "state": state}
    value = h.deps.metrics.registry.get_sample_value(
        "citadel_gateway_model_requests", labels
    )
    return value  # type: ignore[no-any-return]


def waited(h: Any, priority: str = "standard") -> float | None:
    """How many requests were observed in the queue's wait histogram."""
    value = h.deps.metrics.registry.get_sample_value(
        "citadel_gateway_queue_wait_seconds_count",
        {"model": "smollm2", "priority": priority},
    )
    return value  # type: ignore[no-any-return]


def in_flight(h: Any, url: str = R1) -> int:
    return h.deps.catalog.all_replicas()[url].in_flight  # type: ignore[no-any-return]


async def done(task: asyncio.Task[Any]) -> Any:
    """What `task` gave, failing after 5 s (not served in time)."""
    return await asyncio.wait_for(task, 5)


async def until(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    async with asyncio.timeout(within_s):
        while not condition():
            await asyncio.sleep(0.005)


async def test_a_request_waits_for_the_replica_at_its_bound_and_is_served_next(
    kit: Any,
) -> None:
    h, held, first = await first_held(kit)
    assert demand(h, "queued") == 0
    second = ask(h, kit, "second")
    await until(lambda: demand(h, "queued") == 1)
    await asyncio.sleep(0.05)
    # Held at the gateway, not sent to the replica; queued, not waiting (a
    # model without a ready replica).
    assert held.arrived == [(R1, "first")]
    assert demand(h, "waiting") == 0
    assert (in_flight(h), demand(h, "in_flight")) == (1, 1)
    held.answer("second")  # answered at once once it gets there
    held.answer("first")
    assert (await done(first)).status_code == 200
    assert (await done(second)).status_code == 200
    assert held.arrived == [(R1, "first"), (R1, "second")]
    assert (demand(h, "queued"), demand(h, "in_flight"), in_flight(h)) == (0, 0, 0)
    # Only the request that waited is observed.
    assert waited(h) == 1


async def test_a_stream_holds_its_replica_until_it_ends(kit: Any) -> None:
    h = bounded(kit)
    h.upstream.handler = lambda url, body: (
        kit.sse_reply(CHUNK) if body.get("stream") else kit.completion()
    )
    proxy = h.deps.proxy
    principal = h.deps.authenticator.authenticate(f"Bearer {kit.key}")
    streamed = await proxy.handle(
        CHAT, principal, orjson.dumps({**kit.chat, "stream": True}), "r-1"
    )
    assert streamed.stream is not None
    # Its 200 went out, its events not yet: the replica is still its.
    whole = asyncio.create_task(
        proxy.handle(CHAT, principal, orjson.dumps(kit.chat), "r-2")
    )
    await until(lambda: demand(h, "queued") == 1)
    await asyncio.sleep(0.05)
    assert len(h.upstream.calls) == 1
    assert [chunk async for chunk in streamed.stream]
    answer = await done(whole)
    assert answer.status == 200
    assert len(h.upstream.calls) == 2
    assert in_flight(h) == 0


async def test_standard_requests_are_served_before_sheddable_ones_that_came_first(
    kit: Any,
) -> None:
    h = bounded(kit)
    held = Held(h, kit)
    tasks = [ask(h, kit, "first")]
    await until(lambda: held.at("first") is not None)
    tasks.append(ask(h, kit, "batch", {PRIORITY_HEADER: "sheddable"}))
    await until(lambda: demand(h, "queued") == 1)
    tasks.append(ask(h, kit, "user"))
    await until(lambda: demand(h, "queued") == 2)
    held.answer("first")
    await until(lambda: held.at("user") is not None)
    assert held.at("batch") is None
    held.answer("user")
    await until(lambda: held.at("batch") is not None)
    held.answer("batch")
    assert [(await done(t)).status_code for t in tasks] == [200, 200, 200]
    assert [said for _, said in held.arrived] == ["first", "user", "batch"]
    assert (waited(h, "standard"), waited(h, "sheddable")) == (1, 1)


async def test_a_model_without_a_bound_never_queues(kit: Any) -> None:
    h = bounded(kit, bound=None)
    held = Held(h, kit)
    tasks = [ask(h, kit, said) for said in ("a", "b", "c")]
    await until(lambda: len(held.arrived) == 3)
    assert in_flight(h) == 3
    # Nothing queues for it: no series of queued requests either.
    assert demand(h, "queued") is None
    for said in ("a", "b", "c"):
        held.answer(said)
    assert [(await done(t)).status_code for t in tasks] == [200, 200, 200]
    assert waited(h) is None


async def test_a_request_waiting_past_the_queue_timeout_gets_a_503_and_its_refund(
    kit: Any,
) -> None:
    # Two requests a minute: the first takes one; the one refused must not.
    key = KeyRecord(name="alice", hash=hash_key(kit.key), models=("*",), rpm=2)
    h = bounded(kit, records=(key,), queue_s=0.1)
    held = Held(h, kit)
    first = await arrived(held, h, kit, "first")
    loop = asyncio.get_running_loop()
    began = loop.time()
    refused = await done(ask(h, kit, "second"))
    assert loop.time() - began >= 0.1
    assert refused.status_code == 503
    assert refused.headers["retry-after"] == "1"
    error = refused.json()["error"]
    assert (error["code"], error["type"]) == ("model_overloaded", "server_error")
    assert "smollm2" in error["message"]
    assert "maxRequestsPerReplica" in error["message"]
    assert "for 0.1 s" in error["message"]
    assert refused.headers["x-ratelimit-remaining-requests"] == "1"
    assert kit.counted(h, "503") == 1
    assert demand(h, "queued") == 0
    assert waited(h) == 1
    assert held.arrived == [(R1, "first")]
    held.answer("first")
    assert (await done(first)).status_code == 200
    # Within the minute's two: the refused one was given back.
    held.answer("third")
    third = await done(ask(h, kit, "third"))
    assert third.status_code == 200
    assert third.headers["x-ratelimit-remaining-requests"] == "0"


async def test_no_queue_timeout_refuses_at_once(
    kit: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CITADEL_GATEWAY_QUEUE_TIMEOUT_S", "0")
    options = proxy_options(GatewaySettings(routes_source="file"))
    assert options.queue_within_s == 0
    h = bounded(kit, queue_s=options.queue_within_s)
    held = Held(h, kit)
    first = await arrived(held, h, kit, "first")
    refused = await asyncio.wait_for(ask(h, kit, "second"), 0.5)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "model_overloaded"
    # No wait to tell of.
    assert "(its maxRequestsPerReplica). Retry" in refused.json()["error"]["message"]
    held.answer("first")
    assert (await done(first)).status_code == 200


async def test_a_request_cancelled_while_it_waits_frees_nothing(kit: Any) -> None:
    h, held, first = await first_held(kit)
    gone = handled(h, kit)
    await until(lambda: demand(h, "queued") == 1)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert demand(h, "queued") == 0
    # The first request's replica is still its own.
    assert (in_flight(h), demand(h, "in_flight")) == (1, 1)
    assert kit.counted(h, "499") == 1
    held.answer("first")
    assert (await done(first)).status_code == 200
    assert (in_flight(h), demand(h, "in_flight")) == (0, 0)
    assert held.arrived == [(R1, "first")]


async def test_a_request_cancelled_as_it_is_given_a_replica_gives_it_back(
    kit: Any,
) -> None:
    """The cancel comes, then room (a bound raised) before the request's task
    runs again: the queue hands it the replica, and the cancel frees it."""
    h, held, first = await first_held(kit)
    gone = handled(h, kit)
    await until(lambda: demand(h, "queued") == 1)
    gone.cancel()
    h.deps.catalog.set_document(kit.document(maxRequestsPerReplica=2))
    assert in_flight(h) == 2  # taken for it as it left
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert (in_flight(h), demand(h, "in_flight"), demand(h, "queued")) == (1, 1, 0)
    held.answer("first")
    assert (await done(first)).status_code == 200
    assert in_flight(h) == 0


@pytest.mark.parametrize("change", ["replica added", "bound raised"])
async def test_a_change_of_the_route_serves_the_waiting_requests_at_once(
    kit: Any, change: str
) -> None:
    h, held, first = await first_held(kit)
    second = ask(h, kit, "second")
    await until(lambda: demand(h, "queued") == 1)
    if change == "replica added":
        h.deps.catalog.set_endpoints("llm", "smol", [Endpoint(R1), Endpoint(R2)])
        expected = R2
    else:
        h.deps.catalog.set_document(kit.document(maxRequestsPerReplica=2))
        expected = R1
    await until(lambda: held.at("second") is not None, within_s=1)
    assert held.at("second") == expected
    assert demand(h, "queued") == 0
    held.answer("first")
    held.answer("second")
    assert [(await done(t)).status_code for t in (first, second)] == [200, 200]


async def test_each_replica_takes_its_bound_before_any_request_waits(
    kit: Any,
) -> None:
    h = bounded(kit, replicas=(R1, R2))
    held = Held(h, kit)
    tasks = [ask(h, kit, "a"), ask(h, kit, "b")]
    await until(lambda: len(held.arrived) == 2)
    assert {held.at("a"), held.at("b")} == {R1, R2}
    assert demand(h, "queued") == 0
    assert (in_flight(h, R1), in_flight(h, R2)) == (1, 1)
    tasks.append(ask(h, kit, "c"))
    await until(lambda: demand(h, "queued") == 1)
    freed = held.at("b")
    held.answer("b")
    await until(lambda: held.at("c") is not None)
    assert held.at("c") == freed
    held.answer("a")
    held.answer("c")
    assert [(await done(t)).status_code for t in tasks] == [200, 200, 200]
    assert waited(h) == 1


async def test_an_ejected_replica_is_no_room_while_a_healthy_one_is_busy(
    kit: Any,
) -> None:
    h = bounded(kit, replicas=(R1, R2))
    h.deps.catalog.all_replicas()[R2].ejected_until = h.clock.now + 60
    held = Held(h, kit)
    first = await arrived(held, h, kit, "first")
    assert held.at("first") == R1
    second = ask(h, kit, "second")
    await until(lambda: demand(h, "queued") == 1)
    await asyncio.sleep(0.05)
    assert held.at("second") is None
    held.answer("first")
    held.answer("second")
    assert [(await done(t)).status_code for t in (first, second)] == [200, 200]
    assert held.at("second") == R1
    assert in_flight(h, R2) == 0


async def retry_waiting(
    kit: Any,
) -> tuple[Any, Held, asyncio.Task[Any], asyncio.Task[Any]]:
    """Two replicas at a bound of 1: one holds the request "busy"; the other
    refuses "retried" (429), whose retry waits for the busy one. The harness,
    its replicas, and both requests."""
    h = bounded(kit, replicas=(R1, R2))
    held = Held(h, kit)
    held.refuse.add("retried")
    busy = await arrived(held, h, kit, "busy")
    retried = ask(h, kit, "retried")
    await until(lambda: demand(h, "queued") == 1)
    return h, held, busy, retried


async def test_a_retry_that_waited_is_given_what_is_left_of_the_requests_time(
    kit: Any,
) -> None:
    """A retry waits in the queue within the request's time (600 s to answer
    here): its try has what the wait left of it, not what it had before."""
    h, held, busy, retried = await retry_waiting(kit)
    assert held.timeouts == [600, 600]
    h.clock.now += 100
    held.answer("retried")
    held.answer("busy")
    assert (await done(retried)).status_code == 200
    assert (await done(busy)).status_code == 200
    assert held.arrived[-1] == (held.at("busy"), "retried")
    assert held.timeouts[-1] == 500


async def test_a_retry_whose_wait_left_too_little_time_is_not_sent(
    kit: Any,
) -> None:
    """As any retry with less than `least_try_s` left: none is sent, and the
    replica it was given is freed."""
    h, held, busy, retried = await retry_waiting(kit)
    h.clock.now += 599
    held.answer("busy")
    answer = await done(retried)
    # The replicas' refusal, as when no retry is left.
    assert answer.status_code == 429
    assert [said for _, said in held.arrived] == ["busy", "retried"]
    assert (await done(busy)).status_code == 200
    assert (in_flight(h, R1), in_flight(h, R2)) == (0, 0)


async def test_a_retry_waits_no_longer_than_the_queue_timeout(kit: Any) -> None:
    """A retry waits within the request's time, but no longer than any
    request waits at the gateway (none at all here): not up to the whole
    read timeout."""
    h = bounded(kit, replicas=(R1, R2), queue_s=0)
    held = Held(h, kit)
    held.refuse.add("retried")
    busy = await arrived(held, h, kit, "busy")
    answer = await asyncio.wait_for(ask(h, kit, "retried"), 0.5)
    # The other replica's refusal: every replica it may try was at its bound.
    assert answer.status_code == 429
    assert demand(h, "queued") == 0
    assert [said for _, said in held.arrived] == ["busy", "retried"]
    held.answer("busy")
    assert (await done(busy)).status_code == 200


async def test_a_gateway_that_begins_to_stop_ends_the_waits(kit: Any) -> None:
    h, held, first = await first_held(kit)
    second = ask(h, kit, "second")
    await until(lambda: demand(h, "queued") == 1)
    h.deps.proxy.stopping(30)
    refused = await done(second)
    assert refused.status_code == 503
    assert refused.json()["error"]["code"] == "shutting_down"
    assert refused.headers["retry-after"] == "1"
    assert demand(h, "queued") == 0
    # What runs goes on within the grace.
    held.answer("first")
    assert (await done(first)).status_code == 200
    assert held.arrived == [(R1, "first")]


async def test_places_kept_for_standard_requests_are_theirs_alone(kit: Any) -> None:
    doc = kit.document(maxRequestsPerReplica=2, reservedPerReplica=1)
    h = kit.build(doc=doc, replicas=(R1,))
    held = Held(h, kit)
    sheddable = {PRIORITY_HEADER: "sheddable"}
    batch = await arrived(held, h, kit, "batch", sheddable)
    # A second sheddable request finds the replica at its bound less the
    # kept place; a standard one takes the kept place at once.
    more = ask(h, kit, "more", sheddable)
    await until(lambda: demand(h, "queued") == 1)
    user = await arrived(held, h, kit, "user")
    assert in_flight(h) == 2
    held.answer("user")
    assert (await done(user)).status_code == 200
    # The kept place free again is still no place for it.
    await asyncio.sleep(0.05)
    assert held.at("more") is None and demand(h, "queued") == 1
    held.answer("batch")
    held.answer("more")
    assert (await done(batch)).status_code == 200
    assert (await done(more)).status_code == 200
    assert waited(h, "sheddable") == 1 and waited(h) is None


class Failing(Held):
    """As `Held`; a request that says one of `fail` is answered 500 once let go."""

    def __init__(self, h: Any, kit: Any) -> None:
        super().__init__(h, kit)
        self.fail: set[str] = set()

    async def post(
        self, url: str, body: bytes, headers: Any, timeout_s: float | None = None
    ) -> Any:
        said = orjson.loads(body)["messages"][-1]["content"]
        if said not in self.fail:
            return await super().post(url, body, headers, timeout_s)
        self.arrived.append((url.removesuffix("/v1/chat/completions"), said))
        await self._gate(said).wait()
        return self.kit.reply(status=500, body=b'{"error": "boom"}')


async def test_a_replica_its_failure_ejects_is_not_given_to_a_queued_request(
    kit: Any,
) -> None:
    h = bounded(kit, replicas=(R1, R2))
    held = Failing(h, kit)
    held.fail.add("a")
    a = await arrived(held, h, kit, "a")
    b = ask(h, kit, "b")
    await until(lambda: held.at("b") is not None)
    failing = h.deps.catalog.all_replicas()[held.at("a")]
    failing.failures = 2  # the next failure ejects it (after 3)
    queued = ask(h, kit, "queued")
    await until(lambda: demand(h, "queued") == 1)
    held.answer("a")  # a 500: ejected, and its place freed
    await until(lambda: not failing.available(h.clock.now))
    await asyncio.sleep(0.05)
    # Not sent to the ejected replica: it waits for the healthy one.
    assert held.at("queued") is None
    held.answer("b")
    await until(lambda: held.at("queued") is not None)
    assert held.at("queued") == held.at("b")
    held.answer("queued")
    assert (await done(queued)).status_code == 200
    await asyncio.gather(a, b)


async def test_a_busy_fallback_with_a_bound_is_skipped_not_waited_for(
    kit: Any,
) -> None:
    """The model asked for is at zero; its fallback is at its bound: the
    request is held for the model, as if the fallback could not answer, and
    the model answers it once it has a replica."""
    base = {"namespace": "llm", "strategy": "round-robin"}
    doc = RoutingDocument.model_validate(
        {
            "models": [
                {
                    **base,
                    "name": "smol",
                    "servedName": "smollm2",
                    "service": "smol",
                    "scaleFromZero": True,
                    "fallbacks": ["fb"],
                },
                {
                    **base,
                    "name": "fb",
                    "servedName": "fb",
                    "service": "fb",
                    "maxRequestsPerReplica": 1,
                },
            ]
        }
    )
    key = KeyRecord(name="alice", hash=hash_key(kit.key), models=("*",))
    h = kit.build(doc=doc, replicas=(), records=(key,), scale_from_zero_s=5)
    h.deps.catalog.set_endpoints("llm", "fb", [Endpoint(R2)])
    held = Held(h, kit)

    async def send(model: str, said: str) -> Any:
        body = {"model": model, "messages": [{"role": "user", "content": said}]}
        async with h.client() as client:
            return await client.post("/v1/chat/completions", json=body)

    busy = asyncio.create_task(send("fb", "busy"))
    await until(lambda: held.at("busy") is not None)
    mine = asyncio.create_task(send("smollm2", "mine"))
    await until(lambda: demand(h, "waiting") == 1)  # held for its model
    assert demand(h, "queued") in (None, 0)
    h.deps.catalog.set_endpoints("llm", "smol", [Endpoint(R1)])
    held.answer("mine")
    answer = await done(mine)
    assert answer.status_code == 200
    assert "x-citadel-fallback" not in answer.headers
    held.answer("busy")
    assert (await done(busy)).status_code == 200


async def test_the_wait_is_observed_once_a_request(kit: Any) -> None:
    """A request that waits, is refused by the replica it gets (429) and waits
    again for its retry is one wait; one refused at once waited for nothing."""
    h = bounded(kit, replicas=(R1, R2))
    held = Held(h, kit)
    held.refuse.add("retried")
    a = await arrived(held, h, kit, "a")
    b = ask(h, kit, "b")
    await until(lambda: held.at("b") is not None)
    retried = ask(h, kit, "retried")
    await until(lambda: demand(h, "queued") == 1)
    held.answer("a")  # its place goes to "retried": a 429, and its retry waits
    await until(lambda: demand(h, "queued") == 1 and len(held.arrived) == 3)
    held.answer("b")
    held.answer("retried")
    await asyncio.gather(a, b, retried)
    assert waited(h) == 1
    at_once = bounded(kit, queue_s=0)
    held = Held(at_once, kit)
    first = await arrived(held, at_once, kit, "first")
    assert (await done(ask(at_once, kit, "second"))).status_code == 503
    assert waited(at_once) is None
    held.answer("first")
    await done(first)


async def test_a_sheddable_requests_503_names_the_bound_it_was_held_to(
    kit: Any,
) -> None:
    doc = kit.document(maxRequestsPerReplica=2, reservedPerReplica=1)
    h = kit.build(doc=doc, replicas=(R1,), queue_s=0.05)
    held = Held(h, kit)
    sheddable = {PRIORITY_HEADER: "sheddable"}
    batch = await arrived(held, h, kit, "batch", sheddable)
    refused = await done(ask(h, kit, "more", sheddable))
    assert refused.status_code == 503
    message = refused.json()["error"]["message"]
    assert "every replica had 1 requests" in message
    assert "less its reservedPerReplica" in message
    held.answer("batch")
    await done(batch)
