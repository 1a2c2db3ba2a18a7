"""The routing document and the single writer of its ConfigMap."""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from citadel.gateway.routes import (
    RoutingDocument,
    RoutingStrategy,
    configmap_document,
    parse_document,
    unknown_names,
)
from citadel.operator.kube.client import ApiError, Manifest
from citadel.operator.kube.fake import FakeKube
from citadel.operator.kube.resources import CONFIGMAPS, LLMMODELS
from citadel.operator.model import LLMModel
from citadel.operator.routing import (
    PUBLISH_BACKOFF_MAX_S,
    RoutePublisher,
    backoff,
    build_document,
    configmap,
    route_for,
)
from citadel.operator.settings import OperatorSettings
from citadel.operator.status import name_taken

from .samples import model_body

pytestmark = pytest.mark.unit

READY = {
    "conditions": [
        {
            "type": "Ready",
            "status": "True",
            "reason": "ReplicasReady",
            "lastTransitionTime": "2026-01-01T00:00:00Z",
        }
    ],
    "replicas": {"desired": 2, "ready": 2},
}


def test_route_carries_every_field() -> None:
    model = LLMModel.from_body(
        model_body(
            servedName="mixtral",
            aliases=["chat-default"],
            routing={"strategy": "least-load"},
            limits={"rpm": 600, "tpm": 200000},
            status=READY,
        )
    )
    route = route_for(model)
    assert route.names == ("mixtral", "chat-default")
    assert (route.namespace, route.service, route.port) == ("llm", "mixtral", 8000)
    assert route.strategy is RoutingStrategy.LEAST_LOAD
    assert (route.limits.rpm, route.limits.tpm) == (600, 200000)
    assert route.ready and route.ready_replicas == 2


@pytest.mark.parametrize(
    ("spec", "from_zero"),
    [
        ({}, False),
        ({"replicas": 0}, False),  # stopped by hand: nothing wakes it
        ({"autoscaling": {"maxReplicas": 2}}, False),  # minReplicas 1
        ({"autoscaling": {"minReplicas": 1, "maxReplicas": 2}}, False),
        ({"autoscaling": {"minReplicas": 0, "maxReplicas": 2}}, True),
    ],
)
def test_a_model_the_autoscaler_may_stop_is_scaled_from_zero(
    spec: dict[str, Any], from_zero: bool
) -> None:
    route = route_for(LLMModel.from_body(model_body(**spec)))
    assert route.scale_from_zero is from_zero
    document = json.loads(RoutingDocument(models=(route,)).to_json())
    assert document["models"][0]["scaleFromZero"] is from_zero


@pytest.mark.parametrize(
    ("routing", "fallbacks"),
    [
        (None, ()),
        ({"strategy": "least-load"}, ()),
        ({"fallbacks": []}, ()),
        # In order, and a name no model serves (yet) as listed: the gateway
        # skips it.
        ({"fallbacks": ["smol", "org/tiny:v1"]}, ("smol", "org/tiny:v1")),
        ({"fallbacks": ["org/tiny:v1", "smol"]}, ("org/tiny:v1", "smol")),
    ],
)
def test_a_route_carries_the_fallbacks_as_listed(
    routing: dict[str, Any] | None, fallbacks: tuple[str, ...]
) -> None:
    spec: dict[str, Any] = {"servedName": "big", "aliases": ["chat"]}
    if routing is not None:
        spec["routing"] = routing
    route = route_for(LLMModel.from_body(model_body("big", **spec)))
    assert route.fallbacks == fallbacks
    document = json.loads(RoutingDocument(models=(route,)).to_json())
    assert document["models"][0]["fallbacks"] == list(fallbacks)


@pytest.mark.parametrize(
    ("routing", "split"),
    [
        # In order, and a name no model serves (yet) as listed: the gateway
        # skips it.
        (
            {
                "split": [
                    {"model": "v2", "weight": 10},
                    {"model": "org/tiny:v1", "weight": 5},
                ]
            },
            (("v2", 10), ("org/tiny:v1", 5)),
        ),
        (
            {
                "split": [
                    {"model": "org/tiny:v1", "weight": 5},
                    {"model": "v2", "weight": 95},
                ]
            },
            (("org/tiny:v1", 5), ("v2", 95)),
        ),
    ],
)
def test_a_route_carries_the_split_as_listed(
    routing: dict[str, Any], split: tuple[tuple[str, int], ...]
) -> None:
    spec: dict[str, Any] = {"servedName": "big", "aliases": ["chat"]}
    route = route_for(LLMModel.from_body(model_body("big", routing=routing, **spec)))
    assert tuple((t.model, t.weight) for t in route.split) == split
    document = json.loads(RoutingDocument(models=(route,)).to_json())
    assert document["models"][0]["split"] == [
        {"model": model, "weight": weight} for model, weight in split
    ]


