"""Index entries of objects deleted while a watch was down: found, and hidden.

A watch that resumes too late (410 Gone: the API server no longer keeps the
resourceVersion it resumes from, as across an API server restart or upgrade), or
after a pause for a peer, lists again. Kopf indexes every object the list brings
and removes none that it lacks: no DELETED event came for them. Such an entry
would stay until the operator restarts: a deleted model kept its route (gateways
sent requests to a Service that is gone), its Kopf timer kept its periodic pass,
which created its Deployment again, and a model made again under its name was
never reconciled; a deleted pod kept its condition in its model's status, a
deleted node its GPUs among the candidates.

Kopf's index entries cannot be removed from outside, so `IndexSweep` marks them
in the view's `Vanished`: once per period it lists each watched resource (uids
only, from the API server's watch cache) and marks every entry the list lacks.
Only an entry older than the list: an API server whose cache is behind the one
that fed the watch would lack objects just made, which must not be marked.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from citadel.operator import names
from citadel.operator.kube.client import ApiError, Kube, Listing, Manifest
from citadel.operator.kube.resources import (
    DEPLOYMENTS,
    LLMMODELS,
    NODES,
    PODS,
    Resource,
)
from citadel.operator.view import (
    DEPLOYMENTS_INDEX,
    MODELS_INDEX,
    NODES_INDEX,
    PODS_INDEX,
    IndexedView,
    resource_version,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Watched:
    """One index and what its watch asks the API server for."""

    index: str
    resource: Resource
    label_selector: str | None = None


WATCHED = (
    Watched(MODELS_INDEX, LLMMODELS),
    Watched(DEPLOYMENTS_INDEX, DEPLOYMENTS, names.MANAGED_SELECTOR),
    Watched(PODS_INDEX, PODS, names.MANAGED_SELECTOR),
    Watched(NODES_INDEX, NODES),
)


def is_gone(body: Mapping[str, Any], listing: Listing) -> bool:
    """Whether `listing` shows that the object of this index entry is gone: it
    lacks the object and is newer than the entry (False when either
    resourceVersion is not a number)."""
    meta = body.get("metadata", {})
    if not meta.get("uid") or meta["uid"] in listing.uids:
        return False
    entry = resource_version(body)
    listed = resource_version(
        {"metadata": {"resourceVersion": listing.resource_version}}
    )
    return entry is not None and listed is not None and entry < listed


class IndexSweep:
    """Marks the view's index entries whose objects the API server no longer has.

    Args:
        kube: lists the watched resources.
        view: the indexes, and the marks.
        scopes: the namespaces the watches cover (None: all), as
            `OperatorSettings.list_scopes` gives them.
    """

    def __init__(
        self, kube: Kube, view: IndexedView, scopes: Sequence[str | None]
    ) -> None:
        self._kube = kube
        self._view = view
        self._scopes = scopes

    def _entries(self, index: str) -> list[Manifest]:
        return [body for store in self._view.indexes[index].values() for body in store]

    async def _listings(self, watched: Watched) -> dict[str | None, Listing]:
        scopes = self._scopes if watched.resource.namespaced else (None,)
        return {
            scope: await self._kube.list_uids(
                watched.resource, scope, label_selector=watched.label_selector
            )
            for scope in scopes
        }

    async def sweep(self) -> dict[str, list[Manifest]]:
        """One pass over every index: a list per watched resource and scope, none
        for an index with nothing unmarked. A list that fails is logged and
        leaves its index as it was.

        Returns:
            Per index, the entries marked in this pass.
        """
        vanished = self._view.vanished
        found: dict[str, list[Manifest]] = {}
        for watched in WATCHED:
            # Taken before the list: what the watch adds meanwhile is newer
            # than what the index had, and is left for the next pass.
            entries = [b for b in self._entries(watched.index) if not vanished.hides(b)]
            if not entries:
                continue
            try:
                listings = await self._listings(watched)
            except ApiError as err:
                log.warning(
                    "could not list %s to find what the watch missed: %s",
                    watched.resource.plural,
                    err,
                )
                continue
            for body in entries:
                namespace = body.get("metadata", {}).get("namespace")
                listing = listings.get(namespace) or listings.get(None)
                if listing is not None and is_gone(body, listing):
                    vanished.mark(body)
                    found.setdefault(watched.index, []).append(body)
        vanished.keep(body for w in WATCHED for body in self._entries(w.index))
        for index, bodies in found.items():
            log.info(
                "%s: %d deleted while the watch was down, hidden from now on: %s",
                index,
                len(bodies),
                ", ".join(_named(body) for body in bodies[:10]),
            )
        return found

    async def run(self, interval: float) -> None:
        """Sweeps every `interval` seconds until cancelled; a pass that fails
        for any reason is logged, and the next one runs all the same."""
        while True:
            await asyncio.sleep(interval)
            try:
                await self.sweep()
            except Exception:
                # An answer of a shape not foreseen (a real API server's empty
                # metadata list once was) must not end the sweeps for good.
                log.exception("sweeping the indexes failed")


def _named(body: Mapping[str, Any]) -> str:
    meta = body.get("metadata", {})
    namespace = meta.get("namespace")
    return f"{namespace}/{meta.get('name')}" if namespace else str(meta.get("name"))
