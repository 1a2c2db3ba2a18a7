"""Reading from the watches' indexes instead of the API server."""

from __future__ import annotations

import copy
from typing import Any

import pytest

from citadel.operator.kube.fake import FakeKube
from citadel.operator.kube.resources import DEPLOYMENTS, LLMMODELS, PODS
from citadel.operator.metrics import Metrics
from citadel.operator.reconcile import Reconciler
from citadel.operator.settings import OperatorSettings
from citadel.operator.view import (
    DEPLOYMENTS_INDEX,
    MODELS_INDEX,
    NODES_INDEX,
    PODS_INDEX,
    IndexedView,
    resource_version,
)

from .samples import NODES, NOW, model_body, pod

pytestmark = pytest.mark.unit


class Indexes:
    """Indexes as Kopf keeps them (key -> values), filled from a FakeKube."""

    def __init__(self) -> None:
        self.data: dict[str, dict[Any, list[dict[str, Any]]]] = {
            MODELS_INDEX: {},
            DEPLOYMENTS_INDEX: {},
            PODS_INDEX: {},
            NODES_INDEX: {},
        }

    def sync(self, kube: FakeKube) -> None:
        """What the watches would have delivered by now."""
        for index in self.data.values():
            index.clear()  # in place: the view holds these very mappings
        for (plural, ns, name), obj in kube.objects.items():
            body = copy.deepcopy(obj)
            model = body["metadata"].get("labels", {}).get("citadel.ai/model")
            if plural == "llmmodels":
                self.data[MODELS_INDEX][(ns, name)] = [body]
            elif plural == "deployments" and model:
                self.data[DEPLOYMENTS_INDEX][(ns, model)] = [body]
            elif plural == "pods" and model:
                self.data[PODS_INDEX].setdefault((ns, model), []).append(body)
            elif plural == "nodes":
                self.data[NODES_INDEX].setdefault(None, []).append(body)

    def view(self) -> IndexedView:
        return IndexedView(self.data)


def _setup(
    settings: OperatorSettings, *objects: dict[str, Any]
) -> tuple[FakeKube, Indexes, Reconciler]:
    kube = FakeKube([*NODES, *objects])
    indexes = Indexes()
    indexes.sync(kube)
    reconciler = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    reconciler.use(indexes.view())
    return kube, indexes, reconciler


def _ready_pod(kube: FakeKube) -> None:
    deployment = kube.stored(DEPLOYMENTS, "mixtral", "llm")
    deployment["status"] = {
        "observedGeneration": deployment["metadata"]["generation"],
        "replicas": 1,
        "updatedReplicas": 1,
        "readyReplicas": 1,
        "availableReplicas": 1,
    }
    kube.put(pod("mixtral-abc"))


async def test_indexed_view_answers_from_the_indexes() -> None:
    indexes = Indexes()
    kube = FakeKube([*NODES, model_body(), pod("mixtral-abc")])
    indexes.sync(kube)
    view = indexes.view()
    found = await view.model("llm", "mixtral")
    assert found is not None and found["metadata"]["name"] == "mixtral"
    assert await view.model("llm", "other") is None
    assert await view.deployment("llm", "mixtral") is None
    pods = await view.pods("llm", "mixtral", "ignored")
    assert [p["metadata"]["name"] for p in pods] == ["mixtral-abc"]
    assert len(await view.nodes()) == len(NODES)


async def test_status_refresh_makes_no_reads(settings: OperatorSettings) -> None:
    kube, indexes, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    _ready_pod(kube)
    indexes.sync(kube)
    kube.reads.clear()
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert kube.reads == []
    assert kube.stored(LLMMODELS, "mixtral", "llm")["status"]["phase"] == "Ready"


async def test_a_view_behind_our_own_write_does_not_repeat_it(
    settings: OperatorSettings,
) -> None:
    kube, indexes, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    _ready_pod(kube)
    # The pod shows up in the index, but the model's own watch still lags
    # behind the status the operator is about to write.
    indexes.sync(kube)
    stale_model = copy.deepcopy(indexes.data[MODELS_INDEX][("llm", "mixtral")])
    await reconciler.refresh("llm", "mixtral")
    writes = len(kube.applied)
    events = len(kube.events)
    assert kube.stored(LLMMODELS, "mixtral", "llm")["status"]["phase"] == "Ready"
    indexes.data[MODELS_INDEX][("llm", "mixtral")] = stale_model
    await reconciler.refresh("llm", "mixtral")
    assert len(kube.applied) == writes
    assert len(kube.events) == events
    # Once the watch delivers the write, the view is used again.
    indexes.sync(kube)
    await reconciler.refresh("llm", "mixtral")
    assert reconciler._written == {}


async def test_a_deployment_seen_by_the_watch_is_not_read_again(
    settings: OperatorSettings,
) -> None:
    kube, indexes, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    indexes.sync(kube)
    kube.reads.clear()
    await reconciler.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))
    assert ("get", DEPLOYMENTS.plural) not in kube.reads
    assert ("list", PODS.plural) not in kube.reads


def test_resource_version_is_a_number_or_none() -> None:
    assert resource_version({"metadata": {"resourceVersion": "42"}}) == 42
    assert resource_version({"metadata": {"resourceVersion": "abc"}}) is None
    assert resource_version({"metadata": {}}) is None