@pytest.mark.parametrize("bound", [1, 256])
def test_a_route_carries_the_max_requests_per_replica(bound: int) -> None:
    routing = {"maxRequestsPerReplica": bound}
    route = route_for(LLMModel.from_body(model_body("big", routing=routing)))
    assert route.max_requests_per_replica == bound
    document = json.loads(RoutingDocument(models=(route,)).to_json())
    assert document["models"][0]["maxRequestsPerReplica"] == bound


def test_a_route_without_max_requests_per_replica_has_no_bound() -> None:
    route = route_for(LLMModel.from_body(model_body("big")))
    assert route.max_requests_per_replica is None
    # Left out of the document, which reads back the same.
    document = json.loads(RoutingDocument(models=(route,)).to_json())
    assert "maxRequestsPerReplica" not in document["models"][0]


def test_a_route_carries_the_places_reserved_per_replica() -> None:
    routing = {"maxRequestsPerReplica": 16, "reservedPerReplica": 4}
    route = route_for(LLMModel.from_body(model_body("big", routing=routing)))
    assert (route.max_requests_per_replica, route.reserved_per_replica) == (16, 4)
    document = json.loads(RoutingDocument(models=(route,)).to_json())
    assert document["models"][0]["reservedPerReplica"] == 4


def test_a_route_without_reserved_per_replica_keeps_no_place() -> None:
    routing = {"maxRequestsPerReplica": 16}
    route = route_for(LLMModel.from_body(model_body("big", routing=routing)))
    assert route.reserved_per_replica is None
    # Left out of the document, which reads back the same.
    document = json.loads(RoutingDocument(models=(route,)).to_json())
    assert "reservedPerReplica" not in document["models"][0]


def test_the_split_is_published_with_the_document() -> None:
    big = LLMModel.from_body(
        model_body(
            "big",
            routing={
                "split": [
                    {"model": "smol", "weight": 20},
                    {"model": "gone", "weight": 5},
                ]
            },
            status=READY,
        )
    )
    smol = LLMModel.from_body(model_body("smol"))
    # Empty and absent alike: no split.
    plain = LLMModel.from_body(model_body("plain", routing={"split": []}))
    doc, conflicts = build_document([big, smol, plain])
    assert conflicts == {}
    routes = {r.name: r for r in parse_document(doc.to_json()).models}
    assert [(t.model, t.weight) for t in routes["big"].split] == [
        ("smol", 20),
        ("gone", 5),
    ]
    assert routes["smol"].split == routes["plain"].split == ()


def test_fallbacks_are_published_with_the_document() -> None:
    big = LLMModel.from_body(
        model_body("big", routing={"fallbacks": ["smol", "gone"]}, status=READY)
    )
    smol = LLMModel.from_body(model_body("smol"))
    doc, conflicts = build_document([big, smol])
    assert conflicts == {}
    routes = {r.name: r for r in parse_document(doc.to_json()).models}
    assert routes["big"].fallbacks == ("smol", "gone")
    assert routes["smol"].fallbacks == ()


def test_fallbacks_and_split_targets_that_name_no_routed_model_are_found() -> None:
    def model(name: str, **spec: Any) -> LLMModel:
        return LLMModel.from_body(model_body(name, **spec))

    routing = {
        "fallbacks": ["chat", "gone", "sql", "clash"],
        "split": [{"model": "v2", "weight": 10}, {"model": "smol", "weight": 10}],
    }
    big = model("big", routing=routing)
    smol = model("smol", aliases=["chat"], adapters=_adapters("sql"))
    # Its name is smol's: left out of the document, so no fallback either.
    late = model("clash", servedName="chat", created="2026-03-01T00:00:00Z")
    plain = model("plain", routing={"fallbacks": ["smol"]})
    doc, conflicts = build_document([big, smol, late, plain])
    assert set(conflicts) == {"llm/clash"}
    assert unknown_names(doc) == {
        ("llm/big", "fallbacks"): ("gone", "clash"),
        ("llm/big", "split"): ("v2",),
    }
    assert unknown_names(build_document([smol])[0]) == {}


