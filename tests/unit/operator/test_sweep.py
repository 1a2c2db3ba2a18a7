"""Objects deleted while a watch was down: Kopf keeps them in its indexes.

After a watch resumes too late (410 Gone) or after a pause for a peer, Kopf lists
again and indexes what the list brings, but removes nothing the list lacks. These
tests keep the indexes that way and check what the operator does with what is left.
"""

from __future__ import annotations

import asyncio
import copy
import logging
from typing import Any

import kopf
import orjson
import pytest

from citadel.operator import names
from citadel.operator.handlers import build_registry
from citadel.operator.kopfstate import MemoryState
from citadel.operator.kube.client import ApiError
from citadel.operator.kube.fake import FakeKube
from citadel.operator.kube.resources import DEPLOYMENTS, LLMMODELS, NODES, PODS
from citadel.operator.metrics import Metrics
from citadel.operator.reconcile import Reconciler
from citadel.operator.settings import OperatorSettings
from citadel.operator.sweep import IndexSweep
from citadel.operator.view import (
    DEPLOYMENTS_INDEX,
    INDEXES,
    MODELS_INDEX,
    NODES_INDEX,
    PODS_INDEX,
    IndexedView,
)

from .samples import NODES as SAMPLE_NODES
from .samples import NOW, model_body, node, pod

pytestmark = pytest.mark.unit

Body = dict[str, Any]


class KopfIndexes:
    """Indexes as Kopf keeps them (key -> values), filled by listings."""

    def __init__(self) -> None:
        self.data: dict[str, dict[Any, list[Body]]] = {name: {} for name in INDEXES}

    @staticmethod
    def _place(plural: str, ns: str, name: str, body: Body) -> tuple[str, Any]:
        model = body["metadata"].get("labels", {}).get(names.LABEL_MODEL)
        return {
            "llmmodels": (MODELS_INDEX, (ns, name)),
            "deployments": (DEPLOYMENTS_INDEX, (ns, model)),
            "pods": (PODS_INDEX, (ns, model)),
            "nodes": (NODES_INDEX, None),
        }[plural]

    def relist(self, kube: FakeKube) -> None:
        """A listing: each listed object indexed (in place, by uid, as Kopf's
        stores do), nothing removed."""
        for (plural, ns, name), obj in kube.objects.items():
            if plural not in ("llmmodels", "deployments", "pods", "nodes"):
                continue
            body = copy.deepcopy(obj)
            index, key = self._place(plural, ns, name, body)
            store = self.data[index].setdefault(key, [])
            uids = [b["metadata"]["uid"] for b in store]
            if body["metadata"]["uid"] in uids:
                store[uids.index(body["metadata"]["uid"])] = body
            else:
                store.append(body)

    def deleted(self, index: str, key: Any, uid: str) -> None:
        """A DELETED event: the object leaves its index."""
        store = self.data[index][key]
        store[:] = [b for b in store if b["metadata"]["uid"] != uid]
        if not store:
            del self.data[index][key]


def _gone(kube: FakeKube, *plurals: str) -> None:
    """Deletes every object of `plurals` behind the watches' backs."""
    for key in [k for k in kube.objects if k[0] in plurals]:
        del kube.objects[key]


def _setup(
    settings: OperatorSettings, *objects: Body
) -> tuple[FakeKube, KopfIndexes, Reconciler, IndexSweep]:
    kube = FakeKube([*SAMPLE_NODES, *objects])
    indexes = KopfIndexes()
    indexes.relist(kube)
    view = IndexedView(indexes.data)
    reconciler = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    reconciler.use(view)
    return kube, indexes, reconciler, IndexSweep(kube, view, settings.list_scopes())


def _routes(reconciler: Reconciler) -> list[str]:
    return [route.name for route in reconciler.routes.published.models]  # type: ignore[union-attr]


