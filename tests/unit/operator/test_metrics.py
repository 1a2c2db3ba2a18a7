"""The operator's per-model series: one phase at a time, gone with the model."""

from __future__ import annotations

import pytest

from citadel.operator.metrics import Metrics
from citadel.operator.status import LLMModelStatus, Phase, ReplicaCounts

pytestmark = pytest.mark.unit

PHASE = "citadel_operator_model_phase"
REPLICAS = "citadel_operator_model_replicas"


def _status(phase: Phase, ready: int = 0, served: str | None = None) -> LLMModelStatus:
    return LLMModelStatus(
        phase=phase,
        replicas=ReplicaCounts(desired=2, current=2, updated=2, ready=ready),
        served_name=served,
    )


def _series(metrics: Metrics, name: str) -> dict[tuple[str, ...], float]:
    """Every sample of `name` by its label values, in label order."""
    return {
        tuple(sample.labels.values()): sample.value
        for family in metrics.registry.collect()
        if family.name == name
        for sample in family.samples
    }


def test_a_model_has_one_phase_series_at_a_time() -> None:
    metrics = Metrics()
    metrics.set_model("llm", "chat", _status(Phase.PROGRESSING))
    metrics.set_model("llm", "chat", _status(Phase.READY, ready=2))
    assert _series(metrics, PHASE) == {("llm", "chat", "chat", "Ready"): 1}
    assert _series(metrics, REPLICAS) == {
        ("llm", "chat", "chat", "desired"): 2,
        ("llm", "chat", "chat", "current"): 2,
        ("llm", "chat", "chat", "updated"): 2,
        ("llm", "chat", "chat", "ready"): 2,
    }


def test_a_new_served_name_replaces_the_series_and_forgetting_removes_them() -> None:
    metrics = Metrics()
    metrics.set_model("llm", "chat", _status(Phase.READY, ready=2))
    metrics.set_model("other", "chat", _status(Phase.PENDING))
    metrics.set_model("llm", "chat", _status(Phase.READY, ready=1, served="smol"))
    assert _series(metrics, PHASE) == {
        ("llm", "chat", "smol", "Ready"): 1,
        ("other", "chat", "chat", "Pending"): 1,
    }
    assert {labels[:3] for labels in _series(metrics, REPLICAS)} == {
        ("llm", "chat", "smol"),
        ("other", "chat", "chat"),
    }
    assert _series(metrics, REPLICAS)[("llm", "chat", "smol", "ready")] == 1
    metrics.set_model("llm", "chat", None)
    assert _series(metrics, PHASE) == {("other", "chat", "chat", "Pending"): 1}
    assert {labels[:2] for labels in _series(metrics, REPLICAS)} == {("other", "chat")}
    assert (
        metrics.registry.get_sample_value("citadel_operator_models", {"phase": "Ready"})
        == 0
    )


def test_a_status_without_a_phase_keeps_only_the_replica_counts() -> None:
    metrics = Metrics()
    metrics.set_model("llm", "chat", _status(Phase.PENDING))
    metrics.set_model("llm", "chat", LLMModelStatus())
    assert _series(metrics, PHASE) == {}
    assert _series(metrics, REPLICAS)[("llm", "chat", "chat", "desired")] == 0


def test_a_paused_replica_stops_reporting_after_the_staleness_limit() -> None:
    now = [0.0]
    metrics = Metrics(clock=lambda: now[0], stale_after_s=360.0)
    metrics.set_model("llm", "chat", _status(Phase.PENDING))
    metrics.set_model("llm", "kept", _status(Phase.READY, ready=2))
    now[0] = 300.0
    metrics.touch("llm", "kept")  # its resync ran; chat's did not
    now[0] = 400.0
    assert _series(metrics, PHASE) == {("llm", "kept", "kept", "Ready"): 1}
    assert {labels[1] for labels in _series(metrics, REPLICAS)} == {"kept"}
    counts = _series(metrics, "citadel_operator_models")
    assert counts[("Ready",)] == 1 and counts[("Pending",)] == 0


def test_without_a_limit_reports_never_go_stale() -> None:
    now = [0.0]
    metrics = Metrics(clock=lambda: now[0])
    metrics.set_model("llm", "chat", _status(Phase.PENDING))
    now[0] = 1e9
    assert _series(metrics, PHASE) == {("llm", "chat", "chat", "Pending"): 1}
