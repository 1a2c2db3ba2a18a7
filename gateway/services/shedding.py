"""Load shedding: a model's `sheddable` requests are refused while every one of
its replicas is full, so that its `standard` ones keep the room there is.

What counts as full is what vLLM's own `/metrics` say (read by the
`MetricsScraper`): a replica with more than `queue_depth` requests waiting for a
place in its batch (`vllm:num_requests_waiting`) or more than `kv_cache_usage`
of its KV cache in use (`vllm:kv_cache_usage_perc`), the signs of a replica
whose every new request waits for others to finish. The Gateway API Inference
Extension's saturation detector reads the same two figures against the same
bounds (a pod has room while at most 5 requests wait and at most 80% of its
cache is used).

A replica read too long ago, or never, is not taken for full: without a recent
report nothing is shed, as the limits admit requests unchecked when their store
is unreachable (the Inference Extension takes a stale pod for one without room:
there a scraper that stops sheds every sheddable request). Replicas are read
only for the models that need it (`kv-aware` routing, or a sheddable request
lately): the first sheddable request of a model no one watched finds no report
and passes, and the model's replicas are read from the next scrape on, for
`WATCH_S` after its last sheddable request.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from citadel.gateway.routes import ModelRoute
from citadel.gateway.services.auth import Priority
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.replicas import Replica

WATCH_S = 300.0
"""How long a model's replicas are read after its last sheddable request."""

FRESH_PERIODS = 2
"""Scrape periods within which a replica's report counts for shedding: a
replica full 10 s ago (the five periods `kv-aware` trusts a report) may have
room now, and a sheddable request refused for an old report is refused for
nothing."""

PRIORITY_HEADER = "x-citadel-priority"
"""The request header that asks for a lower priority than the key's."""


@dataclass(frozen=True)
class SheddingSettings:
    """When a replica counts as full (see the module's docstring).

    Attributes:
        queue_depth: the most requests waiting at a replica that still has
            room (0: a replica is full once one request waits).
        kv_cache_usage: the largest fraction of its KV cache in use at which
            a replica still has room.
        scrape_period_s: how often replicas' `/metrics` are read: a refused
            request is told to come back after one period (`Retry-After`),
            when the next read may find room.
    """

    queue_depth: int = 5
    kv_cache_usage: float = 0.8
    scrape_period_s: float = 2.0

    @property
    def max_age_s(self) -> float:
        """How old a replica's report may be and still count."""
        return FRESH_PERIODS * self.scrape_period_s


def priority_of(key_priority: Priority, asked: Sequence[str]) -> Priority | None:
    """The priority a request is served at: the key's, or the lower one its
    `x-citadel-priority` headers ask for (a header never raises it: a
    sheddable key's request asking `standard` stays sheddable).

    Args:
        key_priority: the key's.
        asked: every value of the header the request carries (a repeated
            header, or one value listing several with commas, as HTTP reads
            them alike): the lowest counts, whatever the order, on every
            door. Otherwise a proxy in front that adds `sheddable` to a batch
            job's requests is undone by a client that sends `standard` first.

    Returns:
        None when a value names no priority (the caller refuses it).
    """
    if not asked:  # most requests: no set built for them
        return key_priority
    found = {key_priority}
    for value in asked:
        for part in value.split(","):
            try:
                found.add(Priority(part.strip().lower()))
            except ValueError:
                return None
    return Priority.SHEDDABLE if Priority.SHEDDABLE in found else Priority.STANDARD


class LoadShedder:
    """Decides whether a model is saturated, and tells the scraper which
    models' replicas to read for it.

    Args:
        catalog: the models and their replicas.
        settings: when a replica counts as full.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        catalog: Catalog,
        settings: SheddingSettings,
        clock: Callable[[], float],
    ) -> None:
        self._catalog = catalog
        self._settings = settings
        self._clock = clock
        self._asked: dict[tuple[str, str], float] = {}
        """When each model last had a sheddable request."""

    def watched(self) -> set[tuple[str, str]]:
        """The models (namespace, name) whose replicas are to be read: those
        with a sheddable request in the last `WATCH_S`."""
        since = self._clock() - WATCH_S
        for key in [k for k, at in self._asked.items() if at < since]:
            del self._asked[key]
        return set(self._asked)

    def saturated(self, route: ModelRoute) -> bool:
        """Whether every ready replica of the model that is not ejected is
        full, by a recent report each; notes the model as one to watch. False
        for a model without a ready replica (none, or only some shutting down
        that still serve: it is waking from zero or going to it, and the
        request goes on to be held, or refused, as any other)."""
        now = self._clock()
        self._asked[(route.namespace, route.name)] = now
        if not self._catalog.has_ready(route):
            return False
        replicas = [r for r in self._catalog.replicas(route) if r.available(now)]
        return bool(replicas) and all(self._full(r, now) for r in replicas)

    def _full(self, replica: Replica, now: float) -> bool:
        report = replica.load
        if report.stale(now, self._settings.max_age_s):
            return False
        waiting, usage = report.waiting, report.kv_cache_usage
        return (waiting is not None and waiting > self._settings.queue_depth) or (
            usage is not None and usage > self._settings.kv_cache_usage
        )
