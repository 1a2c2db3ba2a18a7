"""The operator's Prometheus metrics: names and labels declared once, here."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from citadel.operator.status import LLMModelStatus, Phase

RECONCILES = "citadel_operator_reconciles_total"
RECONCILE_ERRORS = "citadel_operator_reconcile_errors_total"
RECONCILE_SECONDS = "citadel_operator_reconcile_duration_seconds"
MODELS = "citadel_operator_models"
MODEL_PHASE = "citadel_operator_model_phase"
MODEL_REPLICAS = "citadel_operator_model_replicas"
# The labels of the per-model series. Not `namespace`: Prometheus sets that target
# label to the operator's own namespace, and a scraped `namespace` would be renamed.
MODEL_LABELS = ("model_namespace", "model", "served_name")
REPLICA_STATES = ("desired", "current", "updated", "ready")
ROUTE_PUBLISHES = "citadel_operator_route_publishes_total"
DRIFT_REVERTS = "citadel_operator_drift_reverts_total"
AUTOSCALER_DEMAND = "citadel_operator_autoscaler_demand"
AUTOSCALER_SCALES = "citadel_operator_autoscaler_scales_total"
# The gateways' request states the autoscaler reads (the gateway's own names).
DEMAND_STATES = ("in_flight", "waiting", "queued")
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The operator's metrics in their own registry (no process-wide state).

    Args:
        registry: where they are registered; a new one by default.
        clock: monotonic seconds, for the age of the per-model reports.
        stale_after_s: see ModelSeries.
    """

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        stale_after_s: float | None = None,
    ) -> None:
        self.registry = registry or CollectorRegistry()
        self.reconciles = Counter(
            RECONCILES,
            "Reconciles by kind (full: objects applied; refresh: status only).",
            ["kind", "result"],
            registry=self.registry,
        )
        self.errors = Counter(
            RECONCILE_ERRORS,
            "Failed reconciles by error class (temporary or permanent).",
            ["error"],
            registry=self.registry,
        )
        self.duration = Histogram(
            RECONCILE_SECONDS,
            "Reconcile duration; a full reconcile's two waits for a slot included.",
            ["kind"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.publishes = Counter(
            ROUTE_PUBLISHES,
            "Writes of the routing ConfigMap.",
            ["result"],
            registry=self.registry,
        )
        self.drift = Counter(
            DRIFT_REVERTS,
            "Owned objects put back after a manual change.",
            ["kind"],
            registry=self.registry,
        )
        self.demand = Gauge(
            AUTOSCALER_DEMAND,
            "Requests of each autoscaled LLMModel at the gateways, summed over "
            "those read at the autoscaler's last tick, by state (in_flight, "
            "waiting, queued).",
            ["model_namespace", "model", "state"],
            registry=self.registry,
        )
        self.scales = Counter(
            AUTOSCALER_SCALES,
            "Replica counts the autoscaler wrote, by direction (up, down).",
            ["direction"],
            registry=self.registry,
        )
        self.model_series = ModelSeries(clock, stale_after_s)
        self.registry.register(self.model_series)

    @contextmanager
    def timed(self, kind: str) -> Iterator[None]:
        """Counts and times one reconcile; an exception counts as an error."""
        start = time.perf_counter()
        try:
            yield
        except BaseException:
            self.reconciles.labels(kind=kind, result="error").inc()
            raise
        else:
            self.reconciles.labels(kind=kind, result="ok").inc()
        finally:
            self.duration.labels(kind=kind).observe(time.perf_counter() - start)

    def set_model(
        self, namespace: str, name: str, status: LLMModelStatus | None
    ) -> None:
        """Records a model's phase and replica counts (None: the model is gone)."""
        self.model_series.set(namespace, name, status)

    def touch(self, namespace: str, name: str) -> None:
        """Notes that the model is still being reconciled, whatever the outcome."""
        self.model_series.touch(namespace, name)


@dataclass
class _Reported:
    labels: tuple[str, str, str]
    phase: Phase | None
    replicas: tuple[int, int, int, int]
    seen: float


class ModelSeries(Collector):
    """The per-model series and the counts by phase, built at each scrape from
    what the reconciler last reported.

    A replica that Kopf peering pauses stops reconciling but keeps running; what it
    reported before would stay on its /metrics and keep alerts firing for a model
    that has long recovered. So a model not reconciled for `stale_after_s` (an
    active replica's resync renews every model's report each period) is left out.

    Args:
        clock: monotonic seconds.
        stale_after_s: None keeps every report (no periodic resync to renew them).
    """

    def __init__(self, clock: Callable[[], float], stale_after_s: float | None) -> None:
        self._clock = clock
        self._stale_after = stale_after_s
        self._models: dict[tuple[str, str], _Reported] = {}

    def set(self, namespace: str, name: str, status: LLMModelStatus | None) -> None:
        """Records a model's status (None: the model is gone)."""
        if status is None:
            self._models.pop((namespace, name), None)
            return
        counts = status.replicas
        self._models[(namespace, name)] = _Reported(
            (namespace, name, status.served_name or name),
            status.phase,
            (counts.desired, counts.current, counts.updated, counts.ready),
            self._clock(),
        )

    def touch(self, namespace: str, name: str) -> None:
        """Renews a model's report without changing it."""
        reported = self._models.get((namespace, name))
        if reported is not None:
            reported.seen = self._clock()

    def collect(self) -> Iterable[Metric]:
        """The three families, from the reports that are not stale."""
        now = self._clock()
        fresh = [
            r
            for r in self._models.values()
            if self._stale_after is None or now - r.seen <= self._stale_after
        ]
        by_phase = dict.fromkeys(Phase, 0)
        phases = GaugeMetricFamily(
            MODEL_PHASE,
            "1 for each LLMModel's current phase; the series goes when it changes.",
            labels=[*MODEL_LABELS, "phase"],
        )
        replicas = GaugeMetricFamily(
            MODEL_REPLICAS,
            "Each LLMModel's replica counts from its status, by state (desired, "
            "current, updated, ready).",
            labels=[*MODEL_LABELS, "state"],
        )
        for r in fresh:
            if r.phase is not None:
                by_phase[r.phase] += 1
                phases.add_metric([*r.labels, str(r.phase)], 1)
            for state, value in zip(REPLICA_STATES, r.replicas, strict=True):
                replicas.add_metric([*r.labels, state], value)
        models = GaugeMetricFamily(MODELS, "LLMModels by phase.", labels=["phase"])
        for phase, count in by_phase.items():
            models.add_metric([str(phase)], count)
        return [models, phases, replicas]
