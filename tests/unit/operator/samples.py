"""Sample LLMModels and cluster objects for the operator's unit tests."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from citadel.operator.kube.resources import Resource
from citadel.operator.model import LLMModel

NOW = "2026-05-01T12:00:00Z"


def model_body(
    name: str = "mixtral",
    namespace: str = "llm",
    *,
    generation: int = 1,
    status: dict[str, Any] | None = None,
    created: str = "2026-01-01T00:00:00Z",
    **spec: Any,
) -> dict[str, Any]:
    """An LLMModel as the API server returns it."""
    body: dict[str, Any] = {
        "apiVersion": "citadel.ai/v1alpha1",
        "kind": "LLMModel",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "generation": generation,
            "creationTimestamp": created,
        },
        "spec": {"model": "mistralai/Mixtral-8x7B-Instruct-v0.1", **spec},
    }
    if status is not None:
        body["status"] = status
    return body


def make_model(name: str = "mixtral", **spec: Any) -> LLMModel:
    """A parsed LLMModel with `spec` over a minimal one."""
    return LLMModel.from_body(model_body(name, **spec))


def node(name: str, gpus: int = 0, **labels: str) -> dict[str, Any]:
    """A Node with `gpus` allocatable nvidia.com/gpu."""
    allocatable = {"cpu": "32"}
    if gpus:
        allocatable["nvidia.com/gpu"] = str(gpus)
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {"kubernetes.io/hostname": name, **labels},
        },
        "status": {"allocatable": allocatable},
    }


NODES = [
    node("hx-llm-server-01", 4, **{"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}),
    node("hx-llm-server-02", 8, **{"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}),
    node("hx-cpu-01"),
]


def pod(
    name: str,
    *,
    node_name: str | None = "hx-llm-server-01",
    ready: bool = True,
    unschedulable: str | None = None,
    waiting: str | None = None,
    model: str = "mixtral",
    gates: Sequence[str] = (),
) -> dict[str, Any]:
    """A pod of `model` in one of the states the status code distinguishes;
    with `gates`, held by those scheduling gates (as Kueue's admission does)."""
    conditions: list[dict[str, Any]] = []
    if gates:
        node_name = None
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "SchedulingGated",
                "message": "Scheduling is blocked due to non-empty scheduling gates",
            }
        )
    elif unschedulable is not None:
        conditions.append(
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": unschedulable,
            }
        )
    else:
        conditions.append({"type": "PodScheduled", "status": "True"})
        conditions.append({"type": "Ready", "status": "True" if ready else "False"})
    status: dict[str, Any] = {
        "phase": "Running" if node_name else "Pending",
        "conditions": conditions,
    }
    if waiting is not None:
        status["containerStatuses"] = [
            {
                "name": "vllm",
                "state": {"waiting": {"reason": waiting, "message": "back-off"}},
                "lastState": {"terminated": {"reason": "Error"}},
            }
        ]
    spec: dict[str, Any] = {"nodeName": node_name} if node_name else {}
    if gates:
        spec["schedulingGates"] = [{"name": gate} for gate in gates]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": "llm",
            "labels": {
                "app.kubernetes.io/name": "vllm",
                "citadel.ai/model": model,
                "app.kubernetes.io/managed-by": "citadel-operator",
            },
        },
        "spec": spec,
        "status": status,
    }


def deployment(
    replicas: int = 1,
    ready: int = 1,
    updated: int | None = None,
    *,
    generation: int = 1,
    observed: int = 1,
    deadline_exceeded: bool = False,
) -> dict[str, Any]:
    """A Deployment's metadata and status."""
    conditions = []
    if deadline_exceeded:
        conditions.append(
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "mixtral-1" has timed out progressing.',
            }
        )
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "mixtral", "namespace": "llm", "generation": generation},
        "status": {
            "observedGeneration": observed,
            "replicas": replicas,
            "updatedReplicas": replicas if updated is None else updated,
            "readyReplicas": ready,
            "conditions": conditions,
        },
    }


def foreign(resource: Resource, name: str = "mixtral") -> dict[str, Any]:
    """An object in `llm` that someone else made: their labels, no owner
    reference (a Service selecting their own pods, say)."""
    spec: dict[str, Any] = {"selector": {"matchLabels": {"app": "payments-api"}}}
    if resource.kind == "Service":
        spec = {
            "selector": {"app": "payments-api"},
            "ports": [{"name": "https", "port": 443}],
        }
    return {
        "apiVersion": resource.api_version,
        "kind": resource.kind,
        "metadata": {"name": name, "namespace": "llm", "labels": {"team": "payments"}},
        "spec": spec,
    }