async def test_names_of_no_model_are_told_once_per_set(
    settings: OperatorSettings,
) -> None:
    told: list[dict[tuple[str, str], tuple[str, ...]]] = []
    routing = {
        "fallbacks": ["later", "smol"],
        "split": [{"model": "later", "weight": 5}],
    }
    kube = FakeKube([model_body("big", routing=routing)])
    publisher = RoutePublisher(kube, settings, on_unknown_names=told.append)
    await publisher.publish()
    await publisher.publish()  # the same: not told again
    fallbacks, split = ("llm/big", "fallbacks"), ("llm/big", "split")
    assert told == [{fallbacks: ("later", "smol"), split: ("later",)}]
    kube.put(model_body("smol"))
    await publisher.publish()  # fewer: told what is left, the split not again
    assert told[1:] == [{fallbacks: ("later",)}]
    kube.put(model_body("later"))
    await publisher.publish()  # none left: nothing to tell
    assert len(told) == 2
    await kube.delete(LLMMODELS, "later", "llm")
    await publisher.publish()  # gone again: told again
    assert told[2:] == [{fallbacks: ("later",), split: ("later",)}]


async def test_the_same_unknown_names_in_another_order_are_no_news(
    settings: OperatorSettings,
) -> None:
    told: list[dict[tuple[str, str], tuple[str, ...]]] = []
    kube = FakeKube([model_body("big", routing={"fallbacks": ["soon", "later"]})])
    publisher = RoutePublisher(kube, settings, on_unknown_names=told.append)
    await publisher.publish()
    kube.put(model_body("big", routing={"fallbacks": ["later", "soon"]}))
    await publisher.publish()
    assert told == [{("llm/big", "fallbacks"): ("soon", "later")}]


class _DropFails(FakeKube):
    """Its first JSON patch (the removal of the document's other form) fails
    with what no API error is: an answer that is not JSON."""

    failures = 1

    async def json_patch(self, *args: Any, **kwargs: Any) -> Manifest:
        if self.failures:
            self.failures -= 1
            raise json.JSONDecodeError("Expecting value", "<html>", 0)
        return await super().json_patch(*args, **kwargs)


async def test_unknown_names_are_told_though_the_other_form_stays(
    settings: OperatorSettings,
) -> None:
    # Large enough to go gzipped, so the write is followed by the removal of
    # the text form the create left; its failure comes after the document is
    # recorded as published, and a retry finds nothing new.
    models = [model_body(f"model-{i:05d}-instruct-v2") for i in range(2000)]
    models.append(model_body("big", routing={"fallbacks": ["typo"]}))

    async def source() -> list[Manifest]:
        return models

    told: list[dict[tuple[str, str], tuple[str, ...]]] = []
    kube = _DropFails([])
    publisher = RoutePublisher(
        kube, settings, source=source, listing=source, on_unknown_names=told.append
    )
    await publisher.ensure()
    with pytest.raises(json.JSONDecodeError):
        await publisher.publish()
    await publisher.publish(force=False)
    assert told == [{("llm/big", "fallbacks"): ("typo",)}]


def test_not_ready_without_the_condition() -> None:
    assert route_for(LLMModel.from_body(model_body())).ready is False


def test_older_model_keeps_a_contested_name() -> None:
    old = LLMModel.from_body(
        model_body("a", servedName="chat", created="2026-01-01T00:00:00Z")
    )
    new = LLMModel.from_body(
        model_body(
            "b", servedName="other", aliases=["chat"], created="2026-02-01T00:00:00Z"
        )
    )
    doc, conflicts = build_document([new, old])
    assert [r.name for r in doc.models] == ["a"]
    assert "already served by llm/a" in conflicts["llm/b"]
    parse_document(doc.to_json())  # the gateway accepts it