async def test_a_model_deleted_in_a_watch_gap_loses_its_route_and_its_pass(
    settings: OperatorSettings,
) -> None:
    kube, indexes, reconciler, sweep = _setup(
        settings, model_body(cache={"size": "10Gi"})
    )
    await reconciler.reconcile(model_body(cache={"size": "10Gi"}))
    indexes.relist(kube)
    [stale] = indexes.data[MODELS_INDEX][("llm", "mixtral")]
    # Deleted with all it owned (its claim by hand) while the watch was down.
    _gone(kube, "llmmodels", "deployments", "services", "persistentvolumeclaims")
    indexes.relist(kube)

    found = await sweep.sweep()

    assert found[MODELS_INDEX] == [stale]
    assert await reconciler.view.deployment("llm", "mixtral") is None
    await reconciler.routes.publish()
    assert _routes(reconciler) == []
    kube.applied.clear()
    kube.created.clear()
    # Kopf still runs the deleted model's timer: its pass creates nothing (it
    # made the Deployment again, and a claim that nothing would ever delete).
    await reconciler.reconcile(stale, resync=True)
    assert [obj["kind"] for obj in kube.created] == []
    assert [obj["kind"] for _, obj in kube.applied] == []


async def test_before_the_sweep_a_deleted_models_pass_makes_nothing(
    settings: OperatorSettings,
) -> None:
    """The view still shows it: what is missing is made only once etcd confirms
    the model (one read, only then)."""
    kube, indexes, reconciler, _ = _setup(settings, model_body(cache={"size": "10Gi"}))
    await reconciler.reconcile(model_body(cache={"size": "10Gi"}))
    indexes.relist(kube)
    [stale] = indexes.data[MODELS_INDEX][("llm", "mixtral")]
    _gone(kube, "llmmodels", "deployments", "services", "persistentvolumeclaims")
    kube.applied.clear()
    kube.created.clear()

    assert await reconciler.view.model("llm", "mixtral") is not None
    await reconciler.reconcile(stale, resync=True)
    # The Deployments' watch saw its deletion (by the garbage collector); that
    # event asks for it back.
    [deployment] = indexes.data[DEPLOYMENTS_INDEX][("llm", "mixtral")]
    indexes.deleted(
        DEPLOYMENTS_INDEX, ("llm", "mixtral"), deployment["metadata"]["uid"]
    )
    await reconciler.refresh("llm", "mixtral", fix_drift=True)

    assert [obj["kind"] for obj in kube.created] == []
    assert [obj["kind"] for _, obj in kube.applied] == []


async def test_before_the_sweep_a_pass_in_full_for_a_deleted_model_makes_nothing(
    settings: OperatorSettings,
) -> None:
    """A timer pass over a generation never reconciled (or failed) applies in
    full: it too confirms the model first."""
    kube, indexes, reconciler, _ = _setup(settings, model_body(cache={"size": "10Gi"}))
    [stale] = indexes.data[MODELS_INDEX][("llm", "mixtral")]
    _gone(kube, "llmmodels")

    await reconciler.reconcile(stale, resync=True)

    assert [obj["kind"] for obj in kube.created] == []
    assert [obj["kind"] for _, obj in kube.applied] == []


async def test_a_model_made_again_in_a_watch_gap_is_reconciled(
    settings: OperatorSettings,
) -> None:
    kube, indexes, reconciler, sweep = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    indexes.relist(kube)
    _gone(kube, "llmmodels", "deployments", "services")
    again = model_body()
    again["metadata"]["uid"] = "uid-mixtral-2"
    kube.put(again)
    indexes.relist(kube)  # the old entry first, under the same key

    # Already before the sweep the view answers with the newer, the one that
    # exists (its timer would otherwise take it for a leftover and forget it).
    found = await reconciler.view.model("llm", "mixtral")
    assert found is not None and found["metadata"]["uid"] == "uid-mixtral-2"
    models = await reconciler.view.models()  # what the routes are made of
    assert [body["metadata"]["uid"] for body in models] == ["uid-mixtral-2"]
    await sweep.sweep()

    found = await reconciler.view.model("llm", "mixtral")
    assert found is not None and found["metadata"]["uid"] == "uid-mixtral-2"
    await reconciler.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))
    owner = kube.stored(DEPLOYMENTS, "mixtral", "llm")["metadata"]["ownerReferences"]
    assert [ref["uid"] for ref in owner] == ["uid-mixtral-2"]
    await reconciler.routes.publish()
    assert _routes(reconciler) == ["mixtral"]
    assert reconciler.routes.conflicts == {}


