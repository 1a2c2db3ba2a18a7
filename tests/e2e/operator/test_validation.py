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
        "parallelism-extra-arg",
        {"engine": {"extraArgs": ["--pipeline-parallel-size=2"]}},
        "bad",
        "spec.engine.extraArgs",
    ),
    (
        # A YAML block scalar's final newline: RE2's `.` stops at it.
        "parallelism-extra-arg-newline",
        {"engine": {"extraArgs": ["--pipeline-parallel-size=4\n"]}},
        "bad",
        "spec.engine.extraArgs",
    ),
    (
        "listener-extra-arg",
        {"engine": {"extraArgs": ["--uds", "/tmp/vllm.sock"]}},
        "bad",
        "spec.engine.extraArgs",
    ),
    (
        "managed-extra-arg-underscores",
        {"engine": {"extraArgs": ["--served_model_name=x"]}},
        "bad",
        "spec.engine.extraArgs",
    ),
    (
        "api-key-extra-arg",
        {"engine": {"extraArgs": ["--api-key", "secret"]}},
        "bad",
        "spec.engine.extraArgs",
    ),
    (
        "config-file-extra-arg",
        {"engine": {"extraArgs": ["--config", "/model-source/vllm.yaml"]}},
        "bad",
        "spec.engine.extraArgs",
    ),
    (
        "api-key-env",
        {"engine": {"env": [{"name": "VLLM_API_KEY", "value": "secret"}]}},
        "bad",
        "spec.engine.env[0]",
    ),
    (
        # vLLM's parser moves a dotted flag after the operator's own.
        "managed-extra-arg-dotted",
        {"engine": {"extraArgs": ["--served-model.x=y"]}},
        "bad",
        "spec.engine.extraArgs",
    ),
    (
        # The parser would take the operator's --model=... as its value.
        "dotted-extra-arg-last",
        {"engine": {"extraArgs": ["--hf-overrides.x"]}},
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
    (
        "affinity-terms-as-a-map",
        {
            "placement": {
                "affinity": {
                    "nodeAffinity": {
                        "requiredDuringSchedulingIgnoredDuringExecution": {
                            "nodeSelectorTerms": {
                                "matchExpressions": [
                                    {"key": "a", "operator": "In", "values": ["b"]}
                                ]
                            }
                        }
                    }
                }
            }
        },
        "bad",
        "spec.placement.affinity.nodeAffinity."
        "requiredDuringSchedulingIgnoredDuringExecution.nodeSelectorTerms",
    ),
    (
        "toleration-without-key",
        {"placement": {"tolerations": [{"effect": "NoSchedule"}]}},
        "bad",
        "spec.placement.tolerations[0].operator",
    ),
    (
        "toleration-exists-with-value",
        {
            "placement": {
                "tolerations": [{"key": "a", "operator": "Exists", "value": "b"}]
            }
        },
        "bad",
        "spec.placement.tolerations[0].value",
    ),
    (
        "toleration-seconds-without-no-execute",
        {
            "placement": {
                "tolerations": [
                    {
                        "key": "a",
                        "operator": "Exists",
                        "effect": "NoSchedule",
                        "tolerationSeconds": 60,
                    }
                ]
            }
        },
        "bad",
        "spec.placement.tolerations[0].tolerationSeconds",
    ),
    (
        "toleration-key",
        {"placement": {"tolerations": [{"key": "a b", "operator": "Exists"}]}},
        "bad",
        "spec.placement.tolerations[0].key",
    ),
    (
        "toleration-value",
        {"placement": {"tolerations": [{"key": "a", "value": "b c"}]}},
        "bad",
        "spec.placement.tolerations[0].value",
    ),
    (
        "node-selector-key",
        {"placement": {"nodeSelector": {"gpu type": "a100"}}},
        "bad",
        "spec.placement.nodeSelector",
    ),
    (
        "pod-label-key",
        {"pod": {"labels": {"team name": "ml"}}},
        "bad",
        "spec.pod.labels",
    ),
    (
        "pod-annotation-key",
        {"pod": {"annotations": {"my annotation": "x"}}},
        "bad",
        "spec.pod.annotations",
    ),
    (
        "env-twice",
        {"engine": {"env": [{"name": "A", "value": "1"}, {"name": "A", "value": "2"}]}},
        "bad",
        "spec.engine.env[1]",
    ),
    (
        "env-number",
        {"engine": {"env": [{"name": "A", "value": 1}]}},
        "bad",
        "spec.engine.env[0].value",
    ),
    (
        "env-value-and-value-from",
        {
            "engine": {
                "env": [
                    {
                        "name": "A",
                        "value": "1",
                        "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
                    }
                ]
            }
        },
        "bad",
        "spec.engine.env[0]",
    ),
    ("negative-cpu", {"resources": {"cpu": -4}}, "bad", "spec.resources.cpu"),
    (
        "negative-memory",
        {"resources": {"memory": "-90Gi"}},
        "bad",
        "spec.resources.memory",
    ),
    ("negative-shm", {"engine": {"shmSize": "-1Gi"}}, "bad", "spec.engine.shmSize"),
    ("zero-cache", {"cache": {"size": "0"}}, "bad", "spec.cache.size"),
    (
        "image-uppercase-repository",
        {"engine": {"image": "vllm/VLLM-openai:v1"}},
        "bad",
        "spec.engine.image",
    ),
    (
        "read-write-once-pod-two-replicas",
        {"replicas": 2, "cache": {"size": "1Gi", "accessMode": "ReadWriteOncePod"}},
        "bad",
        "spec.cache.accessMode",
    ),
    (
        "read-write-once-pod-surge",
        {
            "rollout": {"maxSurge": 1, "maxUnavailable": 0},
            "cache": {"size": "1Gi", "accessMode": "ReadWriteOncePod"},
        },
        "bad",
        "spec.cache.accessMode",
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
    # A value of the wrong type for the schema, or (kubectl validates strictly)
    # a map where a list of objects belongs: its keys are unknown fields.
    refusals = ("is invalid", "Invalid value", "strict decoding error: unknown field")
    assert any(refusal in out for refusal in refusals), out
    assert field in out, out
    assert cluster.kubectl("get", "llmmodels", "-n", namespace, "-o", "name") == ""


def test_legal_edge_cases_are_accepted(
    cluster: KubeCluster, namespace: str, crds: None
) -> None:
    spec = {
        "replicas": 1,
        "placement": {
            "nodeSelector": {"example.com/gpu-type": "a100"},
            "tolerations": [
                {"operator": "Exists"},
                {"key": "example.com/t", "value": "Big_Value.1"},
                {
                    "key": "dedicated",
                    "operator": "Exists",
                    "effect": "NoExecute",
                    "tolerationSeconds": 60,
                },
            ],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "a", "operator": "Exists"}]}
                        ]
                    }
                }
            },
        },
        "engine": {
            "image": "registry.example.com/ml/vllm-openai:v0.8.5-CUDA12",
            # Flags near the refused ones, which the rules must let through:
            # a dotted flag with its value, next or after '=', a prefix of
            # --config that is another flag, --api-server-count.
            "extraArgs": [
                "--enable-prefix-caching",
                "--hf-overrides.rope_scaling.factor",
                "2",
                "--compilation-config.level=3",
                "--config-format=hf",
                "--api-server-count=1",
                "--max-model-len",
                "4096",
            ],
            "env": [
                {"name": "A", "value": "1"},
                {
                    "name": "B",
                    "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}},
                },
            ],
        },
        "cache": {"size": "1Gi", "accessMode": "ReadWriteOncePod"},
        "pod": {"labels": {"team": "ml"}, "annotations": {"Example.com/Note": "x"}},
    }
    out = cluster.kubectl(
        "apply",
        "--dry-run=server",
        "-n",
        namespace,
        "-f",
        "-",
        input_text=llmmodel("edge", **spec),
        check=False,
    )
    assert "created (server dry run)" in out, out


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
