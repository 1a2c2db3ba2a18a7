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


SQL = {"name": "sql", "source": "org/sql-lora"}
NAME_MESSAGE = "an adapter's name must differ from servedName and from every alias"
LORA_FLAGS = "the operator sets them from spec.adapters"
LORA_LIMITS = "engine.maxLoraRank and engine.maxLoras apply to LoRA adapters only"
FALLBACK_MESSAGE = (
    "spec.routing.fallbacks: each fallback must name another model, not this "
    "model's servedName, an alias or an adapter"
)
SPLIT_MESSAGE = (
    "spec.routing.split: each target must name another model, not this "
    "model's servedName, an alias or an adapter"
)
SPLIT_WEIGHTS_MESSAGE = "spec.routing.split: the weights add up to more than 100"

# Refused naming the field, and with the message saying what to fix (the rules'
# own, or the API server's where it names the value): LoRA adapters, and a
# pvc:// path that would leave its claim.
MESSAGE_CASES: list[tuple[str, dict[str, Any], str, str, str]] = [
    (
        "model-leaves-its-claim",
        {"model": "pvc://weights/../cache/llama"},
        "bad",
        "spec.model",
        "model: a pvc:// source's path may not hold a `..` segment",
    ),
    (
        "adapter-leaves-its-claim",
        {"adapters": [{"name": "sql", "source": "pvc://adapters/../other/sql"}]},
        "bad",
        "spec.adapters[0].source",
        "a pvc:// source's path may not hold a `..` segment",
    ),
    (
        "adapter-from-s3",
        {"adapters": [{"name": "sql", "source": "s3://bucket/sql"}]},
        "bad",
        "spec.adapters[0].source",
        "source cannot be s3://: vLLM loads an adapter from a directory or a "
        "Hugging Face repo only",
    ),
    (
        "adapter-source",
        {"adapters": [{"name": "sql", "source": "ftp://x/y"}]},
        "bad",
        "spec.adapters[0].source",
        "should match",
    ),
    (
        "adapter-without-source",
        {"adapters": [{"name": "sql"}]},
        "bad",
        "spec.adapters[0].source",
        "Required value",
    ),
    (
        "adapter-name",
        {"adapters": [{"name": "has space", "source": "org/x"}]},
        "bad",
        "spec.adapters[0].name",
        "should match",
    ),
    (
        "adapter-twice",
        {"adapters": [SQL, {"name": "sql", "source": "/opt/other"}]},
        "bad",
        "spec.adapters[1]",
        'Duplicate value: {"name":"sql"}',
    ),
    (
        "too-many-adapters",
        {"adapters": [{"name": f"a{i}", "source": "org/x"} for i in range(33)]},
        "bad",
        "spec.adapters",
        "must have at most 32 items",
    ),
    (
        "adapter-repeats-served-name",
        {"servedName": "sql", "adapters": [SQL]},
        "bad",
        "spec.adapters",
        NAME_MESSAGE,
    ),
    (
        "adapter-repeats-alias",
        {"aliases": ["chat", "sql"], "adapters": [SQL]},
        "bad",
        "spec.adapters",
        NAME_MESSAGE,
    ),
    (
        # No servedName: the model's name is the served name.
        "adapter-repeats-model-name",
        {"adapters": [SQL]},
        "sql",
        "spec.adapters",
        "which is metadata.name when servedName is absent",
    ),
    (
        "lora-rank",
        {"adapters": [SQL], "engine": {"maxLoraRank": 17}},
        "bad",
        "spec.engine.maxLoraRank",
        "Unsupported value: 17",
    ),
    (
        "max-loras-zero",
        {"adapters": [SQL], "engine": {"maxLoras": 0}},
        "bad",
        "spec.engine.maxLoras",
        "should be greater than or equal to 1",
    ),
    (
        "autoscaling-min-above-max",
        {"autoscaling": {"minReplicas": 3, "maxReplicas": 2}},
        "bad",
        "spec.autoscaling.minReplicas",
        "autoscaling.minReplicas must be at most autoscaling.maxReplicas",
    ),
    (
        "autoscaling-without-max",
        {"autoscaling": {"minReplicas": 0}},
        "bad",
        "spec.autoscaling.maxReplicas",
        "Required value",
    ),
    (
        "autoscaling-max-zero",
        {"autoscaling": {"maxReplicas": 0}},
        "bad",
        "spec.autoscaling.maxReplicas",
        "should be greater than or equal to 1",
    ),
    (
        "read-write-once-pod-autoscaled",
        {
            "autoscaling": {"minReplicas": 0, "maxReplicas": 2},
            "cache": {"size": "1Gi", "accessMode": "ReadWriteOncePod"},
        },
        "bad",
        "spec.autoscaling.maxReplicas",
        "it needs autoscaling.maxReplicas <= 1",
    ),
    (
        "lora-rank-without-adapters",
        {"engine": {"maxLoraRank": 16}},
        "bad",
        "spec.engine",
        LORA_LIMITS,
    ),
    (
        "max-loras-with-no-adapter",
        {"adapters": [], "engine": {"maxLoras": 2}},
        "bad",
        "spec.engine",
        LORA_LIMITS,
    ),
    (
        "lora-modules-extra-arg",
        {"engine": {"extraArgs": ["--lora-modules", "sql=/adapters/sql"]}},
        "bad",
        "spec.engine.extraArgs",
        LORA_FLAGS,
    ),
    (
        "enable-lora-extra-arg-abbreviated",
        {"engine": {"extraArgs": ["--enable-lor"]}},
        "bad",
        "spec.engine.extraArgs",
        LORA_FLAGS,
    ),
    (
        "max-lora-rank-extra-arg",
        {"adapters": [SQL], "engine": {"extraArgs": ["--max_lora_rank=64"]}},
        "bad",
        "spec.engine.extraArgs",
        LORA_FLAGS,
    ),
    (
        "max-loras-extra-arg",
        {"adapters": [SQL], "engine": {"extraArgs": ["--max-loras", "2"]}},
        "bad",
        "spec.engine.extraArgs",
        LORA_FLAGS,
    ),
    (
        "fallback-repeats-served-name",
        {"servedName": "big", "routing": {"fallbacks": ["smol", "big"]}},
        "bad",
        "spec.routing.fallbacks",
        FALLBACK_MESSAGE,
    ),
    (
        "fallback-repeats-alias",
        {"aliases": ["chat"], "routing": {"fallbacks": ["chat"]}},
        "bad",
        "spec.routing.fallbacks",
        FALLBACK_MESSAGE,
    ),
    (
        "fallback-repeats-adapter",
        {"adapters": [SQL], "routing": {"fallbacks": ["sql"]}},
        "bad",
        "spec.routing.fallbacks",
        FALLBACK_MESSAGE,
    ),
    (
        # No servedName: the model's name is the served name.
        "fallback-repeats-model-name",
        {"routing": {"fallbacks": ["smol", "big"]}},
        "big",
        "spec.routing.fallbacks",
        "the servedName is metadata.name when servedName is absent",
    ),
    (
        "fallback-twice",
        {"routing": {"fallbacks": ["smol", "smol"]}},
        "bad",
        "spec.routing.fallbacks[1]",
        'Duplicate value: "smol"',
    ),
    (
        "too-many-fallbacks",
        {"routing": {"fallbacks": [f"f{i}" for i in range(5)]}},
        "bad",
        "spec.routing.fallbacks",
        "must have at most 4 items",
    ),
    (
        "fallback-name",
        {"routing": {"fallbacks": ["has space"]}},
        "bad",
        "spec.routing.fallbacks[0]",
        "should match",
    ),
    (
        "split-repeats-served-name",
        {
            "servedName": "big",
            "routing": {
                "split": [
                    {"model": "smol", "weight": 10},
                    {"model": "big", "weight": 10},
                ]
            },
        },
        "bad",
        "spec.routing.split",
        SPLIT_MESSAGE,
    ),
    (
        "split-repeats-alias",
        {"aliases": ["chat"], "routing": {"split": [{"model": "chat", "weight": 10}]}},
        "bad",
        "spec.routing.split",
        SPLIT_MESSAGE,
    ),
    (
        "split-repeats-adapter",
        {"adapters": [SQL], "routing": {"split": [{"model": "sql", "weight": 10}]}},
        "bad",
        "spec.routing.split",
        SPLIT_MESSAGE,
    ),
    (
        # No servedName: the model's name is the served name.
        "split-repeats-model-name",
        {
            "routing": {
                "split": [
                    {"model": "smol", "weight": 10},
                    {"model": "big", "weight": 10},
                ]
            }
        },
        "big",
        "spec.routing.split",
        "the servedName is metadata.name when servedName is absent",
    ),
    (
        "split-twice",
        {
            "routing": {
                "split": [
                    {"model": "smol", "weight": 10},
                    {"model": "smol", "weight": 20},
                ]
            }
        },
        "bad",
        "spec.routing.split[1]",
        "Duplicate value",
    ),
    (
        "too-many-splits",
        {"routing": {"split": [{"model": f"s{i}", "weight": 1} for i in range(5)]}},
        "bad",
        "spec.routing.split",
        "must have at most 4 items",
    ),
    (
        "split-weights-over-100",
        {
            "routing": {
                "split": [
                    {"model": "smol", "weight": 60},
                    {"model": "v2", "weight": 41},
                ]
            }
        },
        "bad",
        "spec.routing.split",
        SPLIT_WEIGHTS_MESSAGE,
    ),
    (
        "split-weight-zero",
        {"routing": {"split": [{"model": "smol", "weight": 0}]}},
        "bad",
        "spec.routing.split[0].weight",
        "should be greater than or equal to 1",
    ),
    (
        "split-weight-above-100",
        {"routing": {"split": [{"model": "smol", "weight": 101}]}},
        "bad",
        "spec.routing.split[0].weight",
        "should be less than or equal to 100",
    ),
    (
        "split-without-weight",
        {"routing": {"split": [{"model": "smol"}]}},
        "bad",
        "spec.routing.split[0].weight",
        "Required value",
    ),
    (
        "split-model-name",
        {"routing": {"split": [{"model": "has space", "weight": 10}]}},
        "bad",
        "spec.routing.split[0].model",
        "should match",
    ),
    (
        "max-requests-per-replica-zero",
        {"routing": {"maxRequestsPerReplica": 0}},
        "bad",
        "spec.routing.maxRequestsPerReplica",
        "should be greater than or equal to 1",
    ),
    (
        "reserved-per-replica-without-bound",
        {"routing": {"reservedPerReplica": 4}},
        "bad",
        "spec.routing.reservedPerReplica",
        "routing.reservedPerReplica needs routing.maxRequestsPerReplica",
    ),
    (
        "reserved-per-replica-at-bound",
        {"routing": {"maxRequestsPerReplica": 4, "reservedPerReplica": 4}},
        "bad",
        "spec.routing.reservedPerReplica",
        "routing.reservedPerReplica must be less than routing.maxRequestsPerReplica",
    ),
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
    ("spec", "name", "field", "message"),
    [(*c[1:], None) for c in CASES] + [c[1:] for c in MESSAGE_CASES],
    ids=[c[0] for c in CASES] + [c[0] for c in MESSAGE_CASES],
)
def test_invalid_manifest_is_refused_naming_the_field(
    cluster: KubeCluster,
    namespace: str,
    crds: None,
    spec: dict[str, Any],
    name: str,
    field: str,
    message: str | None,
) -> None:
    out = _apply(cluster, namespace, name, spec)
    if message is None:
        # A value of the wrong type for the schema, or (kubectl validates
        # strictly) a map where a list of objects belongs: its keys are unknown
        # fields.
        refusals = (
            "is invalid",
            "Invalid value",
            "strict decoding error: unknown field",
        )
        assert any(refusal in out for refusal in refusals), out
    else:
        assert "is invalid" in out and message in out, out
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
                # LoRA settings the operator leaves to the user.
                "--max-cpu-loras=4",
                "--lora-dtype=auto",
                "--no-enable-lora",
            ],
            "maxLoraRank": 320,
            "maxLoras": 32,
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
        # Every source form but s3://, and names as servedName takes them.
        "adapters": [
            {"name": "sql-expert", "source": "org/sql-lora"},
            {"name": "bot", "source": "sql-lora"},
            {"name": "org/support:v3", "source": "pvc://adapters/support-bot/v3"},
            {"name": "whole-claim", "source": "pvc://adapters/"},
            {"name": "baked", "source": "/opt/adapters/baked"},
        ],
        # Two, in Hugging Face style too, naming no model yet: the gateway
        # skips a name no model serves. The split's weights add up to all of
        # the requests, the most they may; maxRequestsPerReplica is its most,
        # and reservedPerReplica the most it may keep of it.
        "routing": {
            "strategy": "least-load",
            "fallbacks": ["smol", "org/tiny:v1"],
            "split": [
                {"model": "org/tiny:v2", "weight": 60},
                {"model": "big-v2", "weight": 40},
            ],
            "maxRequestsPerReplica": 100_000,
            "reservedPerReplica": 99_999,
        },
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
