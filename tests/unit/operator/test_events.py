"""Events on condition transitions."""

from __future__ import annotations

import pytest

from citadel.operator.events import Notice, combined, event_object, transitions
from citadel.operator.observe import Blocker, derive_status
from citadel.operator.status import Phase

from .samples import NODES, NOW, deployment, make_model, pod

pytestmark = pytest.mark.unit


def test_a_healthy_first_look_is_quiet_and_later_changes_are_events() -> None:
    model = make_model()
    creating = derive_status(model, None, [], NODES, NOW)
    assert transitions(model.status, creating) == []
    ready = derive_status(model, deployment(), [pod("p1")], NODES, NOW)
    notices = transitions(creating, ready)
    assert {n.reason for n in notices} == {"ReplicasReady", "Scheduled", "Complete"}
    assert all(n.type == "Normal" for n in notices)


def test_bad_news_is_a_warning_and_counts_alone_are_not_news() -> None:
    model = make_model(replicas=3)
    before = derive_status(
        model, deployment(3, 1), [pod("p1", unschedulable="full")], NODES, NOW
    )
    after = derive_status(
        model, deployment(3, 2), [pod("p1", unschedulable="full")], NODES, NOW
    )
    assert transitions(before, after) == []
    scheduled = next(
        n for n in transitions(model.status, before) if n.reason == "Unschedulable"
    )
    assert scheduled.type == "Warning"
    assert "full" in scheduled.message


@pytest.mark.parametrize(
    "reason", ["ReconcileFailed", "ServiceNameTaken", "ServedNameConflict"]
)
def test_a_model_the_operator_fails_is_a_warning(reason: str) -> None:
    # `kubectl get events --field-selector type=Warning` and alerts on Events
    # must see every model turning Failed, not only those that cannot be placed.
    model = make_model()
    ready = derive_status(model, deployment(), [pod("p1")], NODES, NOW)
    blocker = Blocker(reason, "it cannot go on")
    failed = derive_status(model, deployment(), [pod("p1")], NODES, NOW, blocker)
    assert failed.phase is Phase.FAILED
    notice = combined(transitions(ready, failed))
    assert notice is not None
    assert (notice.type, notice.reason) == ("Warning", reason)
    assert notice.message == "Ready=False: it cannot go on"
    # Also as a new model's first status, which posts only bad news.
    first = derive_status(model, None, [], NODES, NOW, blocker)
    notice = combined(transitions(model.status, first))
    assert notice is not None
    assert (notice.type, notice.reason) == ("Warning", reason)


def test_losing_the_last_replica_to_a_placement_failure_is_a_warning() -> None:
    # Scheduled=False (a Warning when it came) has not changed: only Ready has,
    # and with it the phase, from Degraded to Failed.
    model = make_model(placement={"nodeName": "gone"}, replicas=2)
    waiting = pod("p2", node_name=None, ready=False, unschedulable="0/3 nodes")
    serving = derive_status(
        model, deployment(2, 1), [pod("p1", node_name="gone"), waiting], NODES, NOW
    )
    assert serving.phase is Phase.DEGRADED
    failed = derive_status(model, deployment(2, 0), [waiting], NODES, NOW)
    assert failed.phase is Phase.FAILED
    notice = combined(transitions(serving, failed))
    assert notice is not None
    assert (notice.type, notice.reason) == ("Warning", "NodeNotFound")
    assert notice.message.startswith("Ready=False: ")


def test_turning_failed_with_no_condition_changed_is_a_warning() -> None:
    # Nodes no longer autoscaled (the operator restarted without it): the same
    # conditions now make the model Failed instead of Pending.
    model = make_model(resources={"gpus": 16})
    waiting = pod("p1", node_name=None, ready=False, unschedulable="0/3 nodes")
    pending = derive_status(
        model, deployment(ready=0), [waiting], NODES, NOW, nodes_autoscaled=True
    )
    assert pending.phase is Phase.PENDING
    failed = derive_status(model, deployment(ready=0), [waiting], NODES, NOW)
    assert failed.phase is Phase.FAILED
    assert failed.conditions == pending.conditions
    notice = combined(transitions(pending, failed))
    assert notice is not None
    assert (notice.type, notice.reason) == ("Warning", "InsufficientGPUs")
    assert notice.message.startswith("Ready=False: ")
    # Once Failed, the same status again is no news.
    assert transitions(failed, failed) == []


def test_waiting_for_scheduling_gates_is_no_warning() -> None:
    # A model queued by Kueue is waiting, not failing: Warning-based alerts
    # must not fire for every model in a queue.
    model = make_model()
    gated = pod("p1", gates=["kueue.x-k8s.io/admission"])
    waiting = derive_status(model, deployment(ready=0), [gated], NODES, NOW)
    assert transitions(model.status, waiting) == []
    creating = derive_status(model, None, [], NODES, NOW)
    notice = combined(transitions(creating, waiting))
    assert notice is not None
    assert (notice.type, notice.reason) == ("Normal", "SchedulingGated")
    # Once admitted, a pod the scheduler cannot place is bad news again.
    full = pod("p1", node_name=None, unschedulable="0/3 nodes")
    stuck = derive_status(model, deployment(ready=0), [full], NODES, NOW)
    notice = combined(transitions(waiting, stuck))
    assert notice is not None
    assert (notice.type, notice.reason) == ("Warning", "Unschedulable")


def test_event_object_points_at_the_model() -> None:
    model = make_model()
    creating = derive_status(model, None, [], NODES, NOW)
    ready = derive_status(model, deployment(), [pod("p1")], NODES, NOW)
    notice = transitions(creating, ready)[0]
    event = event_object(model, notice, NOW)
    assert event["involvedObject"]["kind"] == "LLMModel"
    assert event["involvedObject"]["uid"] == "uid-mixtral"
    assert event["metadata"]["namespace"] == "llm"


def test_one_event_per_write_leads_with_ready() -> None:
    model = make_model()
    creating = derive_status(model, None, [], NODES, NOW)
    ready = derive_status(model, deployment(), [pod("p1")], NODES, NOW)
    notice = combined(transitions(creating, ready))
    assert notice is not None
    assert (notice.type, notice.reason) == ("Normal", "ReplicasReady")
    assert notice.message.startswith("Ready=True: ")
    assert "; Scheduled=True: " in notice.message
    assert "; Progressing=False: " in notice.message


def test_a_warning_leads_the_event_it_shares() -> None:
    notices = [
        Notice("Normal", "WaitingForReplicas", "Ready=False: loading"),
        Notice("Warning", "Unschedulable", "Scheduled=False: 0/3 nodes"),
        Notice("Normal", "RollingOut", "Progressing=True: 0/1 updated"),
    ]
    notice = combined(notices)
    assert notice == Notice(
        "Warning",
        "Unschedulable",
        "Scheduled=False: 0/3 nodes; Ready=False: loading; "
        "Progressing=True: 0/1 updated",
    )
    assert combined([]) is None