def test_route_names_the_adapters() -> None:
    model = LLMModel.from_body(
        model_body(
            "smollm2",
            adapters=[
                {"name": "sql-expert", "source": "org/sql-lora"},
                {"name": "support-bot", "source": "pvc://adapters/support-bot/v3"},
            ],
        )
    )
    route = route_for(model)
    assert route.adapters == ("sql-expert", "support-bot")
    assert route.names == ("smollm2",)
    assert json.loads(route.model_dump_json(by_alias=True))["adapters"] == [
        "sql-expert",
        "support-bot",
    ]
    assert route_for(LLMModel.from_body(model_body())).adapters == ()


def _adapters(*names: str) -> list[dict[str, str]]:
    return [{"name": n, "source": f"org/{n}"} for n in names]


@pytest.mark.parametrize(
    ("old", "new"),
    [
        # An adapter's name against a served name, an alias, an adapter.
        ({"adapters": _adapters("sql")}, {"servedName": "sql"}),
        ({"adapters": _adapters("sql")}, {"aliases": ["sql"]}),
        ({"adapters": _adapters("sql")}, {"adapters": _adapters("x", "sql")}),
        ({"servedName": "sql"}, {"adapters": _adapters("sql")}),
        ({"aliases": ["sql"]}, {"adapters": _adapters("sql")}),
    ],
)
def test_an_adapter_name_is_claimed_as_a_served_name_is(
    old: dict[str, Any], new: dict[str, Any]
) -> None:
    older = LLMModel.from_body(model_body("a", created="2026-01-01T00:00:00Z", **old))
    newer = LLMModel.from_body(model_body("b", created="2026-02-01T00:00:00Z", **new))
    doc, conflicts = build_document([newer, older])
    assert [r.name for r in doc.models] == ["a"]
    assert conflicts["llm/b"] == (
        "model name 'sql' is already served by llm/a; "
        "choose another servedName, alias or adapter name"
    )
    parse_document(doc.to_json())  # the gateway accepts it


