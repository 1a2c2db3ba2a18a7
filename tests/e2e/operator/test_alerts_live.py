"""The chart's model alerts, evaluated by a real Prometheus that scrapes the real
operator while it reconciles models on the cluster: each alert names its model, and
goes when the model does."""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import prometheus

from .conftest import Kube, OperatorProcess, llmmodel

pytestmark = pytest.mark.e2e

RELEASE_NAMESPACE = "citadel-system"
# Short waits, so that the alerts fire within the test.
QUICK = {
    "monitoring.rules.modelNotReadyFor": "5s",
    "monitoring.rules.replicasUnavailableFor": "5s",
}
Seen = set[tuple[str, str, str]]


def _model(name: str, node: str, gpus: int, replicas: int = 1) -> str:
    return llmmodel(
        name, replicas=replicas, resources={"gpus": gpus}, placement={"nodeName": node}
    )


def _alerts(url: str, namespace: str) -> Seen:
    """(alert, model, state) of every alert about a model in `namespace`."""
    return {
        (a["labels"]["alertname"], a["labels"]["model"], a["state"])
        for a in prometheus.api(url, "alerts")["alerts"]
        if a["labels"].get("model_namespace") == namespace
    }


def test_model_alerts_name_the_model(
    kube: Kube, operator: OperatorProcess, tmp_path: Path
) -> None:
    if prometheus.binary() is None:
        pytest.skip("no prometheus: install Debian's `prometheus` package")
    groups = [
        g
        for g in prometheus.chart_rules(RELEASE_NAMESPACE, QUICK)["groups"]
        if g["name"] == "citadel.operator"
    ]
    scrape = [
        {
            "job_name": "citadel-operator-metrics",
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{operator.metrics_port}"],
                    "labels": {"namespace": RELEASE_NAMESPACE, "pod": "operator-1"},
                }
            ],
        }
    ]
    # None ready: 16 GPUs on a 4-GPU node. Some ready: one of two replicas of 3
    # GPUs fits there. All ready: one GPU on the other node.
    kube.apply(_model("huge", "hx-llm-server-01", 16))
    kube.apply(_model("partial", "hx-llm-server-01", 3, replicas=2))
    kube.apply(_model("fine", "hx-llm-server-02", 1))
    kube.wait_phase("fine", "Ready")
    kube.wait_phase("partial", "Degraded")
    with prometheus.running(tmp_path, scrape, groups) as url:

        def both_firing() -> Seen | None:
            seen = _alerts(url, kube.namespace)
            wanted = {
                ("CitadelModelNotReady", "huge", "firing"),
                ("CitadelModelReplicasUnavailable", "partial", "firing"),
            }
            return seen if wanted <= seen else None

        seen = kube.wait("the replica alerts firing", both_firing, timeout=90)
        # NotReady and ReplicasUnavailable exclude each other; a model that
        # needs a person (Failed, Degraded) is pending its 5 minutes.
        assert {(a, m) for a, m, _ in seen} == {
            ("CitadelModelNotReady", "huge"),
            ("CitadelModelReplicasUnavailable", "partial"),
            ("CitadelModelFailed", "huge"),
            ("CitadelModelFailed", "partial"),
        }, seen
        assert ("CitadelModelFailed", "huge", "pending") in seen

        kube.delete_model("huge")
        kube.delete_model("partial")
        kube.wait(
            "the deleted models' alerts gone",
            lambda: not _alerts(url, kube.namespace),
            timeout=60,
        )
    kube.delete_model("fine")
