"""The catalog: the routing document in force and the replicas of each model.

Discovery sources push into it (`put_in_force`, `set_endpoints`); requests read from
it. Swapping a document replaces immutable lookups in one assignment, so requests in
flight keep the route they resolved and none is dropped. The lookups are built
beforehand (`routing_table`), off the event loop where a source can. An invalid
document is logged and the last good one stays; so does the document whose source
is gone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass

from citadel.gateway.errors import ModelNotFound, NotReady
from citadel.gateway.routes import (
    FALLBACKS_FIELD,
    DocumentReading,
    ModelRoute,
    RoutesError,
    RoutingDocument,
    unknown_names,
)
from citadel.gateway.services.replicas import Endpoint, Replica

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoutingTable:
    """A document read by `read_document`, made ready to put in force against
    the document in force when it was made (`routing_table`).

    Making one costs time in proportion to the models (some 40 ms at 40,000, on
    top of some 1 s to read them), so sources make it off the event loop, while
    requests go on; putting it in force is one assignment.
    """

    reading: DocumentReading
    """The document as read."""
    previous: RoutingDocument | None
    """The document in force it was made against: the routes it keeps come
    from it."""
    document: RoutingDocument
    """What goes in force: `reading`'s document, with the routes it left out
    kept from `previous`."""
    problems: tuple[str, ...]
    by_name: Mapping[str, ModelRoute]
    """Each route by each name that routes to it (`ModelRoute.all_names`: an
    adapter's too)."""
    unknown: frozenset[tuple[str, str, str]] = frozenset()
    """(`namespace/name`, field, name) of each fallback or split target of
    `document` that names no route of it (`unknown_names`): found here, off
    the event loop, as it walks every route."""


def routing_table(
    reading: DocumentReading, previous: RoutingDocument | None
) -> RoutingTable:
    """`reading` made ready to put in force after `previous` (pure: it may run
    in a worker thread).

    Args:
        reading: the document, from `read_document`.
        previous: the document in force, whose routes the models `reading` left
            out keep (`DocumentReading.keeping`).
    """
    kept = reading.keeping(previous)
    by_name = {
        name: route for route in kept.document.models for name in route.all_names
    }
    return RoutingTable(
        reading,
        previous,
        kept.document,
        kept.problems,
        by_name,
        frozenset(
            (key, field, name)
            for (key, field), names in unknown_names(kept.document, by_name).items()
            for name in names
        ),
    )


@dataclass(frozen=True)
class _Departed:
    """A replica whose address left its Service, kept a while."""

    left: float
    replica: Replica
    service: tuple[str, str]
    pod: str | None


class Catalog:
    """Models by name and their usable replicas.

    Args:
        on_reload: called with "ok", "partial" or "invalid" after each document
            offered, and with "missing" when the document's source is gone.
        clock: monotonic seconds, for how long a departed replica is kept.
    """

    # How long the state of an address that left its Service is kept: when the
    # EndpointSlice controller moves a pod to another slice, the old slice's
    # event can come first, and the pod's requests in flight and ejection
    # would otherwise start afresh when the new slice's event brings it back.
    # Only the same Service gets it back, and the same pod where the slices
    # name it: an IP is soon handed to another pod, maybe another model's,
    # which must not start ejected, or with the old pod's load.
    DEPARTED_KEEP_S = 60.0

    def __init__(
        self,
        on_reload: Callable[[str], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._document: RoutingDocument | None = None
        self._by_name: Mapping[str, ModelRoute] = {}
        self._endpoints: dict[tuple[str, str], tuple[Endpoint, ...]] = {}
        self._replicas: dict[str, Replica] = {}
        # How many Services list each URL: a change to one Service touches its
        # own URLs only. Rescanning every Service's made an EndpointSlice event
        # cost 207 ms at 1,000 models; this way 0.01 ms (one of 1,000 Services,
        # two addresses each, changed 20 times, at 4b9687e and at 763b9f7).
        self._uses: dict[str, int] = {}
        # URL -> the replica that left it, oldest first.
        self._departed: dict[str, _Departed] = {}
        self._on_reload = on_reload
        self._clock = clock
        self._document_listeners: list[Callable[[RoutingDocument], None]] = []
        self._unknown: frozenset[tuple[str, str, str]] = frozenset()
        """`RoutingTable.unknown` of the document in force, each logged once."""
        self._change_listeners: list[Callable[[], None]] = []

    @property
    def loaded(self) -> bool:
        """True once a valid routing document has been loaded."""
        return self._document is not None

    @property
    def document(self) -> RoutingDocument | None:
        """The routing document in force."""
        return self._document

    def on_document(self, listener: Callable[[RoutingDocument], None]) -> None:
        """Calls `listener` with each document put in force from now on (after
        it is in force)."""
        self._document_listeners.append(listener)

    def on_change(self, listener: Callable[[], None]) -> None:
        """Calls `listener` after each change that may give a model a replica
        or take one away: a document put in force, a Service's addresses
        replaced (requests held for a model at zero wait on it)."""
        self._change_listeners.append(listener)

    def _changed(self) -> None:
        for listener in self._change_listeners:
            listener()

    def set_document(self, doc: RoutingDocument, problems: Sequence[str] = ()) -> None:
        """Puts a new routing document in force (`put_in_force`, with its
        lookups built here).

        Args:
            doc: the document.
            problems: routes it was read without, or read differently (from
                `read_document`): each is logged, and the reload counts as partial.
        """
        reading = DocumentReading(doc, tuple(problems))
        self.put_in_force(routing_table(reading, self._document))

    def put_in_force(self, table: RoutingTable) -> RoutingDocument:
        """Puts a table made by `routing_table` in force; returns its document.

        A table made against a document no longer in force is made again
        against the one in force (here, on the caller's thread): the routes it
        kept for models it left out could be older than those now served.
        """
        if table.previous is not self._document:
            table = routing_table(table.reading, self._document)
        doc, problems = table.document, table.problems
        self._document, self._by_name = doc, table.by_name
        for listener in self._document_listeners:
            listener(doc)
        for problem in problems:
            log.warning("routing document: %s", problem)
        for key, field, name in sorted(table.unknown - self._unknown):
            # Not a problem of the document (which a reload's result and its
            # alert would report): it may name a model made later. Told once,
            # when it starts naming none, so that a typo shows.
            log.warning(
                "routing document: model %s: its %s %r names no model; %s",
                key,
                "fallback" if field == FALLBACKS_FIELD else "split target",
                name,
                "skipped until one does"
                if field == FALLBACKS_FIELD
                else "its share stays with the model until one does",
            )
        self._unknown = table.unknown
        log.info(
            "routing document loaded",
            extra={"models": len(doc.models), "problems": len(problems)},
        )
        if self._on_reload:
            self._on_reload("partial" if problems else "ok")
        self._changed()
        return doc

    def reject_document(self, error: RoutesError | str) -> None:
        """Records an unusable document; the last good one stays in force."""
        log.error(
            "routing document rejected; keeping the last good one",
            extra={"error": str(error), "loaded": self.loaded},
        )
        if self._on_reload:
            self._on_reload("invalid")

    def lose_document(self, why: str) -> None:
        """Records that the routing document's source is gone (its ConfigMap
        deleted); the document in force stays, and so does readiness."""
        log.warning(
            "routing document gone; keeping the last good one",
            extra={"error": why, "loaded": self.loaded},
        )
        if self._on_reload:
            self._on_reload("missing")

    def set_endpoints(
        self, namespace: str, service: str, endpoints: Sequence[Endpoint]
    ) -> None:
        """Replaces the addresses behind one Service (none: forgets it).

        An address listed twice (a pod in two EndpointSlices while they are
        reshuffled) counts once, as the EndpointSlice API asks of its readers,
        in its most usable state.
        """
        key = (namespace, service)
        unique: dict[str, Endpoint] = {}
        for endpoint in endpoints:
            known = unique.get(endpoint.url)
            if known is None or _usability(endpoint) > _usability(known):
                unique[endpoint.url] = endpoint
        previous = {e.url: e for e in self._endpoints.get(key, ())}
        before = previous.keys()
        if unique:
            self._endpoints[key] = tuple(unique.values())
        else:
            self._endpoints.pop(key, None)
        now = self._clock()
        self._forget_departed(now)
        for url in unique.keys() - before:
            self._uses[url] = self._uses.get(url, 0) + 1
            if url not in self._replicas:
                gone = self._departed.pop(url, None)
                if gone and gone.service == key and gone.pod == unique[url].pod:
                    self._replicas[url] = gone.replica
                else:
                    self._replicas[url] = Replica(url)
        for url in before - unique.keys():
            self._uses[url] -= 1
            if not self._uses[url]:
                # Requests in flight keep their own reference to the replica.
                del self._uses[url]
                self._departed[url] = _Departed(
                    now, self._replicas.pop(url), key, previous[url].pod
                )
        self._changed()

    def _forget_departed(self, now: float) -> None:
        while self._departed:
            url, gone = next(iter(self._departed.items()))
            if now - gone.left < self.DEPARTED_KEEP_S:
                return
            del self._departed[url]

    def forget_namespace(self, namespace: str) -> None:
        """Forgets the addresses of every Service in `namespace` (no longer
        watched: what it held could be stale when it is watched again)."""
        for ns, service in [k for k in self._endpoints if k[0] == namespace]:
            self.set_endpoints(ns, service, ())

    def route_named(self, name: str) -> ModelRoute | None:
        """The route for a model name, alias or adapter name, or None when the
        document in force (if any) has no model by that name."""
        return self._by_name.get(name)

    def resolve(self, name: str) -> ModelRoute:
        """The route for a model name, alias or adapter name (an adapter's is
        its base model's: the same replicas).

        Raises:
            NotReady: no routing document has been loaded yet.
            ModelNotFound: no model by that name.
        """
        route = self._by_name.get(name)
        if route is not None:
            return route
        if not self.loaded:
            raise NotReady("the gateway has not loaded its routes yet", retry_after_s=2)
        raise unknown_model(name)

    def routes(self) -> tuple[ModelRoute, ...]:
        """Every model in the document in force."""
        return self._document.models if self._document else ()

    def replicas(
        self, route: ModelRoute, exclude: Collection[Replica] = ()
    ) -> list[Replica]:
        """Replicas that may take new requests, but those in `exclude`: ready
        ones, else terminating ones still serving (so a rolling update never
        leaves a gap).

        The exclusion comes first: a retry after every ready replica failed
        goes on to a terminating one still serving, as a first try would,
        rather than end in a 502.
        """
        endpoints = self._endpoints.get((route.namespace, route.service), ())
        ready = [e for e in endpoints if _staying(e)]
        chosen = [r for r in self._of(ready) if r not in exclude]
        if not chosen:
            serving = [e for e in endpoints if e.serving]
            chosen = [r for r in self._of(serving) if r not in exclude]
        return chosen

    def has_ready(self, route: ModelRoute) -> bool:
        """Whether a replica of the model is ready and not shutting down (one
        that is, still serving, is no replica to hold a request for: the last
        pod of a model scaling to zero refuses new connections at once)."""
        endpoints = self._endpoints.get((route.namespace, route.service), ())
        return any(_staying(e) for e in endpoints)

    def terminating(
        self, route: ModelRoute, exclude: Collection[Replica] = ()
    ) -> list[Replica]:
        """Replicas shutting down that still serve, but those in `exclude`: the
        router's next choice when every ready one is ejected."""
        endpoints = self._endpoints.get((route.namespace, route.service), ())
        serving = [e for e in endpoints if e.serving and e.terminating]
        return [r for r in self._of(serving) if r not in exclude]

    def _of(self, endpoints: Sequence[Endpoint]) -> list[Replica]:
        return [self._replicas[e.url] for e in endpoints]

    def services(self) -> list[tuple[str, str]]:
        """(namespace, Service) of every Service with addresses."""
        return list(self._endpoints)

    def all_replicas(self) -> dict[str, Replica]:
        """Every known replica by URL (for the metrics scraper)."""
        return dict(self._replicas)


def unknown_model(name: str) -> ModelNotFound:
    """The error for a model name the caller may not send (404 `model_not_found`),
    the same wherever the gateway refuses one."""
    return ModelNotFound(f"The model `{name}` does not exist.", param="model")


def _staying(endpoint: Endpoint) -> bool:
    """Ready and not shutting down: a replica to send new requests to."""
    return endpoint.ready and not endpoint.terminating


def _usability(endpoint: Endpoint) -> tuple[bool, bool, bool]:
    return (
        _staying(endpoint),
        endpoint.serving,
        not endpoint.terminating,
    )
