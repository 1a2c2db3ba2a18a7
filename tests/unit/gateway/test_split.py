"""Traffic split: other models that take a share of a model's requests
(`ModelRoute.split`, `ProxyService._split`)."""

from __future__ import annotations

import asyncio
from typing import Any

import grpc
import orjson
import pytest

from citadel.gateway.routes import RoutingDocument, SplitTarget
from citadel.gateway.services.auth import KeyRecord, hash_key
from citadel.gateway.services.proxy import FALLBACK_HEADER, SPLIT_HEADER
from citadel.gateway.services.replicas import Endpoint
from citadel.gateway.services.requests import CHAT
from citadel.gateway.upstream import UpstreamTimeout

pytestmark = pytest.mark.unit

ADAPTER = "big-sql"
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
    """`big` (alias `large`, adapter `big-sql`; sends 25 percent to `chat`
    unless `big` says otherwise), `smollm2` (alias `chat`) and `tiny`, each
    changed by its keyword's fields."""
    split = [{"model": "chat", "weight": 25}]
    return RoutingDocument.model_validate(
        {
            "models": [
                route(
                    "big",
                    "big",
                    aliases=["large"],
                    adapters=[ADAPTER],
                    **{"split": split, **(big or {})},
                ),
                route("smol", "smollm2", aliases=["chat"], **others.get("smol", {})),
                route("tiny", "tiny", **others.get("tiny", {})),
            ]
        }
    )


class Points:
    """The proxy's draw: the points given, in turn, the last one for ever."""

    def __init__(self, *points: float) -> None:
        self.points = list(points)
        self.drawn = 0

    def __call__(self) -> float:
        self.drawn += 1
        return self.points.pop(0) if len(self.points) > 1 else self.points[0]


def build(
    kit: Any,
    doc: RoutingDocument | None = None,
    draw: Any = None,
    **replicas: Any,
) -> Any:
    """A harness on `doc` whose requests without a session fall at `draw`'s
    points (0: the first target), with alice allowed every model and one
    replica for each model (`http://<name>1`) unless `replicas` says otherwise
    (a model's name: its replicas' addresses), each answering as the model
    it was sent."""
    h = kit.build(doc=doc or document(), retries=2, draw=draw or Points(0.0))
    h.keys.replace_all(
        (KeyRecord(name="alice", hash=hash_key(kit.key), models=("*",)),)
    )
    placed = {"big": ("http://big1",), "smol": ("http://smol1",)}
    placed["tiny"] = ("http://tiny1",)
    for name, urls in {**placed, **replicas}.items():
        h.deps.catalog.set_endpoints("llm", name, [Endpoint(u) for u in urls])
    h.upstream.handler = answering(kit)
    return h


def answering(kit: Any, **by_host: Any) -> Any:
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


def splits(h: Any, target: str, model: str = "big") -> float | None:
    sample = h.deps.metrics.registry.get_sample_value
    labels = {"model": model, "target": target}
    return sample("citadel_gateway_splits_total", labels)  # type: ignore[no-any-return]


def sent(h: Any) -> float:
    """Every request a split sent to a target, whatever the labels."""
    metrics = h.deps.metrics.registry.collect()
    family = next(m for m in metrics if m.name == "citadel_gateway_splits")
    return sum(s.value for s in family.samples if s.name.endswith("_total"))


async def standing(h: Any, kit: Any, name: str) -> dict[tuple[str, Any], float]:
    """Where alice's buckets for the model `name` stand, by scope and model."""
    principal = h.deps.authenticator.authenticate(f"Bearer {kit.key}")
    model = h.deps.catalog.route_named(name)
    found = await h.deps.proxy.limiter.standing(principal, [model])
    return {(s.scope, s.model): s.remaining for s in found}


async def ask(h: Any, kit: Any, model: str = "big", **body: Any) -> Any:
    async with h.client() as client:
        return await client.post(
            "/v1/chat/completions", json={**kit.chat, "model": model, **body}
        )


def logged(caplog: pytest.LogCaptureFixture) -> list[Any]:
    return [r for r in caplog.records if r.getMessage() == "request"]


