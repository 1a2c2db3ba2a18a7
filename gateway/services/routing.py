"""The router: one strategy instance per model, chosen by the routing document."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Collection

from citadel.gateway.errors import NoReplica
from citadel.gateway.routes import ModelRoute, RoutingDocument, RoutingStrategy
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.placements import Placement
from citadel.gateway.services.prefix import Mark
from citadel.gateway.services.replicas import Replica
from citadel.gateway.services.strategies import (
    PrefixAware,
    RouteRequest,
    Strategy,
    make_strategy,
)

NO_REPLICA_RETRY_S = 5.0


class Router:
    """Picks a replica for each attempt of a request.

    Each model's strategy keeps its state (a prefix-aware table holds up to
    200,000 block hashes) while the model keeps its served name and strategy;
    each document put in force drops the state of the models it no longer has.

    Args:
        catalog: the models and their replicas.
        clock: monotonic seconds (for ejection times).
        on_decision: called with (model, strategy, how) after each choice.
        load_max_age_s: how old a replica's vLLM load report may be and still
            count for `kv-aware` (see `scraper.report_max_age_s`).
        on_placed: told each `prefix-aware` placement, to share it with the
            other gateway replicas (`placements.PlacementExchange.offer`).
    """

    def __init__(
        self,
        catalog: Catalog,
        clock: Callable[[], float],
        on_decision: Callable[[str, str, str], None] | None = None,
        load_max_age_s: float = math.inf,
        on_placed: Callable[[Placement], None] | None = None,
    ) -> None:
        self._catalog = catalog
        self._on_placed = on_placed
        self._clock = clock
        self._load_max_age_s = load_max_age_s
        self._on_decision = on_decision
        self._strategies: dict[tuple[str, str], Strategy] = {}
        catalog.on_document(self._forget_gone)

    def _forget_gone(self, doc: RoutingDocument) -> None:
        """Drops the strategies of models deleted, renamed or switched to
        another strategy: kept, they would last as long as the process.

        It looks up the strategies held (of models that had requests) in the
        catalog, where `doc` is in force, rather than walk `doc`: it runs on
        the event loop with each reload, and walking 40,000 routes took 20 ms.
        """
        for served, strategy in list(self._strategies):
            route = self._catalog.route_named(served)
            if (
                route is None
                or route.served_name != served  # now another model's alias
                or route.strategy.value != strategy
            ):
                del self._strategies[served, strategy]

    def choose(
        self,
        route: ModelRoute,
        request: RouteRequest,
        exclude: Collection[Replica] = (),
    ) -> Replica:
        """A replica for `route` not in `exclude`.

        Healthy replicas come first; when every ready one is ejected, healthy
        ones shutting down that still serve (a rolling update's old pods); then
        the ejected ones are tried anyway (a guess beats a certain 503).

        Raises:
            NoReplica: the model has no replica left to try.
        """
        return self._choose(route, request, self._candidates(route, exclude))

    def choose_with_room(
        self,
        route: ModelRoute,
        request: RouteRequest,
        exclude: Collection[Replica],
        bound: int,
    ) -> Replica | None:
        """As `choose`, among the replicas with fewer than `bound` requests in
        flight; None when every one it would choose from has `bound` (the
        request waits: see `queueing`). A replica ejected or shutting down is
        no room while one before it in `choose`'s order is only busy.

        Raises:
            NoReplica: the model has no replica left to try.
        """
        candidates = self._candidates(route, exclude)
        roomy = [r for r in candidates if r.in_flight < bound]
        return self._choose(route, request, roomy, candidates) if roomy else None

    def _candidates(
        self, route: ModelRoute, exclude: Collection[Replica]
    ) -> list[Replica]:
        """The replicas `choose` chooses from, in its order (see there)."""
        candidates = self._catalog.replicas(route, exclude)
        now = self._clock()
        healthy = [r for r in candidates if r.available(now)]
        if not healthy and candidates:
            leaving = self._catalog.terminating(route, exclude)
            healthy = [r for r in leaving if r.available(now)] or candidates
        if not healthy:
            raise NoReplica(
                f"The model `{route.served_name}` has no ready replica; "
                "try again shortly.",
                retry_after_s=NO_REPLICA_RETRY_S,
            )
        return healthy

    def _choose(
        self,
        route: ModelRoute,
        request: RouteRequest,
        replicas: list[Replica],
        pool: list[Replica] | None = None,
    ) -> Replica:
        """The strategy's choice among `replicas`, part of `pool` (the
        replicas it would choose from were none busy): `prefix-aware` keeps
        what it knows of every replica of the pool, not only of those."""
        strategy = self._strategy(route)
        if pool is not None and isinstance(strategy, PrefixAware):
            replica, how = strategy.choose(replicas, request, pool=pool)
        else:
            replica, how = strategy.choose(replicas, request)
        if self._on_decision:
            self._on_decision(route.served_name, route.strategy.value, how)
        return replica

    def learn(self, placement: Placement) -> bool:
        """Records another gateway replica's `prefix-aware` placement in the
        model's strategy, as if this one had made it.

        Returns False, recording nothing, when no model of the document in
        force has that served name and routes prefix-aware, or the replica is
        not one of its replicas here (a pod gone, or not seen yet): the
        gateways' views of the pods differ for a moment after each change.
        """
        route = self._catalog.route_named(placement.model)
        if (
            route is None
            or route.served_name != placement.model
            or route.strategy is not RoutingStrategy.PREFIX_AWARE
        ):
            return False
        strategy = self._strategy(route)
        if not isinstance(strategy, PrefixAware):
            return False
        return strategy.learn(
            placement.url,
            placement.blocks,
            placement.window,
            self._catalog.replicas(route),
        )

    def _strategy(self, route: ModelRoute) -> Strategy:
        """The model's strategy, made at its first request (or placement)."""
        key = (route.served_name, route.strategy.value)
        strategy = self._strategies.get(key)
        if strategy is None:
            placed = None
            if self._on_placed is not None:
                placed = functools.partial(self._placed, route.served_name)
            strategy = self._strategies[key] = make_strategy(
                route.strategy, self._clock, self._load_max_age_s, placed
            )
        return strategy

    def _placed(
        self, model: str, url: str, blocks: list[int], window: Mark | None
    ) -> None:
        if self._on_placed is not None:
            self._on_placed(Placement(model, url, tuple(blocks), window))
