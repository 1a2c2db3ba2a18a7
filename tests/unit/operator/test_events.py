"""Events on condition transitions."""

from __future__ import annotations

import pytest

from citadel.operator.events import Notice, combined, event_object, transitions
from citadel.operator.observe import derive_status

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
