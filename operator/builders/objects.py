"""The model's other objects: Service, cache claim, PodDisruptionBudget, PodMonitor."""

from __future__ import annotations

from collections.abc import Mapping

from citadel.operator import names
from citadel.operator.builders.common import Manifest, metadata, selector_labels
from citadel.operator.model import LLMModel
from citadel.operator.spec import DeletePolicy


def build_service(model: LLMModel) -> Manifest:
    """The ClusterIP Service whose EndpointSlices the gateway watches."""
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata(model, model.name),
        "spec": {
            "type": "ClusterIP",
            "selector": selector_labels(model),
            "ports": [
                {
                    "name": names.HTTP_PORT_NAME,
                    "port": names.HTTP_PORT,
                    "targetPort": names.HTTP_PORT_NAME,
                    "protocol": "TCP",
                    "appProtocol": "http",
                }
            ],
        },
    }


def build_cache_claim(
    model: LLMModel, created_for: str | None = None, created_as: str | None = None
) -> Manifest | None:
    """The cache PersistentVolumeClaim, or None when the spec has no cache.

    Only `deletePolicy: Delete` gives it an owner reference: by default the claim,
    which holds the downloaded weights, outlives the model.

    Args:
        model: the model.
        created_for: the uid of the model the operator created the claim for (this
            one's, or an earlier model's of the same name when it was retained);
            the claim carries it in its `created-for` annotation. None for the
            claim to create, which gets this model's.
        created_as: the claim's own uid once it exists (`created-as`).
    """
    cache = model.spec.cache
    if cache is None:
        return None
    spec: Manifest = {
        "accessModes": [str(cache.access_mode)],
        "resources": {"requests": {"storage": cache.size}},
    }
    if cache.storage_class_name is not None:
        spec["storageClassName"] = cache.storage_class_name
    meta = metadata(
        model,
        names.cache_claim_name(model.name),
        owned=cache.delete_policy is DeletePolicy.DELETE,
        component="model-cache",
    )
    meta["annotations"] = {names.ANNOTATION_CREATED_FOR: created_for or model.uid}
    if created_as is not None:
        meta["annotations"][names.ANNOTATION_CREATED_AS] = created_as
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": meta,
        "spec": spec,
    }


def build_pdb(model: LLMModel) -> Manifest | None:
    """A PodDisruptionBudget: drains take one replica at a time.

    None for one replica, and for a model pinned to one node (`placement.nodeName`,
    a nodeSelector on the node's hostname, or a required node affinity that names
    one node only: `Placement.one_node`): there every replica goes with the
    node, and the replacement of the first one evicted can only wait for that
    node, so the budget would refuse the next eviction for ever and block the
    drain.
    """
    if model.spec.replicas <= 1 or model.spec.placement.one_node:
        return None
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": metadata(model, model.name),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(model)},
            # A replica that crash-loops or still loads protects nothing; with
            # the default policy two such replicas would block every drain.
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def build_pod_monitor(
    model: LLMModel, extra_labels: Mapping[str, str] | None = None
) -> Manifest:
    """A Prometheus Operator PodMonitor scraping vLLM's `/metrics`.

    Args:
        model: the model.
        extra_labels: labels a Prometheus selects PodMonitors by; the model's own
            labels win over them.
    """
    meta = metadata(model, model.name)
    meta["labels"] = {**(extra_labels or {}), **meta["labels"]}
    return {
        "apiVersion": "monitoring.coreos.com/v1",
        "kind": "PodMonitor",
        "metadata": meta,
        "spec": {
            "selector": {"matchLabels": selector_labels(model)},
            # Marks every series as one of Citadel's model pods, and whose
            # (names.MODEL_TARGET_LABEL): the alerts select them by it.
            "podTargetLabels": [names.LABEL_MODEL],
            "podMetricsEndpoints": [
                {"port": names.HTTP_PORT_NAME, "path": "/metrics", "interval": "15s"}
            ],
        },
    }
