"""Kubernetes Events for an LLMModel: one per status write that changes a condition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

from citadel.operator import names
from citadel.operator.kube.client import Manifest
from citadel.operator.model import LLMModel
from citadel.operator.status import Condition, ConditionType, LLMModelStatus, Phase

EventType = Literal["Normal", "Warning"]
# (condition type, status) pairs that are bad news.
_WARNING = {
    (ConditionType.SCHEDULED, "False"),
    (ConditionType.DEGRADED, "True"),
}
# Reasons that are bad news whatever the condition: all but the first are the
# operator's own (observe.Blocker), and make the model Failed.
_WARNING_REASONS = frozenset(
    {
        "ProgressDeadlineExceeded",
        "ReconcileFailed",
        "ServiceNameTaken",
        "ServedNameConflict",
    }
)
# Reasons of a wait, not a failure, though their condition reads like one:
# pods that a queue (Kueue) holds back with scheduling gates are Scheduled=False
# until it admits them, and every model in a queue would raise a Warning.
_WAITING_REASONS = frozenset({"SchedulingGated"})


@dataclass(frozen=True)
class Notice:
    """An Event to post: its type, reason and message."""

    type: EventType
    reason: str
    message: str


def _is_warning(cond: Condition, failed: bool) -> bool:
    """Whether `cond`'s change is bad news; `failed`: the model's phase is Failed
    (its Ready then says why, whatever the reason)."""
    if failed and cond.type == ConditionType.READY:
        return True
    if cond.reason in _WAITING_REASONS:
        return False
    if (cond.type, cond.status) in _WARNING:
        return True
    return cond.reason in _WARNING_REASONS


def transitions(old: LLMModelStatus, new: LLMModelStatus) -> list[Notice]:
    """A notice for every condition whose status or reason changed.

    Messages that only update counts ("1/3 ready" -> "2/3 ready") do not make a new
    event: that would flood the namespace's events during a rollout. A condition's
    first value makes one only when it is bad news: a new model would otherwise
    post four events at once saying nothing is wrong (at 300 models, Events were
    about a sixth of the API server's requests: apiserver_request_total).

    A model that turns Failed always makes a Warning, led by its Ready condition,
    even when no condition changed (the same placement problem is Failed once
    nodes are no longer autoscaled): Event-based alerts and `kubectl get events
    --field-selector type=Warning` must see every model that needs a change.
    """
    failed = new.phase == Phase.FAILED
    turned_failed = failed and old.phase != Phase.FAILED
    notices = []
    for cond in new.conditions:
        before = old.condition(ConditionType(cond.type))
        warning = _is_warning(cond, failed)
        if before is None and not warning:
            continue
        announced = turned_failed and cond.type == ConditionType.READY
        if (
            before is not None
            and (before.status, before.reason) == (cond.status, cond.reason)
            and not announced
        ):
            continue
        kind: EventType = "Warning" if warning else "Normal"
        text = f"{cond.type}={cond.status}: {cond.message}"
        notices.append(Notice(kind, cond.reason, text))
    return notices


def combined(notices: list[Notice]) -> Notice | None:
    """One Event for the transitions of one status write, or None for none.

    Its reason is the first Warning's, else the first transition's (conditions come
    in the status's order, Ready first); its message lists every transition, the
    headline first. Conditions change together (Ready and Progressing when a
    model finishes loading): one Event per condition made five for a healthy new
    model (`kubectl get events` on the local cluster). In `make bench`'s burst of
    1,000 models, POST events per model (apiserver_request_total, of which the
    cluster's controllers post 3.00) went from 6.17 at b68cf22 to 5.07 at fa8d453,
    the commit that made this change.
    """
    if not notices:
        return None
    headline = next((n for n in notices if n.type == "Warning"), notices[0])
    rest = [n.message for n in notices if n is not headline]
    return Notice(headline.type, headline.reason, "; ".join([headline.message, *rest]))


def event_object(model: LLMModel, notice: Notice, now: str) -> Manifest:
    """A core/v1 Event about `model`."""
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"generateName": f"{model.name}.", "namespace": model.namespace},
        "involvedObject": {
            "apiVersion": names.API_VERSION,
            "kind": names.KIND,
            "name": model.name,
            "namespace": model.namespace,
            "uid": model.uid,
        },
        "type": notice.type,
        "reason": notice.reason,
        "message": notice.message[:1024],
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
        "source": {"component": names.MANAGER_NAME},
    }
