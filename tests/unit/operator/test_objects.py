"""Service, cache claim, PodDisruptionBudget and PodMonitor builders."""

from __future__ import annotations

import re

import pytest

from citadel.operator import names
from citadel.operator.builders.objects import (
    build_cache_claim,
    build_pdb,
    build_pod_monitor,
    build_service,
)

from .samples import make_model

pytestmark = pytest.mark.unit


def test_service_exposes_port_8000_named_http() -> None:
    service = build_service(make_model())
    assert service["metadata"]["name"] == "mixtral"
    assert service["spec"]["ports"] == [
        {
            "name": "http",
            "port": 8000,
            "targetPort": "http",
            "protocol": "TCP",
            "appProtocol": "http",
        }
    ]
    assert service["spec"]["selector"]["citadel.ai/model"] == "mixtral"


def test_no_cache_no_claim() -> None:
    assert build_cache_claim(make_model()) is None


def test_cache_claim_is_kept_by_default() -> None:
    claim = build_cache_claim(
        make_model(cache={"size": "200Gi", "storageClassName": "fast"})
    )
    assert claim is not None
    assert claim["metadata"]["name"] == "mixtral-cache"
    assert "ownerReferences" not in claim["metadata"]
    # Marks the claim as made by the operator, for this model unless told.
    annotations = claim["metadata"]["annotations"]
    assert annotations == {"citadel.ai/created-for": "uid-mixtral"}
    assert claim["spec"] == {
        "accessModes": ["ReadWriteOnce"],
        "resources": {"requests": {"storage": "200Gi"}},
        "storageClassName": "fast",
    }


def test_cache_claim_is_owned_when_it_should_go_with_the_model() -> None:
    claim = build_cache_claim(
        make_model(cache={"size": "1Gi", "deletePolicy": "Delete"})
    )
    assert claim is not None
    assert claim["metadata"]["ownerReferences"][0]["kind"] == "LLMModel"
    assert "storageClassName" not in claim["spec"]


def test_cache_claim_keeps_the_model_it_was_created_for() -> None:
    model = make_model(cache={"size": "1Gi"})
    claim = build_cache_claim(model, "uid-earlier", "uid-claim")
    assert claim is not None
    annotations = claim["metadata"]["annotations"]
    assert annotations == {
        "citadel.ai/created-for": "uid-earlier",
        "citadel.ai/created-as": "uid-claim",
    }


@pytest.mark.parametrize(("replicas", "wanted"), [(0, False), (1, False), (2, True)])
def test_pdb_only_with_several_replicas(replicas: int, wanted: bool) -> None:
    pdb = build_pdb(make_model(replicas=replicas))
    assert (pdb is not None) is wanted
    if pdb is not None:
        assert pdb["spec"]["maxUnavailable"] == 1
        assert pdb["spec"]["unhealthyPodEvictionPolicy"] == "AlwaysAllow"


def test_no_pdb_when_every_replica_is_pinned_to_one_node() -> None:
    """Draining the node evicts one replica, whose replacement can only wait for
    that node: a budget would refuse the second eviction for ever."""
    pinned = make_model(replicas=2, placement={"nodeName": "hx-llm-server-01"})
    assert build_pdb(pinned) is None
    host = {"nodeSelector": {"kubernetes.io/hostname": "hx-llm-server-01"}}
    assert build_pdb(make_model(replicas=2, placement=host)) is None
    pool = {"gpuProduct": "NVIDIA-H100-80GB-HBM3"}
    assert build_pdb(make_model(replicas=2, placement=pool)) is not None


def _required(*terms: dict[str, object]) -> dict[str, object]:
    return {
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": list(terms)
                }
            }
        }
    }


def _on(key: str, *values: str, field: str = "matchExpressions") -> dict[str, object]:
    return {field: [{"key": key, "operator": "In", "values": list(values)}]}


@pytest.mark.parametrize(
    ("placement", "one_node"),
    [
        # Every term names the same one node: the label, or the node's name.
        (_required(_on("kubernetes.io/hostname", "gpu-1")), True),
        (_required(_on("metadata.name", "gpu-1", field="matchFields")), True),
        (
            _required(
                _on("kubernetes.io/hostname", "gpu-1"),
                _on("metadata.name", "gpu-1", field="matchFields"),
            ),
            True,
        ),
        # Two nodes, in one term or across terms (ORed).
        (_required(_on("kubernetes.io/hostname", "gpu-1", "gpu-2")), False),
        (
            _required(
                _on("kubernetes.io/hostname", "gpu-1"),
                _on("kubernetes.io/hostname", "gpu-2"),
            ),
            False,
        ),
        # A term that names no node may allow any.
        (
            _required(
                _on("kubernetes.io/hostname", "gpu-1"),
                _on("nvidia.com/gpu.product", "A100"),
            ),
            False,
        ),
        # Requirements of one term are ANDed: two names narrowed to one.
        (
            _required(
                {
                    "matchExpressions": [
                        {
                            "key": "kubernetes.io/hostname",
                            "operator": "In",
                            "values": ["gpu-1", "gpu-2"],
                        },
                        {
                            "key": "kubernetes.io/hostname",
                            "operator": "In",
                            "values": ["gpu-2"],
                        },
                    ]
                }
            ),
            True,
        ),
        ({"affinity": {"podAntiAffinity": {}}}, False),
    ],
)
def test_no_pdb_when_a_required_affinity_pins_every_replica_to_one_node(
    placement: dict[str, object], one_node: bool
) -> None:
    model = make_model(replicas=2, placement=placement)
    assert model.spec.placement.one_node is one_node
    assert (build_pdb(model) is None) is one_node


def test_pod_monitor_scrapes_metrics() -> None:
    monitor = build_pod_monitor(make_model())
    assert monitor["spec"]["podMetricsEndpoints"][0]["port"] == "http"
    assert monitor["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_pod_monitor_labels_every_series_with_the_model() -> None:
    """The chart's model alerts select Citadel's pods by the target label the
    Prometheus Operator makes of podTargetLabels (`.` and `/` become `_`)."""
    monitor = build_pod_monitor(make_model())
    assert monitor["spec"]["podTargetLabels"] == [names.LABEL_MODEL]
    as_target = re.sub(r"[^a-zA-Z0-9_]", "_", names.LABEL_MODEL)
    assert as_target == names.MODEL_TARGET_LABEL == "citadel_ai_model"
    assert monitor["spec"]["selector"]["matchLabels"][names.LABEL_MODEL] == "mixtral"


def test_pod_monitor_carries_the_labels_prometheus_selects() -> None:
    extra = {"release": "prom", "citadel.ai/model": "not-this"}
    labels = build_pod_monitor(make_model(), extra)["metadata"]["labels"]
    assert labels["release"] == "prom"
    assert labels["citadel.ai/model"] == "mixtral"  # its own labels win
