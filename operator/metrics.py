"""The operator's Prometheus metrics: names and labels declared once, here."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from citadel.operator.status import Phase

RECONCILES = "citadel_operator_reconciles_total"
RECONCILE_ERRORS = "citadel_operator_reconcile_errors_total"
RECONCILE_SECONDS = "citadel_operator_reconcile_duration_seconds"
MODELS = "citadel_operator_models"
ROUTE_PUBLISHES = "citadel_operator_route_publishes_total"
DRIFT_REVERTS = "citadel_operator_drift_reverts_total"
BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    """The operator's metrics in their own registry (no process-wide state)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
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
            "Reconcile duration.",
            ["kind"],
            buckets=BUCKETS,
            registry=self.registry,
        )
        self.models = Gauge(
            MODELS, "LLMModels by phase.", ["phase"], registry=self.registry
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
        self._phases: dict[str, Phase] = {}
        for phase in Phase:
            self.models.labels(phase=str(phase)).set(0)

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

    def set_phase(self, key: str, phase: Phase | None) -> None:
        """Records a model's phase (None: the model is gone)."""
        old = self._phases.pop(key, None)
        if old is not None:
            self.models.labels(phase=str(old)).dec()
        if phase is not None:
            self._phases[key] = phase
            self.models.labels(phase=str(phase)).inc()