def _failed(message: str, reason: str = "ReconcileFailed") -> dict[str, Any]:
    """A status whose Ready condition says the reconcile failed for good."""
    ready = {
        "type": "Ready",
        "status": "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    return {"phase": "Failed", "conditions": [ready]}


def test_a_model_whose_service_is_not_its_own_is_left_out() -> None:
    # Told by the reason: the message's wording may change.
    taken = LLMModel.from_body(
        model_body(
            "a",
            servedName="chat",
            status=_failed("Service a is someone else's", "ServiceNameTaken"),
        )
    )
    # Failed for another name: its Service, checked first, is its own.
    other = LLMModel.from_body(
        model_body("c", status=_failed(name_taken("Deployment", "c")))
    )
    newer = LLMModel.from_body(
        model_body("b", servedName="chat", created="2026-02-01T00:00:00Z")
    )
    doc, conflicts = build_document([taken, other, newer])
    assert [r.name for r in doc.models] == ["c"]
    # It keeps its name: fixed, it would take it back from the newer model.
    assert "llm/a" in conflicts["llm/b"]


def test_a_status_from_before_the_reason_still_leaves_the_model_out() -> None:
    # Operators before ServiceNameTaken wrote the shared reason with this
    # message; after an upgrade it lasts until the model's next full pass.
    old = LLMModel.from_body(
        model_body("a", status=_failed(name_taken("Service", "a")))
    )
    another = LLMModel.from_body(
        model_body("b", status=_failed(name_taken("Service", "someone-else")))
    )
    doc, _ = build_document([old, another])
    assert [r.name for r in doc.models] == ["b"]


async def test_publisher_writes_the_whole_document(settings: OperatorSettings) -> None:
    kube = FakeKube(
        [model_body("a", servedName="x"), model_body("b", namespace="other")]
    )
    publisher = RoutePublisher(kube, settings)
    doc = await publisher.publish()
    stored = kube.stored(CONFIGMAPS, "citadel-routes", "citadel-system")
    assert parse_document(stored["data"]["routes.json"]) == doc
    assert {(r.namespace, r.name) for r in doc.models} == {("llm", "a"), ("other", "b")}
    assert (
        stored["metadata"]["labels"]["app.kubernetes.io/managed-by"]
        == "citadel-operator"
    )


async def test_deleting_models_leave_the_document(settings: OperatorSettings) -> None:
    going = model_body("b")
    going["metadata"]["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    kube = FakeKube([model_body("a"), going])
    doc = await RoutePublisher(kube, settings).publish()
    assert [r.name for r in doc.models] == ["a"]


async def test_watched_namespaces_limit_the_document(
    settings: OperatorSettings,
) -> None:
    kube = FakeKube([model_body("a"), model_body("b", namespace="other")])
    scoped = settings.model_copy(update={"watch_namespaces": ("other",)})
    doc = await RoutePublisher(kube, scoped).publish()
    assert [r.namespace for r in doc.models] == ["other"]


async def test_conflict_changes_are_reported(settings: OperatorSettings) -> None:
    seen: list[set[str]] = []

    async def report(keys: set[str]) -> None:
        seen.append(keys)

    kube = FakeKube(
        [
            model_body("a", servedName="chat"),
            model_body("b", servedName="chat", created="2026-03-01T00:00:00Z"),
        ]
    )
    publisher = RoutePublisher(kube, settings, on_conflicts=report)
    await publisher.publish()
    await publisher.publish()  # unchanged: not reported again
    assert seen == [{"llm/b"}]


async def test_conflicts_are_derived_before_the_first_publish(
    settings: OperatorSettings,
) -> None:
    """A publisher that has not published yet (an operator just started) finds
    the clashes from the models, once; the first publish then reports only
    what changed since."""
    seen: list[set[str]] = []

    async def report(keys: set[str]) -> None:
        seen.append(keys)

    kube = FakeKube(
        [
            model_body("a", servedName="chat"),
            model_body("b", servedName="chat", created="2026-03-01T00:00:00Z"),
            model_body("c", servedName="chat", created="2026-04-01T00:00:00Z"),
        ]
    )
    publisher = RoutePublisher(kube, settings, on_conflicts=report)
    publisher.hold()  # the source may miss models: nothing is derived from it
    assert await publisher.conflict("llm/b") is None
    publisher.ready()
    assert "already served by llm/a" in (await publisher.conflict("llm/b") or "")
    assert await publisher.conflict("llm/a") is None
    await kube.delete(LLMMODELS, "c", "llm")
    assert await publisher.conflict("llm/c") is not None  # derived once only
    await publisher.publish()
    assert seen == [{"llm/c"}]
    assert await publisher.conflict("llm/c") is None


async def test_namespace_globs_filter_the_document(settings: OperatorSettings) -> None:
    kube = FakeKube(
        [model_body("a", namespace="e2e-1"), model_body("b", namespace="x")]
    )
    scoped = settings.model_copy(update={"watch_namespaces": ("e2e-*",)})
    doc = await RoutePublisher(kube, scoped).publish()
    assert [r.namespace for r in doc.models] == ["e2e-1"]


async def test_publisher_writes_only_when_kicked(settings: OperatorSettings) -> None:
    """A replica paused for a peer gets no more kicks (Kopf's handlers and
    timers pause with it): it must not write its old document over the active
    replica's. The resync's forced kicks rewrite an unchanged document, at most
    once per resync period."""
    kube = FakeKube([model_body("a", servedName="x")])
    publisher = RoutePublisher(
        kube,
        settings.model_copy(update={"resync_seconds": 60, "route_publish_delay": 0}),
    )
    await publisher.publish()
    task = asyncio.create_task(publisher.run())

    def writes() -> int:
        return sum(1 for _, o in kube.applied if o["kind"] == "ConfigMap")

    async def settled(count: int) -> None:
        for _ in range(100):
            if writes() == count:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert writes() == count

    try:
        await settled(1)  # no kick, no write
        publisher.kick()
        await settled(1)  # unchanged: nothing to write
        publisher.kick(force=True)
        await settled(2)
        publisher.kick(force=True)  # within the resync period
        await settled(2)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def test_ensure_makes_a_missing_configmap_and_leaves_one(
    settings: OperatorSettings,
) -> None:
    kube = FakeKube([model_body("a", servedName="x")])
    publisher = RoutePublisher(kube, settings)
    await publisher.ensure()
    stored = kube.stored(CONFIGMAPS, "citadel-routes", "citadel-system")
    assert parse_document(stored["data"]["routes.json"]).models == ()
    await publisher.publish()
    await publisher.ensure()  # never changes one that exists
    stored = kube.stored(CONFIGMAPS, "citadel-routes", "citadel-system")
    assert len(parse_document(stored["data"]["routes.json"]).models) == 1


async def test_writes_keep_the_publish_interval_apart(
    settings: OperatorSettings,
) -> None:
    kube = FakeKube([model_body("a")])
    interval = 0.2
    publisher = RoutePublisher(
        kube, settings.model_copy(update={"route_publish_interval": interval})
    )
    loop = asyncio.get_running_loop()
    calls: list[float] = []
    written: list[list[str]] = []
    publish = publisher.publish

    async def timed(*, force: bool = True) -> RoutingDocument:
        calls.append(loop.time())
        doc = await publish(force=force)
        written.append([r.name for r in doc.models])
        return doc

    publisher.publish = timed  # type: ignore[method-assign]
    task = asyncio.create_task(publisher.run())
    try:
        for name in ("b", "c"):  # two changes, the second right after a write
            seen = len(written)
            kube.put(model_body(name))
            publisher.kick()
            while len(written) == seen:
                await asyncio.sleep(0.01)
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    assert written == [["a", "b"], ["a", "b", "c"]]
    assert calls[1] - calls[0] >= interval - 0.01


async def test_an_unchanged_document_is_written_only_when_forced(
    settings: OperatorSettings,
) -> None:
    kube = FakeKube([model_body("a")])
    publisher = RoutePublisher(kube, settings)
    await publisher.publish(force=False)
    assert len(kube.applied) == 1
    await publisher.publish(force=False)
    assert len(kube.applied) == 1
    await publisher.publish(force=True)
    assert len(kube.applied) == 2
    kube.put(model_body("b"))
    doc = await publisher.publish(force=False)
    assert len(kube.applied) == 3
    assert [r.name for r in doc.models] == ["a", "b"]


async def test_models_are_parsed_again_only_when_they_change(
    settings: OperatorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube = FakeKube([model_body("a"), model_body("b")])
    publisher = RoutePublisher(kube, settings)
    parsed: list[str] = []
    original = LLMModel.from_body

    def counting(body: dict[str, object]) -> LLMModel:
        parsed.append(body["metadata"]["name"])  # type: ignore[index]
        return original(body)

    monkeypatch.setattr(LLMModel, "from_body", staticmethod(counting))
    await publisher.publish()
    await publisher.publish()
    assert sorted(parsed) == ["a", "b"]
    stored = kube.stored(LLMMODELS, "a", "llm")
    await kube.apply({**stored, "spec": {**stored["spec"], "servedName": "z"}})
    doc = await publisher.publish()
    assert sorted(parsed) == ["a", "a", "b"]
    assert {r.served_name for r in doc.models} >= {"z"}


async def test_a_publisher_outlives_a_failure_of_any_kind(
    settings: OperatorSettings, caplog: pytest.LogCaptureFixture
) -> None:
    """An error that is not an ApiError (a JSON decoding error from an answer
    that was not JSON was one) ended the publisher's task: the ConfigMap was
    never written again and no error was counted. It is logged, counted and
    retried like any failed write."""

    class Failing(FakeKube):
        failures = 1

        async def apply(
            self, obj: Manifest, *, subresource: str = "", dry_run: bool = False
        ) -> Manifest:
            if self.failures:
                self.failures -= 1
                raise json.JSONDecodeError("Expecting value", "Too many requests", 0)
            return await super().apply(obj, subresource=subresource, dry_run=dry_run)

    kube = Failing([model_body("a")])
    publisher = RoutePublisher(kube, settings)
    results: list[bool] = []
    task = asyncio.create_task(publisher.run(results.append))
    try:
        publisher.kick()
        for _ in range(300):  # the retry waits 1 s
            if len(results) == 2 or task.done():
                break
            await asyncio.sleep(0.01)
        assert not task.done()
        assert results == [False, True]
        [logged] = [r for r in caplog.records if r.name == "citadel.operator.routing"]
        assert logged.message == "publishing the routes failed"
        assert logged.exc_info is not None  # with its traceback
        assert len(kube.applied) == 1
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


def test_a_failed_write_waits_as_long_as_the_api_server_asks() -> None:
    throttled = ApiError(429, "TooManyRequests", "slow down", retry_after_s=5)
    assert backoff(1.0, throttled) == 5
    assert backoff(8.0, throttled) == 8  # never less than the back-off
    # Within the bound, so that a failing write is retried (and counted) at
    # least that often.
    slow = ApiError(429, "TooManyRequests", "slow down", retry_after_s=3600)
    assert backoff(1.0, slow) == PUBLISH_BACKOFF_MAX_S
    assert backoff(2.0, ApiError(500, "InternalError", "boom")) == 2
    assert backoff(2.0, RuntimeError("a bug")) == 2


def _documents(kube: FakeKube) -> list[list[str]]:
    """The model names of every routing document written, in order."""
    return [
        [r.name for r in parse_document(o["data"]["routes.json"]).models]
        for _, o in kube.applied
        if o["kind"] == "ConfigMap"
    ]


async def _until(check: Callable[[], bool], timeout: float = 2.0) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check() and loop.time() < end:
        await asyncio.sleep(0.01)
    assert check()


async def _stopped(task: asyncio.Task[None]) -> None:
    task.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await task


def _frozen(bodies: list[dict[str, Any]]) -> Callable[[], Awaitable[list[Any]]]:
    """A source that lists `bodies` (a paused replica's indexes)."""

    async def source() -> list[Any]:
        return list(bodies)

    return source


async def test_a_paused_publisher_does_not_retry_its_failed_write(
    settings: OperatorSettings,
) -> None:
    """A leader whose write failed (cut off from the API server) is paused for
    a peer meanwhile: once it reaches the API server again, neither its retry
    nor a kick made before the pause writes its frozen document over the
    peer's."""
    kube = FakeKube([model_body("m1"), model_body("m2"), model_body("m3")])
    frozen = [kube.stored(LLMMODELS, n, "llm") for n in ("m1", "m2")]
    publisher = RoutePublisher(kube, settings, source=_frozen(frozen))
    results: list[bool] = []
    task = asyncio.create_task(publisher.run(results.append))
    try:
        kube.fail["configmaps"] = ApiError(0, "ClientConnectorError", "partition")
        publisher.kick()
        await _until(lambda: results == [False])
        publisher.pause()
        kube.fail.clear()
        await RoutePublisher(kube, settings).publish()  # the peer, now active
        publisher.kick()  # a handler's, made before the pause
        await asyncio.sleep(1.3)  # past the retry's backoff (1 s)
        assert _documents(kube) == [["m1", "m2", "m3"]]
        assert results == [False]
    finally:
        await _stopped(task)


async def test_a_resumed_publisher_repairs_a_document_it_thinks_unchanged(
    settings: OperatorSettings,
) -> None:
    """What the ConfigMap holds when a replica resumes may be a stale write
    (of a peer paused too late) that drops models: the first write after the
    resume goes out even if the document is the one this replica wrote last."""
    kube = FakeKube([model_body("a"), model_body("b")])
    publisher = RoutePublisher(kube, settings)
    task = asyncio.create_task(publisher.run())
    try:
        publisher.kick()
        await _until(lambda: _documents(kube) == [["a", "b"]])
        publisher.pause()
        stale, _ = build_document([LLMModel.from_body(model_body("a"))])
        await kube.apply(configmap(settings, stale))
        publisher.resume()
        await _until(lambda: len(_documents(kube)) == 3)
        assert _documents(kube)[-1] == ["a", "b"]
        publisher.resume()  # not paused: nothing to repair
        await asyncio.sleep(0.1)
        assert len(_documents(kube)) == 3
    finally:
        await _stopped(task)


async def test_a_resumed_publisher_waits_for_its_source_to_list_every_model(
    settings: OperatorSettings,
) -> None:
    """Kopf lets a resumed replica's handlers run while its watches list
    again: its indexes still lack the models made during the pause, and a
    document written from them would drop those."""
    kube = FakeKube([model_body("a")])
    index = [kube.stored(LLMMODELS, "a", "llm")]
    publisher = RoutePublisher(kube, settings, source=_frozen(index))
    task = asyncio.create_task(publisher.run())
    try:
        publisher.kick()
        await _until(lambda: _documents(kube) == [["a"]])
        publisher.pause()
        kube.put(model_body("b"))  # made while paused: the peer routes it
        await RoutePublisher(kube, settings).publish()
        publisher.resume()
        publisher.kick()
        await asyncio.sleep(0.2)
        assert _documents(kube) == [["a"], ["a", "b"]]
        index.append(kube.stored(LLMMODELS, "b", "llm"))  # listed again
        await _until(lambda: len(_documents(kube)) == 3)
        assert _documents(kube)[-1] == ["a", "b"]
    finally:
        await _stopped(task)


async def test_a_publish_paused_while_it_listed_writes_nothing(
    settings: OperatorSettings,
) -> None:
    kube = FakeKube([model_body("a")])
    publisher = RoutePublisher(kube, settings)
    listed = publisher._source

    async def pausing() -> list[Any]:
        found = await listed()
        publisher.pause()  # the pause came while the models were listed
        return found

    publisher._source = pausing
    await publisher.publish()
    assert _documents(kube) == []
    assert publisher.published is None


async def test_a_large_document_goes_gzipped_and_back_to_text(
    settings: OperatorSettings,
) -> None:
    # 2,000 models: past GZIP_FROM_BYTES as text. Some 3,000 passed the 1 MiB
    # of a ConfigMap: the API server refused it, and gateways kept the last
    # document for good.
    many = [model_body(f"model-{i:05d}-instruct-v2") for i in range(2000)]
    models = many
    kube = FakeKube([])

    async def source() -> list[Manifest]:
        return models

    publisher = RoutePublisher(kube, settings, source=source, listing=source)
    await publisher.ensure()
    doc = await publisher.publish()
    stored = kube.stored(CONFIGMAPS, "citadel-routes", "citadel-system")
    # The create's text key, left by the fake's apply as by the API server's
    # (another manager owns it too), is removed.
    assert set(stored.get("data") or {}) == set()
    assert set(stored["binaryData"]) == {"routes.json.gz"}
    assert parse_document(configmap_document(stored)) == doc
    assert len(doc.models) == 2000
    models = many[:1]
    doc = await publisher.publish()
    stored = kube.stored(CONFIGMAPS, "citadel-routes", "citadel-system")
    assert set(stored.get("binaryData") or {}) == set()
    assert [r.name for r in parse_document(stored["data"]["routes.json"]).models] == [
        "model-00000-instruct-v2"
    ]
    # Once one form is all there is, a write removes nothing.
    patches = len(kube.patched)
    await publisher.publish()
    assert len(kube.patched) == patches == 2


class _PeerWritesAfterApply(FakeKube):
    """A peer's write of the ConfigMap between this replica's apply and its
    removal of the other form."""

    async def apply(
        self, obj: Manifest, *, subresource: str = "", dry_run: bool = False
    ) -> Manifest:
        applied = await super().apply(obj, subresource=subresource, dry_run=dry_run)
        if obj["kind"] == "ConfigMap":
            peer = copy.deepcopy(applied)
            peer["data"] = {"routes.json": '{"schemaVersion":1,"models":[]}'}
            peer["metadata"]["resourceVersion"] = "peer"
            self.objects[self._key(CONFIGMAPS, "citadel-routes", "citadel-system")] = (
                peer
            )
        return applied


async def test_removing_the_other_form_spares_a_newer_write(
    settings: OperatorSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # Only from the version the apply made: the peer's text key stays, the
    # document counts as written, and the clash it holds is reported.
    models = [model_body(f"model-{i:05d}-instruct-v2") for i in range(2000)]
    models.append(
        model_body(
            "b", servedName="model-00000-instruct-v2", created="2026-02-01T00:00:00Z"
        )
    )
    kube = _PeerWritesAfterApply([])
    told: list[set[str]] = []

    async def source() -> list[Manifest]:
        return models

    async def on_conflicts(changed: set[str]) -> None:
        told.append(changed)

    publisher = RoutePublisher(kube, settings, on_conflicts, source, source)
    await publisher.ensure()
    doc = await publisher.publish()
    stored = kube.stored(CONFIGMAPS, "citadel-routes", "citadel-system")
    assert stored["metadata"]["resourceVersion"] == "peer"
    assert set(stored["data"]) == {"routes.json"}
    assert publisher.published == doc
    assert told == [{"llm/b"}]
    assert "its stale /data/routes.json left for the next write" in caplog.text