async def test_a_pod_deleted_in_a_watch_gap_leaves_the_status(
    settings: OperatorSettings,
) -> None:
    kube, indexes, reconciler, sweep = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    kube.put(pod("mixtral-abc", node_name=None, unschedulable="0/3 nodes: no GPU"))
    indexes.relist(kube)
    await reconciler.refresh("llm", "mixtral")
    scheduled = kube.stored(LLMMODELS, "mixtral", "llm")["status"]["conditions"][1]
    assert scheduled["reason"] == "Unschedulable"
    _gone(kube, "pods")
    indexes.relist(kube)

    await sweep.sweep()

    assert await reconciler.view.pods("llm", "mixtral", "") == []
    indexes.relist(kube)  # the status write, as the watch brings it
    await reconciler.refresh("llm", "mixtral")
    scheduled = kube.stored(LLMMODELS, "mixtral", "llm")["status"]["conditions"][1]
    assert scheduled["type"] == "Scheduled"
    assert scheduled["reason"] != "Unschedulable"


async def test_a_node_deleted_in_a_watch_gap_no_longer_counts(
    settings: OperatorSettings,
) -> None:
    kube, indexes, _, sweep = _setup(settings, node("gpu-big", 16))
    view = IndexedView(indexes.data, sweep._view.vanished)
    del kube.objects[("nodes", "", "gpu-big")]
    indexes.relist(kube)

    await sweep.sweep()

    listed = [n["metadata"]["name"] for n in await view.nodes()]
    assert "gpu-big" not in listed and len(listed) == len(SAMPLE_NODES)


async def test_an_entry_newer_than_the_list_is_kept(
    settings: OperatorSettings,
) -> None:
    # An API server whose cache is behind the one that fed the watch lacks
    # what was just made: not a sign that it is gone.
    _, indexes, reconciler, sweep = _setup(settings)
    fresh = model_body("fresh")
    fresh["metadata"]["resourceVersion"] = "1000000"
    indexes.data[MODELS_INDEX][("llm", "fresh")] = [fresh]
    odd = model_body("odd")
    odd["metadata"]["resourceVersion"] = "not-a-number"
    indexes.data[MODELS_INDEX][("llm", "odd")] = [odd]

    assert await sweep.sweep() == {}
    assert len(await reconciler.view.models()) == 2


async def test_a_failed_list_leaves_the_index_as_it_was(
    settings: OperatorSettings, caplog: pytest.LogCaptureFixture
) -> None:
    kube, indexes, reconciler, sweep = _setup(settings, model_body(), pod("p"))
    _gone(kube, "llmmodels", "pods", "nodes")
    indexes.relist(kube)
    kube.fail[PODS.plural] = ApiError(503, "ServiceUnavailable", "try later")

    with caplog.at_level(logging.WARNING):
        found = await sweep.sweep()

    assert set(found) == {MODELS_INDEX, NODES_INDEX}
    assert len(await reconciler.view.pods("llm", "mixtral", "")) == 1
    assert "could not list pods" in caplog.text
    del kube.fail[PODS.plural]
    assert set(await sweep.sweep()) == {PODS_INDEX}


async def test_the_sweeps_go_on_after_one_that_fails_unforeseen(
    settings: OperatorSettings, caplog: pytest.LogCaptureFixture
) -> None:
    kube, indexes, reconciler, sweep = _setup(settings, model_body())
    _gone(kube, "llmmodels")
    indexes.relist(kube)
    kube.fail[LLMMODELS.plural] = TypeError("'NoneType' object is not iterable")  # type: ignore[assignment]
    task = asyncio.create_task(sweep.run(0.01))
    try:
        await asyncio.sleep(0.05)
        assert await reconciler.view.model("llm", "mixtral") is not None
        del kube.fail[LLMMODELS.plural]
        for _ in range(100):
            if await reconciler.view.model("llm", "mixtral") is None:
                break
            await asyncio.sleep(0.01)
    finally:
        task.cancel()
    assert await reconciler.view.model("llm", "mixtral") is None
    assert "sweeping the indexes failed" in caplog.text


