"""Labels, selectors and metadata shared by every owned object."""

from __future__ import annotations

from typing import Any

from citadel.operator import names
from citadel.operator.model import LLMModel

Manifest = dict[str, Any]


class BuildError(ValueError):
    """The spec cannot be turned into the objects it asks for.

    Only for what the CRD's schema leaves unchecked (or objects stored before it
    checked it): retrying cannot help, the spec must change.
    """


def selector_labels(model: LLMModel) -> dict[str, str]:
    """The labels that select the model's pods (never change: selectors are
    immutable)."""
    return {names.LABEL_NAME: "vllm", names.LABEL_MODEL: model.name}


def labels(model: LLMModel, component: str = "model-server") -> dict[str, str]:
    """The standard `app.kubernetes.io/*` labels plus the owning model."""
    return {
        **selector_labels(model),
        names.LABEL_INSTANCE: model.name,
        names.LABEL_COMPONENT: component,
        names.LABEL_PART_OF: "citadel",
        names.LABEL_MANAGED_BY: names.MANAGER_NAME,
    }


def label_selector(model: LLMModel) -> str:
    """`selector_labels` as a label-selector string."""
    return ",".join(f"{k}={v}" for k, v in selector_labels(model).items())


def owner_reference(model: LLMModel) -> Manifest:
    """Makes the model the controller of an object, for garbage collection."""
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": model.name,
        "uid": model.uid,
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(
    model: LLMModel, name: str, *, owned: bool = True, component: str = "model-server"
) -> Manifest:
    """metadata for an object the model owns (`owned=False`: no owner reference,
    so deleting the model leaves the object alone)."""
    meta: Manifest = {
        "name": name,
        "namespace": model.namespace,
        "labels": labels(model, component),
    }
    if owned:
        meta["ownerReferences"] = [owner_reference(model)]
    return meta
