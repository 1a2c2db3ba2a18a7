"""The API server refuses bad LLMModels at once, naming the field to fix."""

from __future__ import annotations

from typing import Any

import pytest
from harness.kube import KubeCluster

from .conftest import llmmodel

pytestmark = pytest.mark.e2e

CASES: list[tuple[str, dict[str, Any], str, str]] = [
    ("missing-model", {"model": None}, "bad", "spec.model: Required value"),
    ("model-source", {"model": "ftp://x/y"}, "bad", "spec.model"),
    ("negative-replicas", {"replicas": -1}, "bad", "spec.replicas"),
    ("too-many-gpus", {"resources": {"gpus": 65}}, "bad", "spec.resources.gpus"),
    (
        "gpu-memory-zero",
        {"engine": {"gpuMemoryUtilization": 0}},
        "bad",
        "spec.engine.gpuMemoryUtilization",
    ),
    (
        "gpu-memory-above-one",
        {"engine": {"gpuMemoryUtilization": 1.2}},
        "bad",
        "spec.engine.gpuMemoryUtilization",
    ),
    (
        "max-model-len",
        {"engine": {"maxModelLen": 16}},
        "bad",
        "spec.engine.maxModelLen",
    ),
    ("dtype", {"engine": {"dtype": "int4"}}, "bad", "spec.engine.dtype"),
    (
        "strategy",
        {"routing": {"strategy": "random"}},
        "bad",
        "spec.routing.strategy",
    ),
    (
        "node-name-and-selector",
        {"placement": {"nodeName": "hx-llm-server-01", "nodeSelector": {"a": "b"}}},
        "bad",
        "spec.placement: Invalid value",
    ),
    (
        "managed-extra-arg",
        {"engine": {"extraArgs": ["--port=9000"]}},
        "bad",
        "spec.engine.extraArgs",
    ),
    (
        "managed-extra-arg-short",
        {"engine": {"extraArgs": ["--enforce-eager", "-tp=1"]}},
        "bad",
        "spec.engine.extraArgs",
    ),
    (
        "managed-extra-arg-underscores",
        {"engine": {"extraArgs": ["--served_model_name=x"]}},
        "bad",
        "spec.engine.extraArgs",
    ),
    ("served-name", {"servedName": "has space"}, "bad", "spec.servedName"),
    (
        "alias-repeats-name",
        {"servedName": "a", "aliases": ["a"]},
        "bad",
        "spec.aliases",
    ),
    ("cache-size", {"cache": {"size": "lots"}}, "bad", "spec.cache.size"),
    (
        "no-surge-no-unavailable",
        {"rollout": {"maxSurge": 0, "maxUnavailable": 0}},
        "bad",
        "spec.rollout",
    ),
    ("name-too-long", {}, "m" * 53, "metadata.name"),
    ("name-uppercase", {}, "Mixtral", "metadata.name"),
]


def _apply(
    cluster: KubeCluster, namespace: str, name: str, spec: dict[str, Any]
) -> str:
    """kubectl apply; returns its output, or its error when refused."""
    return cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input_text=llmmodel(name, **spec),
        check=False,
    )


@pytest.mark.parametrize(
    ("spec", "name", "field"),
    [c[1:] for c in CASES],
    ids=[c[0] for c in CASES],
)
def test_invalid_manifest_is_refused_naming_the_field(
    cluster: KubeCluster,
    namespace: str,
    crds: None,
    spec: dict[str, Any],
    name: str,
    field: str,
) -> None:
    out = _apply(cluster, namespace, name, spec)
    assert "is invalid" in out or "Invalid value" in out, out
    assert field in out, out
    assert cluster.kubectl("get", "llmmodels", "-n", namespace, "-o", "name") == ""


def test_immutable_cache_fields(
    cluster: KubeCluster, namespace: str, crds: None
) -> None:
    first = {"cache": {"size": "10Gi", "storageClassName": "fast"}}
    assert "created" in _apply(cluster, namespace, "m", first)
    changed = {"cache": {"size": "5Gi", "storageClassName": "slow"}}
    out = _apply(cluster, namespace, "m", changed)
    assert "cache.storageClassName is immutable" in out, out
    assert "cache.size can only grow" in out, out
    cluster.kubectl("delete", "llmmodel", "m", "-n", namespace)