async def test_a_share_of_the_models_requests_goes_to_its_target(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = build(kit, draw=Points(0.24))  # one below the target's 25
    caplog.set_level("INFO", logger="citadel.gateway.access")
    answer = await ask(h, kit)
    assert answer.status_code == 200
    # Listed as `chat`, an alias: sent as the served name, named as listed.
    assert answer.headers[SPLIT_HEADER] == "chat"
    assert FALLBACK_HEADER not in answer.headers
    assert answer.json()["model"] == "smollm2"
    assert asked(h) == [("smol1", "smollm2")]
    # Counted once, under the model that answered.
    assert kit.counted(h, "200", model="smollm2") == 1
    assert kit.counted(h, "200", model="big") is None
    assert splits(h, "chat") == 1
    tokens = h.deps.metrics.registry.get_sample_value(
        "citadel_gateway_tokens_total",
        {"model": "smollm2", "key": "alice", "kind": "completion"},
    )
    assert tokens == 5
    [line] = logged(caplog)
    assert (line.model, line.split_from) == ("smollm2", "big")


async def test_the_rest_stays_with_the_model(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    points = Points(0.25)  # at the target's 25: past it
    h = build(kit, draw=points)
    caplog.set_level("INFO", logger="citadel.gateway.access")
    answer = await ask(h, kit)
    assert answer.status_code == 200
    assert SPLIT_HEADER not in answer.headers
    assert asked(h) == [("big1", "big")]
    assert kit.counted(h, "200", model="big") == 1
    assert sent(h) == 0
    [line] = logged(caplog)
    assert not hasattr(line, "split_from")
    assert points.drawn == 1


@pytest.mark.parametrize(
    ("point", "served"),
    [
        (0.0, ("tiny1", "tiny")),
        (0.09, ("tiny1", "tiny")),
        (0.1, ("smol1", "smollm2")),
        (0.29, ("smol1", "smollm2")),
        (0.3, ("big1", "big")),
        (0.99, ("big1", "big")),
    ],
)
async def test_the_targets_take_their_weights_added_up_in_order(
    kit: Any, point: float, served: tuple[str, str]
) -> None:
    split = [{"model": "tiny", "weight": 10}, {"model": "chat", "weight": 20}]
    points = Points(point)
    h = build(kit, document(big={"split": split}), points)
    answer = await ask(h, kit)
    assert answer.status_code == 200
    assert points.drawn == 1
    assert asked(h) == [served]
    target = {"tiny1": "tiny", "smol1": "chat"}.get(served[0])
    assert answer.headers.get(SPLIT_HEADER) == target
    assert sent(h) == (target is not None)


async def test_weights_that_add_up_to_100_leave_the_model_none(kit: Any) -> None:
    split = [{"model": "tiny", "weight": 40}, {"model": "chat", "weight": 60}]
    h = build(kit, document(big={"split": split}), Points(0.4, 0.999999, 0.0))
    for _ in range(3):
        assert (await ask(h, kit)).status_code == 200
    assert asked(h) == [("smol1", "smollm2"), ("smol1", "smollm2"), ("tiny1", "tiny")]
    assert (splits(h, "chat"), splits(h, "tiny")) == (2, 1)


async def test_an_alias_is_split_an_adapter_is_not(kit: Any) -> None:
    points = Points(0.0)
    h = build(kit, draw=points)
    answer = await ask(h, kit, "large")
    assert answer.headers[SPLIT_HEADER] == "chat"
    assert splits(h, "chat") == 1  # under the served name, though asked by alias
    # An adapter is a model of its own: the base's split is not its.
    adapter = await ask(h, kit, ADAPTER)
    assert adapter.status_code == 200
    assert SPLIT_HEADER not in adapter.headers
    assert asked(h) == [("smol1", "smollm2"), ("big1", ADAPTER)]
    assert points.drawn == 1
    assert sent(h) == 1


def sessions(count: int) -> list[str]:
    return [f"conversation-{i}" for i in range(count)]


async def served_by(h: Any, kit: Any, session: str) -> str:
    """The model that answered a request with `session` as its session."""
    async with h.client() as client:
        answer = await client.post(
            "/v1/chat/completions",
            json={**kit.chat, "model": "big"},
            headers={"x-session-id": session},
        )
    assert answer.status_code == 200
    return answer.json()["model"]  # type: ignore[no-any-return]


async def test_a_conversation_stays_on_one_model_and_conversations_spread(
    kit: Any,
) -> None:
    # The draw alternates first target and model: a session's hash, not the
    # draw, places its requests.
    points = Points(*[0.0, 0.99] * 200)
    h = build(kit, draw=points)
    where: dict[str, set[str]] = {}
    for session in sessions(100):
        for _ in range(3):
            where.setdefault(session, set()).add(await served_by(h, kit, session))
    assert all(len(models) == 1 for models in where.values())
    on_target = {s for s, models in where.items() if models == {"smollm2"}}
    assert 15 <= len(on_target) <= 35  # 25 percent of 100, give or take
    assert points.drawn == 0
    # A larger share moves more conversations over, and none back.
    doc = document(big={"split": [{"model": "chat", "weight": 60}]})
    h.deps.catalog.set_document(doc)
    moved = {s for s in sessions(100) if await served_by(h, kit, s) == "smollm2"}
    assert on_target < moved
    assert 45 <= len(moved) <= 75


async def test_a_conversations_place_differs_between_models(kit: Any) -> None:
    # Not the same conversations in every model's canary.
    doc = document(smol={"split": [{"model": "tiny", "weight": 25}]})
    h = build(kit, doc)
    big = {s for s in sessions(100) if await served_by(h, kit, s) == "smollm2"}
    async with h.client() as client:
        smol = set()
        for session in sessions(100):
            answer = await client.post(
                "/v1/chat/completions",
                json={**kit.chat, "model": "smollm2"},
                headers={"x-session-id": session},
            )
            if answer.json()["model"] == "tiny":
                smol.add(session)
    assert big and smol
    assert big != smol


def skipping(doc: RoutingDocument, target: str) -> RoutingDocument:
    """`doc` with `big`'s split sending all to `target`, past the document's
    checks (a target among its own names is refused there)."""
    split = (SplitTarget(model=target, weight=100),)
    big = doc.models[0].model_copy(update={"split": split})
    return RoutingDocument(models=(big, *doc.models[1:]))


async def test_a_target_with_no_model_of_its_name_is_skipped(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    doc = document(big={"split": [{"model": "ghost", "weight": 100}]})
    await skipped(kit, caplog, build(kit, doc), "no model by that name")


async def test_a_target_that_is_the_model_itself_is_skipped(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = build(kit, skipping(document(), "large"))
    await skipped(kit, caplog, h, "the requested model itself")


async def test_a_split_is_no_way_around_the_keys_permissions(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = build(kit, document(big={"split": [{"model": "chat", "weight": 100}]}))
    # A key that may use the target but not the model asked for is refused.
    h.keys.replace_all(
        (KeyRecord(name="alice", hash=hash_key(kit.key), models=("chat",)),)
    )
    refused = await ask(h, kit)
    assert refused.status_code == 403
    assert SPLIT_HEADER not in refused.headers
    assert not h.upstream.calls
    # One that may use the model but not the target: the model keeps it.
    h.keys.replace_all(
        (KeyRecord(name="alice", hash=hash_key(kit.key), models=("big", "tiny")),)
    )
    await skipped(kit, caplog, h, "the key may not use it")


async def test_a_target_without_a_ready_replica_is_skipped(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = build(kit, document(big={"split": [{"model": "chat", "weight": 100}]}), smol=())
    await skipped(kit, caplog, h, "no ready replica")


async def test_a_target_at_zero_is_skipped_not_held_nor_woken(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    doc = document(
        big={"split": [{"model": "chat", "weight": 100}]},
        smol={"scaleFromZero": True},
    )
    h = build(kit, doc, smol=())
    await asyncio.wait_for(skipped(kit, caplog, h, "no ready replica"), 0.5)
    demand = h.deps.metrics.registry.get_sample_value(
        "citadel_gateway_model_requests",
        {"model_namespace": "llm", "llmmodel": "smol", "state": "waiting"},
    )
    assert demand == 0


async def skipped(kit: Any, caplog: pytest.LogCaptureFixture, h: Any, why: str) -> None:
    """A request that falls to the target is the model's, as without a split,
    the skip logged with `why`."""
    caplog.set_level("DEBUG", logger="citadel.gateway.access")
    caplog.clear()  # what came before is another request's
    answer = await ask(h, kit)
    assert answer.status_code == 200
    assert SPLIT_HEADER not in answer.headers
    assert asked(h) == [("big1", "big")]
    assert kit.counted(h, "200", model="big") == 1
    assert sent(h) == 0
    [skip] = [r for r in caplog.records if r.getMessage() == "split target skipped"]
    assert skip.why == why  # type: ignore[attr-defined]
    [line] = logged(caplog)
    assert not hasattr(line, "split_from")


async def test_the_targets_limits_admit_it_the_models_are_untouched(
    kit: Any,
) -> None:
    doc = document(big={"limits": {"rpm": 1}}, smol={"limits": {"rpm": 2}})
    h = build(kit, doc)
    first = await ask(h, kit)
    assert first.status_code == 200
    # The target's limits, as any request for it shows them.
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert (await ask(h, kit)).status_code == 200  # past `big`'s one
    assert (await standing(h, kit, "big"))[("requests", "big")] == 1
    assert (await standing(h, kit, "chat"))[("requests", "smollm2")] == 0
    # Refused by the target's limits: its 429, which says whose it is.
    refused = await ask(h, kit)
    assert refused.status_code == 429
    assert refused.headers[SPLIT_HEADER] == "chat"
    assert kit.counted(h, "429", model="smollm2") == 1
    limited = h.deps.metrics.registry.get_sample_value(
        "citadel_gateway_rate_limited_total",
        {"model": "smollm2", "key": "alice", "scope": "requests"},
    )
    assert limited == 1
    assert len(h.upstream.calls) == 2
    assert splits(h, "chat") == 3


async def test_the_targets_fallbacks_answer_for_it(
    kit: Any, caplog: pytest.LogCaptureFixture
) -> None:
    h = build(kit, document(smol={"fallbacks": ["tiny"]}))
    caplog.set_level("INFO", logger="citadel.gateway.access")
    h.upstream.handler = answering(
        kit, smol1=kit.reply(status=429, body=b"{}", retry_after="1")
    )
    answer = await ask(h, kit)
    assert answer.status_code == 200
    assert answer.headers[SPLIT_HEADER] == "chat"
    assert answer.headers[FALLBACK_HEADER] == "tiny"
    assert asked(h) == [("smol1", "smollm2"), ("tiny1", "tiny")]
    assert kit.counted(h, "200", model="tiny") == 1
    fell = h.deps.metrics.registry.get_sample_value(
        "citadel_gateway_fallbacks_total",
        {"model": "smollm2", "fallback": "tiny", "reason": "busy"},
    )
    assert fell == 1
    [line] = logged(caplog)
    assert (line.model, line.fallback_from, line.split_from) == (
        "tiny",
        "smollm2",
        "big",
    )


class Emptying:
    """The in-process buckets, whose first take (the target's admission)
    takes the target's last replica away, as a scale to zero between its
    split and its send would."""

    def __init__(self, inner: Any, catalog: Any) -> None:
        self.inner, self.catalog = inner, catalog
        self.emptied = False

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def take(self, takes: Any, now: float) -> Any:
        if not self.emptied:
            self.emptied = True
            self.catalog.set_endpoints("llm", "smol", [])
        return await self.inner.take(takes, now)


async def test_a_target_at_zero_after_its_split_is_held_for_as_itself(
    kit: Any,
) -> None:
    doc = document(
        big={"split": [{"model": "chat", "weight": 100}]},
        smol={"scaleFromZero": True, "fallbacks": ["tiny"], "limits": {"rpm": 9}},
    )
    h = build(kit, doc, tiny=())
    limiter = h.deps.proxy.limiter
    limiter._store = Emptying(limiter._store, h.deps.catalog)
    asking = asyncio.create_task(ask(h, kit))
    fell = {"model": "smollm2", "fallback": "tiny", "reason": "waking"}
    sample = h.deps.metrics.registry.get_sample_value
    async with asyncio.timeout(1):
        while not sample("citadel_gateway_fallbacks_total", fell):
            await asyncio.sleep(0.005)
    await asyncio.sleep(0.05)
    # Another model's change: the hold looks again for the target's model (by
    # its name as listed), not for the model asked for.
    h.deps.catalog.set_endpoints("llm", "big", [Endpoint("http://big2")])
    await asyncio.sleep(0.05)
    assert not asking.done()
    h.deps.catalog.set_endpoints("llm", "smol", [Endpoint("http://smol1")])
    answer = await asyncio.wait_for(asking, 1)
    assert answer.status_code == 200
    assert answer.headers[SPLIT_HEADER] == "chat"
    assert FALLBACK_HEADER not in answer.headers
    assert asked(h) == [("smol1", "smollm2")]
    assert kit.counted(h, "200", model="smollm2") == 1


async def test_a_stream_is_answered_by_the_target(kit: Any) -> None:
    h = build(kit)
    h.upstream.handler = answering(kit, smol1=kit.sse_reply(CHUNK, USAGE))
    answer, relayed = await kit.stream_chat(h, "big")
    assert answer.status_code == 200
    assert answer.headers[SPLIT_HEADER] == "chat"
    assert b'"hi"' in relayed
    assert asked(h) == [("smol1", "smollm2")]
    assert kit.counted(h, "200", model="smollm2") == 1


@pytest.mark.parametrize(
    ("failure", "status"),
    [
        (UpstreamTimeout("no answer"), 504),
        (RuntimeError("a bug"), 500),
    ],
)
async def test_an_error_after_the_split_names_the_target(
    kit: Any, failure: Exception, status: int
) -> None:
    h = build(kit)
    h.upstream.handler = answering(kit, smol1=failure)
    answer = await ask(h, kit)
    assert answer.status_code == status
    assert answer.headers[SPLIT_HEADER] == "chat"
    assert kit.counted(h, str(status), model="smollm2") == 1


async def test_a_targets_failed_answer_names_it(kit: Any) -> None:
    h = build(kit)
    h.upstream.handler = answering(
        kit, smol1=kit.reply(status=500, body=b'{"error": {"message": "boom"}}')
    )
    answer = await ask(h, kit)
    assert answer.status_code == 502
    assert answer.headers[SPLIT_HEADER] == "chat"
    assert kit.counted(h, "502", model="smollm2") == 1


async def test_every_door_goes_through_it(kit: Any) -> None:
    """The other doors call `handle` as REST does (their own headers aside)."""
    h = build(kit)
    principal = h.deps.authenticator.authenticate(f"Bearer {kit.key}")
    raw = orjson.dumps({**kit.chat, "model": "big"})
    answer = await h.deps.proxy.handle(CHAT, principal, raw, "r-1")
    assert answer.status == 200
    assert answer.headers[SPLIT_HEADER] == "chat"


async def test_grpc_passes_the_split_on_in_its_trailers(kit: Any) -> None:
    h = build(kit)
    async with kit.grpc_stub(h) as stub:
        code, trailers = await kit.grpc_chat(stub, "big")
        assert (code, trailers[SPLIT_HEADER]) == (grpc.StatusCode.OK, "chat")
        # The target's own failure says whose it is, as on REST.
        h.upstream.handler = answering(kit, smol1=kit.reply(500, b"boom"))
        code, trailers = await kit.grpc_chat(stub, "big")
        assert (code, trailers[SPLIT_HEADER]) == (grpc.StatusCode.UNAVAILABLE, "chat")


async def test_graphql_passes_the_split_on_in_its_response(kit: Any) -> None:
    answer = await kit.graphql_chat(build(kit), "big")
    assert answer.json()["data"]["chatCompletion"]["model"] == "smollm2"
    assert answer.headers[SPLIT_HEADER] == "chat"
