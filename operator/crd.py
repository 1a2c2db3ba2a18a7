"""The LLMModel CustomResourceDefinition, built from the typed models.

`make crds` writes it (and the Kopf peering CRDs) to `crds/`; a unit test fails when
the committed files are stale. The Helm chart consumes the same files.
"""

from __future__ import annotations

from typing import Any

from citadel.operator import names
from citadel.operator.schema import Schema, structural_schema
from citadel.operator.spec import LLMModelSpec, object_rules
from citadel.operator.status import LLMModelStatus

Manifest = dict[str, Any]


def _column(
    name: str, path: str, kind: str = "string", priority: int = 0, doc: str = ""
) -> dict[str, Any]:
    column: dict[str, Any] = {"name": name, "type": kind, "jsonPath": path}
    if priority:
        column["priority"] = priority
    if doc:
        column["description"] = doc
    return column


PRINTER_COLUMNS = (
    _column("Served", ".status.servedName", doc="The name clients send as model"),
    _column("Phase", ".status.phase"),
    _column("Ready", ".status.replicas.ready", "integer", doc="Ready replicas"),
    _column("Replicas", ".spec.replicas", "integer", doc="Desired replicas"),
    _column("GPUs", ".spec.resources.gpus", "integer", doc="GPUs per replica"),
    _column("Node", ".spec.placement.nodeName", doc="The node the spec targets"),
    _column("Age", ".metadata.creationTimestamp", "date"),
    _column("Model", ".spec.model", priority=1),
    _column("Endpoint", ".status.endpoint", priority=1),
)


def openapi_schema() -> Schema:
    """The whole object's schema: metadata limits, spec and status."""
    return {
        "type": "object",
        "description": (
            "A large language model served by vLLM on GPU nodes, routed by the "
            "Citadel gateway."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {
                "type": "object",
                "properties": {
                    "name": {
                        "type": "string",
                        "maxLength": names.MAX_NAME_LENGTH,
                        "pattern": names.DNS1035_LABEL,
                    }
                },
            },
            "spec": structural_schema(LLMModelSpec),
            "status": structural_schema(LLMModelStatus),
        },
        **object_rules(),
    }


def llmmodel_crd() -> Manifest:
    """The `llmmodels.citadel.ai` CustomResourceDefinition."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": names.CRD_NAME,
            "labels": {names.LABEL_PART_OF: "citadel"},
        },
        "spec": {
            "group": names.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": names.KIND,
                "listKind": f"{names.KIND}List",
                "plural": names.PLURAL,
                "singular": names.SINGULAR,
                "shortNames": list(names.SHORT_NAMES),
                "categories": ["citadel"],
            },
            "versions": [
                {
                    "name": names.VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas.current",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": list(PRINTER_COLUMNS),
                }
            ],
        },
    }


def _peering_crd(kind: str, plural: str, scope: str) -> Manifest:
    # Kopf's own peering resources (https://kopf.readthedocs.io/en/stable/peering/):
    # replicas of the operator announce themselves in the status of one object so
    # only the highest-priority one handles resources.
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{plural}.kopf.dev"},
        "spec": {
            "group": "kopf.dev",
            "scope": scope,
            "names": {"kind": kind, "plural": plural, "singular": kind.lower()},
            "versions": [
                {
                    "name": "v1",
                    "served": True,
                    "storage": True,
                    "schema": {
                        "openAPIV3Schema": {
                            "type": "object",
                            "properties": {
                                "status": {
                                    "type": "object",
                                    "x-kubernetes-preserve-unknown-fields": True,
                                }
                            },
                        }
                    },
                }
            ],
        },
    }


def peering_crds() -> list[Manifest]:
    """Kopf's ClusterKopfPeering and KopfPeering CRDs, for operator replicas."""
    return [
        _peering_crd("ClusterKopfPeering", "clusterkopfpeerings", "Cluster"),
        _peering_crd("KopfPeering", "kopfpeerings", "Namespaced"),
    ]
