"""The LLMModel status as typed models (also the CRD status schema source)."""

from __future__ import annotations

import enum
from typing import Annotated, Literal

from pydantic import Field

from citadel.operator.spec import ApiModel, Time

# The most pods a model has during a rollout: spec.replicas plus
# rollout.maxSurge, at most 64 each (operator/spec.py).
MAX_NODES = 128
# The Ready reason of a model whose reconcile failed for good.
RECONCILE_FAILED = "ReconcileFailed"
# The Ready reason of a model whose reconcile failed for good because a Service
# of its name is not its own: a reason of its own, as the routes leave such a
# model out (routing.service_taken) and must not tell it from the message.
SERVICE_NAME_TAKEN = "ServiceNameTaken"
# The Ready reasons of a reconcile that failed for good: each stays until a
# reconcile of the model succeeds, across operator restarts too.
RECONCILE_FAILURES = frozenset({RECONCILE_FAILED, SERVICE_NAME_TAKEN})
# metav1.Condition's reason: what the API server accepts, and what the model
# checks before it writes one (a reason copied from the cluster may not fit).
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
REASON_MAX_LENGTH = 1024
MESSAGE_MAX_LENGTH = 32768
"""metav1.Condition's message, at most (the API server refuses more)."""


def name_taken(kind: str, name: str) -> str:
    """The message of a failed reconcile for an object the model would own whose
    name an object that is not the model's already has."""
    return (
        f"{kind} {name} already exists and does not belong to this LLMModel: "
        "rename the model or remove that object"
    )


class Phase(enum.StrEnum):
    """A one-word summary of the conditions, for people and printer columns."""

    PENDING = "Pending"
    PROGRESSING = "Progressing"
    READY = "Ready"
    DEGRADED = "Degraded"
    FAILED = "Failed"


class ConditionType(enum.StrEnum):
    """The conditions every LLMModel carries (docs/concepts.md lists the reasons)."""

    READY = "Ready"
    SCHEDULED = "Scheduled"
    PROGRESSING = "Progressing"
    DEGRADED = "Degraded"


class Condition(ApiModel):
    """A metav1.Condition."""

    type: Annotated[str, Field(max_length=316)]
    status: Literal["True", "False", "Unknown"]
    reason: Annotated[str, Field(max_length=REASON_MAX_LENGTH, pattern=REASON_PATTERN)]
    """A CamelCase word saying why; docs/concepts.md lists them."""
    message: Annotated[str, Field(max_length=MESSAGE_MAX_LENGTH)] = ""
    """What a person needs to know."""
    observed_generation: Annotated[int, Field(ge=0)] | None = None
    last_transition_time: Time
    """When the status last changed."""


class ReplicaCounts(ApiModel):
    """Replica counts of the model's Deployment."""

    desired: int = 0
    """spec.replicas."""
    current: int = 0
    """Pods that exist."""
    updated: int = 0
    """Pods that run the current spec."""
    ready: int = 0
    """Pods that answer their readiness probe."""


class LLMModelStatus(ApiModel):
    """The observed state, derived from the Deployment, its pods and the nodes."""

    phase: Phase | None = None
    conditions: Annotated[
        list[Condition],
        Field(
            max_length=16,
            json_schema_extra={
                "x-kubernetes-list-type": "map",
                "x-kubernetes-list-map-keys": ["type"],
            },
        ),
    ] = Field(default_factory=list)
    replicas: ReplicaCounts = Field(default_factory=ReplicaCounts)
    served_name: str | None = None
    """The name clients send as `model` (spec.servedName or the LLMModel's name)."""
    endpoint: str | None = None
    """The in-cluster URL of the OpenAI-compatible server."""
    nodes: Annotated[
        list[str],
        Field(
            max_length=MAX_NODES, json_schema_extra={"x-kubernetes-list-type": "set"}
        ),
    ] = Field(default_factory=list)
    """The nodes the model's pods were placed on, sorted by name: at most 128,
    the most pods a rollout makes (replicas plus rollout.maxSurge); should other
    pods carry the model's labels, the nodes past 128 are left out."""
    selector: str | None = None
    """The pods' label selector (for the scale subresource and autoscalers)."""
    observed_generation: int | None = None
    """The metadata.generation this status describes."""

    def condition(self, kind: ConditionType) -> Condition | None:
        """The condition of that type, if present."""
        return next((c for c in self.conditions if c.type == kind), None)
