"""What the Reconciler reads: models, their Deployments and pods, and the nodes.

Two sources answer the same questions. `ApiView` asks the API server each time (unit
tests, and any caller without watches). `IndexedView` answers from the Kopf indexes
that `handlers.build_registry` keeps on the operator's own watch streams, so a status
refresh costs no request at all: at 300 models those reads were about 11 of the
operator's ~24 requests per model (apiserver_request_total before and after a run).

Kopf runs no handler before every index has its initial listing, so an indexed read
never sees a half-filled cache; afterwards an index is as fresh as the last event
its stream delivered, and every change brings an event that refreshes again. Except
one: a watch that resumes too late (410 Gone, as across an API server restart) or
after a pause for a peer lists again, and an object deleted meanwhile gets no event,
so Kopf keeps it in its index for ever. `Vanished` marks such entries (sweep.py finds
them) and `IndexedView` skips them.
"""

from __future__ import annotations

import time
from collections.abc import Collection, Iterable, Mapping, Sequence
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


def _version_of(body: Mapping[str, Any]) -> tuple[str, str]:
    meta = body.get("metadata", {})
    return str(meta.get("uid", "")), str(meta.get("resourceVersion", ""))


class Vanished:
    """Index entries whose object the API server no longer has (see sweep.py).

    Each mark is a uid with the resourceVersion of the copy left in the index: a
    copy the watch replaced since (an object of ours labelled away and back) is
    not hidden. Marks go with their entries (`keep`), so they never outnumber
    the indexes' entries.
    """

    def __init__(self) -> None:
        self._marks: dict[str, str] = {}

    def __len__(self) -> int:
        return len(self._marks)

    def hides(self, body: Mapping[str, Any]) -> bool:
        """Whether `body` is a copy marked as gone."""
        uid, version = _version_of(body)
        return self._marks.get(uid) == version

    def mark(self, body: Mapping[str, Any]) -> None:
        """Marks this copy as gone."""
        uid, version = _version_of(body)
        self._marks[uid] = version

    def keep(self, bodies: Iterable[Mapping[str, Any]]) -> None:
        """Drops the marks of copies not among `bodies` (every entry of every
        index): a late DELETED event, or a newer copy, took theirs out."""
        present = dict(_version_of(body) for body in bodies)
        self._marks = {
            uid: version
            for uid, version in self._marks.items()
            if present.get(uid) == version
        }


class IndexedView:
    """Reads from Kopf's indexes (see `handlers.build_registry` for their keys),
    skipping the entries `vanished` marks."""

    def __init__(
        self, indexes: Mapping[str, Any], vanished: Vanished | None = None
    ) -> None:
        """Takes the indexes from a handler's keyword arguments.

        Raises:
            KeyError: an index is missing (the registry did not declare it).
        """
        self.indexes: dict[str, Index] = {name: indexes[name] for name in INDEXES}
        self.vanished = vanished if vanished is not None else Vanished()

    def _all(self, index: str, key: object) -> list[Manifest]:
        store = self.indexes[index].get(key, ())
        if not self.vanished:
            return list(store)
        return [body for body in store if not self.vanished.hides(body)]

    def _one(self, index: str, key: object) -> Manifest | None:
        # A model deleted and made again under its name while the watch was
        # down shares the key with what is left of the old one until the sweep
        # hides it: the newer is the one that exists (two of one name cannot).
        found = self._all(index, key)
        if len(found) > 1:
            return max(found, key=lambda body: resource_version(body) or 0)
        return found[0] if found else None

    async def model(self, namespace: str, name: str) -> Manifest | None:
        return self._one(MODELS_INDEX, (namespace, name))

    async def models(self) -> list[Manifest]:
        # One per name, as `model` answers: not both of a model made again.
        found = (self._one(MODELS_INDEX, key) for key in self.indexes[MODELS_INDEX])
        return [body for body in found if body is not None]

    async def deployment(self, namespace: str, name: str) -> Manifest | None:
        return self._one(DEPLOYMENTS_INDEX, (namespace, name))

    async def pods(self, namespace: str, model: str, selector: str) -> list[Manifest]:
        return self._all(PODS_INDEX, (namespace, model))

    async def nodes(self) -> list[Manifest]:
        return self._all(NODES_INDEX, None)


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