async def test_marks_go_with_their_entries(settings: OperatorSettings) -> None:
    kube, indexes, reconciler, sweep = _setup(settings, model_body(), pod("p"))
    vanished = sweep._view.vanished
    [stale_pod] = indexes.data[PODS_INDEX][("llm", "mixtral")]
    _gone(kube, "llmmodels", "pods")
    await sweep.sweep()
    assert len(vanished) == 2
    # A late DELETED event takes the model's entry, and its mark, out.
    indexes.deleted(MODELS_INDEX, ("llm", "mixtral"), "uid-mixtral")
    # The pod, labelled away and back, comes as a newer copy: shown again.
    back = copy.deepcopy(stale_pod)
    back["metadata"]["resourceVersion"] = "1000000"
    indexes.data[PODS_INDEX][("llm", "mixtral")] = [back]
    assert await reconciler.view.pods("llm", "mixtral", "") == [back]

    await sweep.sweep()

    assert len(vanished) == 0


async def test_a_sweep_costs_a_list_per_resource_and_scope(
    settings: OperatorSettings,
) -> None:
    kube, _, _, sweep = _setup(settings, model_body())
    kube.reads.clear()
    await sweep.sweep()
    # No Deployment or pod yet: nothing to check, nothing listed.
    assert kube.reads == [("list cached", "llmmodels"), ("list cached", "nodes")]

    namespaced = settings.model_copy(update={"watch_namespaces": ("llm", "other")})
    kube, _, _, sweep = _setup(namespaced, model_body(), pod("p"))
    kube.reads.clear()
    await sweep.sweep()
    assert kube.reads == [
        ("list cached", "llmmodels"),
        ("list cached", "llmmodels"),
        ("list cached", "pods"),
        ("list cached", "pods"),
        ("list cached", "nodes"),
    ]
    # What is marked is not listed for again.
    _gone(kube, "nodes")
    await sweep.sweep()
    kube.reads.clear()
    await sweep.sweep()
    assert ("list cached", NODES.plural) not in kube.reads


def _written(kube: FakeKube) -> list[list[str]]:
    """The models of each routing document written, in order."""
    return [
        [m["name"] for m in orjson.loads(obj["data"]["routes.json"])["models"]]
        for _, obj in kube.applied
        if obj["kind"] == "ConfigMap"
    ]


def _login() -> kopf.ConnectionInfo:
    return kopf.ConnectionInfo(server="https://127.0.0.1:1")


async def _noop() -> None:
    return None


async def test_the_operator_sweeps_and_forgets_what_its_timer_finds_gone(
    settings: OperatorSettings,
) -> None:
    settings = settings.model_copy(update={"resync_seconds": 0.05})
    kube = FakeKube([*SAMPLE_NODES, model_body()])
    reconciler = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    state = MemoryState()
    registry = build_registry(reconciler, settings, _login, _noop, state)
    indexes = KopfIndexes()
    activities = {h.id: h.fn for h in registry._activities.get_all_handlers()}
    [startup] = [fn for id_, fn in activities.items() if "startup" in id_]
    [cleanup] = [fn for id_, fn in activities.items() if "cleanup" in id_]
    start: Any = startup
    await start(**indexes.data)
    [timer] = [h for h in registry._spawning.get_all_handlers() if h.id == "resync"]
    resync: Any = timer.fn
    handlers = {h.id: h.fn for h in registry._watching.get_all_handlers()}
    try:
        indexes.relist(kube)
        await reconciler.reconcile(model_body())
        indexes.relist(kube)
        await handlers["node-event"]()
        stale = copy.deepcopy(kube.stored(LLMMODELS, "mixtral", "llm"))
        series = reconciler.metrics.model_series._models
        assert ("llm", "mixtral") in series
        forgotten: list[str] = []
        state.forget = forgotten.extend  # type: ignore[method-assign]
        _gone(kube, "llmmodels", "deployments", "services")
        kube.applied.clear()
        for _ in range(100):
            if not await reconciler.view.models():
                break
            await asyncio.sleep(0.01)
        assert await reconciler.view.models() == []

        # The deleted model's timer, which Kopf keeps.
        await resync(body=stale, namespace="llm", name="mixtral", uid="uid-mixtral")

        assert DEPLOYMENTS.plural not in [k[0] for k in kube.objects]
        # Forgotten as its DELETED event would have: its metrics go.
        assert forgotten == ["uid-mixtral"]
        assert ("llm", "mixtral") not in series
        for _ in range(100):
            if _written(kube) and _written(kube)[-1] == []:
                break
            await asyncio.sleep(0.01)
        assert _written(kube)[-1] == []
    finally:
        stop: Any = cleanup
        await stop()
