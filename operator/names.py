"""Names shared by every layer: the API group, label keys, derived object names.

Everything the operator writes into the cluster is named here once, so the builders,
the status code and the tests agree on it.
"""

from __future__ import annotations

GROUP = "citadel.ai"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "LLMModel"
PLURAL = "llmmodels"
SINGULAR = "llmmodel"
SHORT_NAMES = ("llm", "llms")
CRD_NAME = f"{PLURAL}.{GROUP}"

# Kopf's finalizer, "touch" and legacy state annotations are named under it.
KOPF_PREFIX = GROUP
FIELD_MANAGER = "citadel-operator"
MANAGER_NAME = "citadel-operator"
"""The value of `app.kubernetes.io/managed-by` on every object the operator makes."""

CONTAINER_NAME = "vllm"
HTTP_PORT = 8000
HTTP_PORT_NAME = "http"

GPU_RESOURCE = "nvidia.com/gpu"
# The label every node carries with its own name (a nodeSelector on it pins).
HOSTNAME_LABEL = "kubernetes.io/hostname"
GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"

# Standard labels (https://kubernetes.io/docs/concepts/overview/working-with-objects/
# common-labels/) plus one of ours that names the owning model unambiguously.
LABEL_NAME = "app.kubernetes.io/name"
LABEL_INSTANCE = "app.kubernetes.io/instance"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_MODEL = "citadel.ai/model"
MODEL_TARGET_LABEL = "citadel_ai_model"
"""LABEL_MODEL as a label of every series Prometheus scrapes from a model pod: the
PodMonitor copies it onto its targets (`podTargetLabels`, which the Prometheus
Operator spells with `_` for `.` and `/`). The chart's model alerts select
Citadel's pods by it, not any vLLM pod the same Prometheus scrapes."""
MANAGED_SELECTOR = f"{LABEL_MANAGED_BY}={MANAGER_NAME}"
"""The label selector of the pods, Deployments and Services the operator watches."""

ANNOTATION_CREATED_FOR = f"{GROUP}/created-for"
"""On a cache claim the operator created: the uid of the LLMModel it was made for.

A label can be copied onto anyone's claim; this is set only by the operator's own
create, so a claim without it is never changed, and never given an owner reference
that would delete it with the model.
"""
ANNOTATION_CREATED_AS = f"{GROUP}/created-as"
"""On a cache claim the operator created: the claim's own uid, written right after
the create. A copy of the claim (annotations and all) gets a new uid, so only the
claim the operator made passes for it."""

MAX_NAME_LENGTH = 52
"""The longest LLMModel name.

The Deployment's ReplicaSets are named `<name>-<hash of up to 10 characters>`, which
must stay a legal 63-character DNS label; the other derived names are shorter.
"""
DNS1035_LABEL = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"


def cache_claim_name(model_name: str) -> str:
    """The model cache PersistentVolumeClaim's name."""
    return f"{model_name}-cache"


def endpoint(model_name: str, namespace: str) -> str:
    """The in-cluster URL of the model's OpenAI-compatible server."""
    return f"http://{model_name}.{namespace}.svc:{HTTP_PORT}"
