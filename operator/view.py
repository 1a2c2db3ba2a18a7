"""What the Reconciler reads: models, their Deployments and pods, and the nodes.

Two sources answer the same questions. `ApiView` asks the API server each time (unit
tests, and any caller without watches). `IndexedView` answers from the Kopf indexes
that `handlers.build_registry` keeps on the operator's own watch streams, so a status
refresh costs no request at all: at 300 models those reads were about 11 of the
operator's ~24 requests per model (apiserver_request_total before and after a run).

Kopf runs no handler before every index has its initial listing, so an indexed read
never sees a half-filled cache; afterwards an index is as fresh as the last event
its stream delivered, and every change brings an event that refreshes again.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Protocol

from citadel.operator.kube.client import Kube, Manifest
from citadel.operator.kube.resources import DEPLOYMENTS, LLMMODELS, NODES, PODS

NODE_CACHE_SECONDS = 2.0

# Index names: Kopf hands each index to handlers as a keyword of this name.
MODELS_INDEX = "citadel_models"
DEPLOYMENTS_INDEX = "citadel_deployments"
PODS_INDEX = "citadel_pods"
NODES_INDEX = "citadel_nodes"
INDEXES = (MODELS_INDEX, DEPLOYMENTS_INDEX, PODS_INDEX, NODES_INDEX)

# A Kopf index: key -> the values its objects contributed under that key (plain
# dicts, shared: readers must not change them).
Index = Mapping[Any, Collection[Manifest]]


class ClusterView(Protocol):
    """Read access to what the Reconciler derives status from."""

    async def model(self, namespace: str, name: str) -> Manifest | None:
        """The LLMModel, or None when it does not exist."""
        ...

    async def models(self) -> list[Manifest]:
        """Every LLMModel the operator can see."""
        ...

    async def deployment(self, namespace: str, name: str) -> Manifest | None:
        """The model's Deployment (labelled as ours), or None."""
        ...

    async def pods(self, namespace: str, model: str, selector: str) -> list[Manifest]:
        """The model's pods; `selector` is their label selector."""
        ...

    async def nodes(self) -> list[Manifest]:
        """Every node."""
        ...


class ApiView:
    """Reads through the API server (nodes cached for a couple of seconds)."""

    def __init__(self, kube: Kube, scopes: Sequence[str | None] = (None,)) -> None:
        """Reads through `kube`; `models` lists each of `scopes` (None: all)."""
        self._kube = kube
        self._scopes = scopes
        self._nodes: tuple[float, list[Manifest]] | None = None

    async def model(self, namespace: str, name: str) -> Manifest | None:
        return await self._kube.get(LLMMODELS, name, namespace)

    async def models(self) -> list[Manifest]:
        found: list[Manifest] = []
        for scope in self._scopes:
            found.extend(await self._kube.list(LLMMODELS, scope))
        return found

    async def deployment(self, namespace: str, name: str) -> Manifest | None:
        return await self._kube.get(DEPLOYMENTS, name, namespace)

    async def pods(self, namespace: str, model: str, selector: str) -> list[Manifest]:
        return await self._kube.list(PODS, namespace, label_selector=selector)

    async def nodes(self) -> list[Manifest]:
        now = time.monotonic()
        if self._nodes and now - self._nodes[0] < NODE_CACHE_SECONDS:
            return list(self._nodes[1])
        nodes = await self._kube.list(NODES)
        self._nodes = (now, nodes)
        return list(nodes)


def _one(index: Index, key: object) -> Manifest | None:
    store = index.get(key)
    if not store:
        return None
    return next(iter(store))


class IndexedView:
    """Reads from Kopf's indexes (see `handlers.build_registry` for their keys)."""

    def __init__(self, indexes: Mapping[str, Any]) -> None:
        """Takes the indexes from a handler's keyword arguments.

        Raises:
            KeyError: an index is missing (the registry did not declare it).
        """
        self._models: Index = indexes[MODELS_INDEX]
        self._deployments: Index = indexes[DEPLOYMENTS_INDEX]
        self._pods: Index = indexes[PODS_INDEX]
        self._nodes: Index = indexes[NODES_INDEX]

    async def model(self, namespace: str, name: str) -> Manifest | None:
        return _one(self._models, (namespace, name))

    async def models(self) -> list[Manifest]:
        return [body for store in self._models.values() for body in store]

    async def deployment(self, namespace: str, name: str) -> Manifest | None:
        return _one(self._deployments, (namespace, name))

    async def pods(self, namespace: str, model: str, selector: str) -> list[Manifest]:
        return list(self._pods.get((namespace, model), ()))

    async def nodes(self) -> list[Manifest]:
        return list(self._nodes.get(None, ()))


def resource_version(body: Mapping[str, Any]) -> int | None:
    """The object's resourceVersion as a number, or None if it is not one.

    The API calls it opaque; the Kubernetes storage (etcd revisions) makes it a
    number that grows with every write, and it is used only to tell which of two
    copies of one object, one from a write's reply and one from the watch, is newer.
    """
    raw = body.get("metadata", {}).get("resourceVersion")
    try:
        return int(raw)
    except (TypeError, ValueError):
        return None


def is_newer(copy: Mapping[str, Any], other: Mapping[str, Any]) -> bool:
    """Whether `copy` of an object is a later version than `other`; False when
    either resourceVersion is not a number."""
    mine, theirs = resource_version(copy), resource_version(other)
    return mine is not None and theirs is not None and mine > theirs
