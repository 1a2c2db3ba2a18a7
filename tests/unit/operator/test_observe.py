"""Status derivation from sample cluster objects."""

from __future__ import annotations

import copy
from datetime import datetime, timedelta
from typing import Any

import pytest

from citadel.operator.model import LLMModel
from citadel.operator.observe import (
    NOT_READY_GRACE_SECONDS,
    SIDECAR_LOOP_SECONDS,
    Blocker,
    derive_status,
    lapse_due_in,
)
from citadel.operator.status import ConditionType, LLMModelStatus, Phase

from .samples import NODES, NOW, deployment, make_model, model_body, node, pod

pytestmark = pytest.mark.unit
PINNED = {"placement": {"nodeName": "hx-llm-server-01"}, "resources": {"gpus": 2}}


def _cond(status: LLMModelStatus, kind: ConditionType) -> tuple[str, str, str]:
    cond = status.condition(kind)
    assert cond is not None
    return cond.status, cond.reason, cond.message


def _derive(
    model: LLMModel,
    deploy: dict[str, Any] | None,
    pods: list[dict[str, Any]],
    blocker: Blocker | None = None,
) -> LLMModelStatus:
    return derive_status(model, deploy, pods, NODES, NOW, blocker)


def test_ready_model() -> None:
    status = _derive(make_model(**PINNED), deployment(), [pod("p1")])
    assert status.phase is Phase.READY
    assert _cond(status, ConditionType.READY)[:2] == ("True", "ReplicasReady")
    assert _cond(status, ConditionType.SCHEDULED)[:2] == ("True", "Scheduled")
    assert _cond(status, ConditionType.PROGRESSING)[:2] == ("False", "Complete")
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert status.replicas.desired == status.replicas.ready == 1
    assert status.endpoint == "http://mixtral.llm.svc:8000"
    assert status.nodes == ["hx-llm-server-01"]
    assert status.served_name == "mixtral"
    assert status.observed_generation == 1
    assert all(c.observed_generation == 1 for c in status.conditions)


def test_before_the_deployment_exists() -> None:
    status = _derive(make_model(**PINNED), None, [])
    assert status.phase is Phase.PENDING
    assert _cond(status, ConditionType.PROGRESSING)[:2] == ("True", "Creating")
    assert _cond(status, ConditionType.SCHEDULED)[0] == "Unknown"
    assert _cond(status, ConditionType.READY)[0] == "False"


def test_unschedulable_pod_quotes_the_scheduler() -> None:
    message = "0/3 nodes are available: 1 Insufficient nvidia.com/gpu."
    status = _derive(
        make_model(**PINNED),
        deployment(ready=0),
        [pod("p1", node_name=None, unschedulable=message)],
    )
    assert status.phase is Phase.PENDING
    scheduled = _cond(status, ConditionType.SCHEDULED)
    assert scheduled[:2] == ("False", "Unschedulable")
    assert message in scheduled[2]
    assert _cond(status, ConditionType.READY)[1] == "Unschedulable"


@pytest.mark.parametrize(
    ("spec", "pods", "reason", "told"),
    [
        # An unknown node is named, beside the nodes there are and what the
        # scheduler said.
        (
            {"placement": {"nodeName": "hx-nope"}},
            [pod("p1", node_name=None, unschedulable="x")],
            "NodeNotFound",
            ["'hx-nope' does not exist", "hx-llm-server-01", "scheduler: x"],
        ),
        (
            {"placement": {"nodeName": "hx-llm-server-01"}, "resources": {"gpus": 16}},
            [],
            "InsufficientGPUs",
            ["16 nvidia.com/gpu", "hx-llm-server-01 has 4"],
        ),
        ({"placement": {"gpuProduct": "NVIDIA-B200"}}, [], "NoMatchingNode", []),
    ],
    ids=["unknown node", "more GPUs than the node has", "GPU product no node has"],
)
def test_a_placement_no_node_can_take_is_named_and_fails(
    spec: dict[str, Any], pods: list[dict[str, Any]], reason: str, told: list[str]
) -> None:
    status = _derive(make_model(**spec), deployment(ready=0), pods)
    scheduled = _cond(status, ConditionType.SCHEDULED)
    assert scheduled[:2] == ("False", reason)
    assert [part for part in told if part not in scheduled[2]] == []
    assert status.phase is Phase.FAILED


def test_gpu_product_checks_capacity_of_matching_nodes_only() -> None:
    model = make_model(
        placement={"gpuProduct": "NVIDIA-H100-80GB-HBM3"}, resources={"gpus": 8}
    )
    status = _derive(model, deployment(ready=0), [])
    assert _cond(status, ConditionType.SCHEDULED)[1] == "InsufficientGPUs"
    fits = make_model(
        placement={"gpuProduct": "NVIDIA-A100-SXM4-80GB"}, resources={"gpus": 8}
    )
    assert (
        _cond(
            _derive(fits, deployment(), [pod("p1", node_name="hx-llm-server-02")]),
            ConditionType.SCHEDULED,
        )[0]
        == "True"
    )


@pytest.mark.parametrize(
    ("waiting", "reason"),
    [
        ("CrashLoopBackOff", "CrashLoopBackOff"),
        ("ImagePullBackOff", "ImagePullBackOff"),
        ("ErrImagePull", "ImagePullBackOff"),
    ],
)
def test_crash_loops_and_pull_failures_degrade(waiting: str, reason: str) -> None:
    status = _derive(
        make_model(**PINNED),
        deployment(ready=0),
        [pod("p1", ready=False, waiting=waiting)],
    )
    degraded = _cond(status, ConditionType.DEGRADED)
    assert degraded[:2] == ("True", reason)
    assert "pod p1" in degraded[2]
    assert status.phase is Phase.DEGRADED
    assert _cond(status, ConditionType.READY)[1] == reason


def test_loading_model_is_progressing() -> None:
    status = _derive(
        make_model(**PINNED), deployment(ready=0), [pod("p1", ready=False)]
    )
    assert status.phase is Phase.PROGRESSING
    assert _cond(status, ConditionType.PROGRESSING)[:2] == (
        "True",
        "WaitingForReplicas",
    )
    assert _cond(status, ConditionType.READY)[:2] == ("False", "WaitingForReplicas")


def test_rollout_in_flight() -> None:
    status = _derive(
        make_model(**PINNED, replicas=2),
        deployment(replicas=2, ready=2, updated=1, generation=3, observed=3),
        [pod("p1"), pod("p2")],
    )
    assert _cond(status, ConditionType.PROGRESSING)[:2] == ("True", "RollingOut")
    assert status.phase is Phase.PROGRESSING
    assert _cond(status, ConditionType.READY)[0] == "True"


def test_a_generation_its_controller_has_not_seen_keeps_the_verdict() -> None:
    """An annotation bumps a Deployment's generation and rolls nothing out: until
    the controller has looked, the model stays as it was (no flap to Progressing)."""
    ready = _derive(make_model(**PINNED), deployment(), [pod("p1")])
    body = model_body(**PINNED)
    body["status"] = ready.model_dump(by_alias=True, exclude_none=True, mode="json")
    lagging = deployment(generation=2, observed=1)
    status = _derive(LLMModel.from_body(body), lagging, [pod("p1")])
    assert status.phase is Phase.READY
    assert _cond(status, ConditionType.PROGRESSING) == _cond(
        ready, ConditionType.PROGRESSING
    )
    # Seen first while lagging, there is no verdict to keep.
    first = _derive(make_model(**PINNED), lagging, [pod("p1")])
    assert _cond(first, ConditionType.PROGRESSING)[:2] == ("True", "RollingOut")
    # The model's own spec changed (the operator applied it): a rollout may be
    # due, and the new generation must not be reported Complete.
    body["spec"]["replicas"] = 2
    body["metadata"]["generation"] = 2
    changed = _derive(LLMModel.from_body(body), lagging, [pod("p1")])
    assert _cond(changed, ConditionType.PROGRESSING)[:2] == ("True", "RollingOut")
    assert changed.phase is Phase.PROGRESSING


def test_progress_deadline_exceeded() -> None:
    status = _derive(
        make_model(**PINNED),
        deployment(ready=0, deadline_exceeded=True),
        [pod("p1", ready=False)],
    )
    assert _cond(status, ConditionType.PROGRESSING)[:2] == (
        "False",
        "ProgressDeadlineExceeded",
    )
    assert _cond(status, ConditionType.DEGRADED)[:2] == (
        "True",
        "ProgressDeadlineExceeded",
    )
    assert status.phase is Phase.DEGRADED


def test_a_deadline_its_controller_set_before_a_spec_change_is_not_trusted() -> None:
    """A change of spec that fixes a stuck rollout: until the Deployment's
    controller has looked at it, its ProgressDeadlineExceeded is the old spec's
    and must not be reported under the new generation."""
    stuck = _derive(
        make_model(**PINNED),
        deployment(ready=0, deadline_exceeded=True),
        [pod("p1", ready=False)],
    )
    body = model_body(**PINNED)
    body["status"] = stuck.model_dump(by_alias=True, exclude_none=True, mode="json")
    lagging = deployment(ready=0, deadline_exceeded=True, generation=2, observed=1)
    # Someone annotated the Deployment: the same spec, still stuck.
    annotated = _derive(LLMModel.from_body(body), lagging, [pod("p1", ready=False)])
    assert annotated.phase is Phase.DEGRADED
    for kind in (ConditionType.PROGRESSING, ConditionType.DEGRADED):
        assert _cond(annotated, kind)[1] == "ProgressDeadlineExceeded"
    # The model's spec changed and the operator applied it.
    body["metadata"]["generation"] = 2
    body["spec"]["engine"] = {"image": "vllm/vllm-openai:v0.9.2"}
    fixed = _derive(LLMModel.from_body(body), lagging, [pod("p1", ready=False)])
    assert fixed.observed_generation == 2
    assert _cond(fixed, ConditionType.PROGRESSING)[:2] == ("True", "RollingOut")
    assert _cond(fixed, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert _cond(fixed, ConditionType.READY)[:2] == ("False", "RollingOut")
    assert fixed.phase is Phase.PROGRESSING


def test_partly_unschedulable_while_serving_is_degraded() -> None:
    status = _derive(
        make_model(**PINNED, replicas=2),
        deployment(replicas=2, ready=1),
        [pod("p1"), pod("p2", node_name=None, unschedulable="no room")],
    )
    assert status.phase is Phase.DEGRADED
    assert _cond(status, ConditionType.READY)[0] == "True"


KUEUE = "kueue.x-k8s.io/admission"


def test_a_pod_held_by_scheduling_gates_waits_and_is_no_failure() -> None:
    """A queue (Kueue) holds the pod until it admits the model: no scheduler
    has tried it, so it is not Unschedulable, and the model is Pending."""
    status = _derive(
        make_model(**PINNED), deployment(ready=0), [pod("p1", gates=[KUEUE])]
    )
    scheduled = _cond(status, ConditionType.SCHEDULED)
    assert scheduled == (
        "False",
        "SchedulingGated",
        f"1 of 1 pods wait for their scheduling gates: {KUEUE}",
    )
    assert _cond(status, ConditionType.READY) == ("False", *scheduled[1:])
    assert _cond(status, ConditionType.DEGRADED)[0] == "False"
    assert status.phase is Phase.PENDING


def test_a_scale_up_held_by_scheduling_gates_is_progressing() -> None:
    """The replicas that serve go on; the gated one waits its turn: not
    Degraded, which alerts (CitadelModelFailed)."""
    status = _derive(
        make_model(**PINNED, replicas=2),
        deployment(replicas=2, ready=1),
        [pod("p1"), pod("p2", gates=[KUEUE, "example.com/quota"])],
    )
    assert _cond(status, ConditionType.SCHEDULED) == (
        "False",
        "SchedulingGated",
        "1 of 2 pods wait for their scheduling gates: example.com/quota, " + KUEUE,
    )
    assert _cond(status, ConditionType.READY)[0] == "True"
    assert status.phase is Phase.PROGRESSING


def test_an_unschedulable_pod_wins_over_a_gated_one() -> None:
    status = _derive(
        make_model(**PINNED, replicas=2),
        deployment(replicas=2, ready=0),
        [pod("p1", gates=[KUEUE]), pod("p2", node_name=None, unschedulable="full")],
    )
    assert _cond(status, ConditionType.SCHEDULED) == (
        "False",
        "Unschedulable",
        "1 of 2 pods cannot be placed: full",
    )


def test_scaled_to_zero() -> None:
    status = _derive(make_model(replicas=0), deployment(replicas=0, ready=0), [])
    assert _cond(status, ConditionType.READY)[:2] == ("False", "ScaledToZero")
    assert status.phase is Phase.READY


def test_blocker_fails_the_model() -> None:
    status = _derive(
        make_model(**PINNED),
        deployment(),
        [pod("p1")],
        Blocker("ServedNameConflict", "taken"),
    )
    assert _cond(status, ConditionType.READY) == (
        "False",
        "ServedNameConflict",
        "taken",
    )
    assert status.phase is Phase.FAILED


def test_terminating_pods_are_ignored() -> None:
    old = pod("old", waiting="CrashLoopBackOff")
    old["metadata"]["deletionTimestamp"] = NOW
    status = _derive(make_model(**PINNED), deployment(), [pod("p1"), old])
    assert _cond(status, ConditionType.DEGRADED)[0] == "False"


def test_transition_time_is_kept_while_the_status_holds() -> None:
    first = _derive(make_model(**PINNED), deployment(), [pod("p1")])
    earlier = first.model_dump(by_alias=True, mode="json")
    for cond in earlier["conditions"]:
        cond["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    model = LLMModel.from_body(model_body(status=earlier, **PINNED))
    again = _derive(model, deployment(ready=0), [pod("p1", ready=False)])
    times = {c.type: c.last_transition_time for c in again.conditions}
    assert times["Scheduled"] == "2020-01-01T00:00:00Z"  # still True
    assert times["Ready"] == NOW  # True -> False


def _failed_pod(name: str, reason: str, message: str) -> dict[str, Any]:
    failed = pod(name)
    failed["status"] = {"phase": "Failed", "reason": reason, "message": message}
    return failed


@pytest.mark.parametrize(
    ("reason", "message"),
    [
        ("Evicted", "The node was low on resource: memory."),
        (
            "UnexpectedAdmissionError",
            "Allocate failed due to no healthy devices present; cannot allocate "
            "unhealthy devices nvidia.com/gpu",
        ),
        ("Terminated", "Pod was terminated in response to imminent node shutdown."),
    ],
)
def test_a_failed_pod_counts_only_while_replicas_are_short(
    reason: str, message: str
) -> None:
    """The ReplicaSet replaces a failed pod; the failed object stays listed until
    someone deletes it, and must not keep a serving model Degraded."""
    model = make_model(**PINNED)
    pods = [pod("p-new"), _failed_pod("p-old", reason, message)]
    serving = _derive(model, deployment(replicas=1, ready=1), pods)
    assert serving.phase is Phase.READY
    assert _cond(serving, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert _cond(serving, ConditionType.SCHEDULED)[2].startswith("1 pod placed")
    short = _derive(model, deployment(replicas=1, ready=0), pods)
    assert _cond(short, ConditionType.DEGRADED) == (
        "True",
        reason,
        f"pod p-old: {message}",
    )


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ("OutOfnvidia.com/gpu", "OutOfResource"),
        ("OutOfephemeral-storage", "OutOfResource"),
        ("node shutdown/graceful", "NodeShutdownGraceful"),
        ("42-x", "X"),
        ("---", "PodFailed"),
    ],
)
def test_a_failed_pod_reason_no_condition_can_carry_is_mapped(
    raw: str, reason: str
) -> None:
    """The kubelet refuses a pod with `OutOf<resource>`, a reason a condition's
    pattern rejects: copied as it is, the status failed validation and froze."""
    message = "Pod was rejected: Node didn't have enough resource: nvidia.com/gpu"
    model = make_model(**PINNED)
    status = _derive(model, deployment(ready=0), [_failed_pod("p-old", raw, message)])
    assert _cond(status, ConditionType.DEGRADED) == (
        "True",
        reason,
        f"pod p-old ({raw}): {message}",
    )
    assert _cond(status, ConditionType.READY)[:2] == ("False", reason)
    LLMModelStatus.model_validate(status.model_dump())


def test_node_labels_matter_only_until_the_pods_are_placed() -> None:
    """A node's GPU label that feature discovery drops and puts back while it
    restarts must not turn a serving model Degraded."""
    nodes = [node("gpu-1", 1)]  # no nvidia.com/gpu.product label, for now
    model = make_model(resources={"gpus": 1}, placement={"gpuProduct": "NVIDIA-L4"})
    placed = derive_status(
        model, deployment(), [pod("p1", node_name="gpu-1")], nodes, NOW
    )
    assert placed.phase is Phase.READY
    assert _cond(placed, ConditionType.SCHEDULED)[:2] == ("True", "Scheduled")
    waiting = derive_status(
        model,
        deployment(ready=0),
        [pod("p2", node_name=None, ready=False, unschedulable="0/1 nodes")],
        nodes,
        NOW,
    )
    assert _cond(waiting, ConditionType.SCHEDULED)[:2] == ("False", "NoMatchingNode")


@pytest.mark.parametrize(
    ("placement", "gpus", "reason"),
    [
        ({"gpuProduct": "NVIDIA-L4"}, 1, "NoMatchingNode"),
        ({}, 16, "InsufficientGPUs"),
        ({"nodeName": "gone"}, 1, "NodeNotFound"),
        ({"nodeSelector": {"kubernetes.io/hostname": "gone"}}, 1, "NoMatchingNode"),
        ({"nodeName": "hx-llm-server-01"}, 16, "InsufficientGPUs"),
    ],
)
def test_where_nodes_are_autoscaled_only_a_named_node_missing_fails(
    placement: dict[str, Any], gpus: int, reason: str
) -> None:
    """An autoscaler adds the node once the pod waits for one: until then the
    model is Pending, not Failed (which pages someone)."""
    model = make_model(resources={"gpus": gpus}, placement=placement)
    pending = [pod("p1", node_name=None, ready=False, unschedulable="0/3 nodes")]
    fixed = derive_status(model, deployment(ready=0), pending, NODES, NOW)
    scaled = derive_status(
        model, deployment(ready=0), pending, NODES, NOW, nodes_autoscaled=True
    )
    assert _cond(fixed, ConditionType.SCHEDULED)[1] == reason
    assert _cond(scaled, ConditionType.SCHEDULED)[1] == reason
    assert fixed.phase is Phase.FAILED
    named = "nodeName" in placement or "nodeSelector" in placement
    assert scaled.phase is (Phase.FAILED if named else Phase.PENDING)


def _at(body: dict[str, Any], created: str) -> dict[str, Any]:
    body["metadata"]["creationTimestamp"] = created
    return body


def test_a_failed_pod_older_than_a_ready_one_is_not_the_cause() -> None:
    """A scale-up waits for a replica to load while an evicted pod from last week
    is still listed: that pod was replaced long ago and explains nothing."""
    model = make_model(replicas=3, **PINNED)
    old = _failed_pod("old", "Evicted", "The node was low on resource: memory.")
    pods = [
        _at(old, "2026-11-28T10:00:00Z"),
        _at(pod("a"), "2026-11-29T10:00:00Z"),
        _at(pod("b"), "2026-11-29T10:00:00Z"),
        _at(pod("c", ready=False), "2026-12-05T10:00:00Z"),
    ]
    status = _derive(model, deployment(replicas=3, ready=2), pods)
    assert status.phase is Phase.PROGRESSING
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    # Pods the kubelet keeps refusing are newer than every ready one: the cause.
    refused = _failed_pod("d", "UnexpectedAdmissionError", "no healthy devices")
    pods[3] = _at(refused, "2026-12-05T10:00:00Z")
    status = _derive(model, deployment(replicas=3, ready=2), pods)
    assert _cond(status, ConditionType.DEGRADED)[:2] == (
        "True",
        "UnexpectedAdmissionError",
    )


def _evicted(name: str, created: str, template: str = "") -> dict[str, Any]:
    failed = _failed_pod(name, "Evicted", "The node was low on resource: memory.")
    if template:
        failed["metadata"]["labels"]["pod-template-hash"] = template
    return _at(failed, created)


def _of(body: dict[str, Any], template: str, created: str) -> dict[str, Any]:
    body["metadata"]["labels"]["pod-template-hash"] = template
    return _at(body, created)


def test_an_old_eviction_does_not_degrade_a_later_rollout() -> None:
    """With one replica every rollout or restart leaves the model short while
    the replacement loads: an eviction of an older ReplicaSet's pod is no
    cause, and a crash loop of the new pod is named, not the eviction."""
    model = make_model(**PINNED)
    old = _evicted("mixtral-aaa-x", "2026-01-01T00:00:00Z", template="aaa")
    loading = _of(pod("mixtral-bbb-y", ready=False), "bbb", "2026-03-01T00:00:00Z")
    status = _derive(model, deployment(ready=0), [old, loading])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert status.phase is Phase.PROGRESSING
    # Without template hashes (pods made by others), age decides alike.
    bare = _derive(
        model,
        deployment(ready=0),
        [_evicted("x", "2026-01-01T00:00:00Z"), _at(loading, "2026-03-01T00:00:00Z")],
    )
    assert _cond(bare, ConditionType.DEGRADED)[0] == "False"
    crashing = pod("mixtral-bbb-z", ready=False, waiting="CrashLoopBackOff")
    crashing = _of(crashing, "bbb", "2026-03-01T00:00:00Z")
    status = _derive(model, deployment(ready=0), [old, crashing])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("True", "CrashLoopBackOff")


def test_an_eviction_of_the_current_replica_set_is_the_cause() -> None:
    """The current replica was evicted and its replacement loads: that is why
    nothing is ready, and the replacement being newer does not hide it."""
    model = make_model(**PINNED)
    evicted = _evicted("mixtral-bbb-x", "2026-03-01T00:00:00Z", template="bbb")
    loading = _of(pod("mixtral-bbb-y", ready=False), "bbb", "2026-03-02T00:00:00Z")
    status = _derive(model, deployment(ready=0), [evicted, loading])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("True", "Evicted")
    # Not once the replacement serves.
    serving = _of(pod("mixtral-bbb-y"), "bbb", "2026-03-02T00:00:00Z")
    status = _derive(model, deployment(), [evicted, serving])
    assert _cond(status, ConditionType.DEGRADED)[0] == "False"


def _since(body: dict[str, Any], initialized: str, ready: str) -> dict[str, Any]:
    """`body` with the kubelet's transition times: Initialized at `initialized`,
    Ready (as it is now) at `ready`."""
    conditions = body["status"]["conditions"]
    conditions.append(
        {"type": "Initialized", "status": "True", "lastTransitionTime": initialized}
    )
    next(c for c in conditions if c["type"] == "Ready")["lastTransitionTime"] = ready
    return body


def test_an_eviction_its_replacement_has_served_since_does_not_count_again() -> None:
    """The replacement of an evicted replica turned ready, then stopped being
    ready for a while (a readiness probe failing, its node NotReady): the old
    eviction, which pod GC keeps listed, is not why; that replica is."""
    model = make_model(**PINNED)
    evicted = _evicted("mixtral-bbb-x", "2026-03-01T00:00:00Z", template="bbb")
    lapsed = _since(
        _of(pod("mixtral-bbb-y", ready=False), "bbb", "2026-03-02T00:00:00Z"),
        initialized="2026-03-02T00:00:10Z",
        ready="2026-03-09T00:00:00Z",  # True -> False, long after it started
    )
    status = _derive(model, deployment(ready=0), [evicted, lapsed])
    assert _cond(status, ConditionType.DEGRADED) == (
        "True",
        "ReplicaNotReady",
        "pod mixtral-bbb-y on node hx-llm-server-01: not ready since "
        "2026-03-09T00:00:00Z",
    )
    assert status.phase is Phase.DEGRADED
    # A replacement still loading for the first time has not: the eviction is
    # the cause (its Ready turned False when the kubelet first wrote it).
    loading = _since(
        _of(pod("mixtral-bbb-y", ready=False), "bbb", "2026-03-02T00:00:00Z"),
        initialized="2026-03-02T00:00:10Z",
        ready="2026-03-02T00:00:10Z",
    )
    status = _derive(model, deployment(ready=0), [evicted, loading])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("True", "Evicted")
    # And an eviction of the replica that had served is: it is named, not the
    # eviction it made up for.
    again = _evicted("mixtral-bbb-y", "2026-03-02T00:00:00Z", template="bbb")
    again["status"]["conditions"] = [{"type": "Ready", "status": "False"}]
    again = _since(again, "2026-03-02T00:00:10Z", ready="2026-03-09T00:00:00Z")
    fresh = _of(pod("mixtral-bbb-z", ready=False), "bbb", "2026-03-09T00:00:00Z")
    status = _derive(model, deployment(ready=0), [evicted, again, fresh])
    assert _cond(status, ConditionType.DEGRADED) == (
        "True",
        "Evicted",
        "pod mixtral-bbb-y: The node was low on resource: memory.",
    )


def test_a_crash_loop_wins_over_a_failed_pod_listed_first() -> None:
    model = make_model(**PINNED, replicas=2)
    failed = _evicted("a", "2026-03-01T00:00:00Z")
    crashing = _at(
        pod("b", ready=False, waiting="CrashLoopBackOff"),
        failed["metadata"]["creationTimestamp"],
    )
    status = _derive(model, deployment(replicas=2, ready=0), [failed, crashing])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("True", "CrashLoopBackOff")


@pytest.mark.parametrize(
    "reason",
    [
        "ErrImageNeverPull",
        "ImageInspectError",
        "SignatureValidationFailed",
        "InvalidImageName",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "PreCreateHookError",
        "PostStartHookError",
    ],
)
def test_every_kubelet_image_and_start_error_degrades(reason: str) -> None:
    status = _derive(
        make_model(**PINNED),
        deployment(ready=0),
        [pod("p1", ready=False, waiting=reason)],
    )
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("True", reason)
    assert status.phase is Phase.DEGRADED
    assert _cond(status, ConditionType.READY)[1] == reason


def _restarted(state: dict[str, Any], ended: dict[str, Any]) -> dict[str, Any]:
    body = pod("p1", ready=False)
    body["status"]["containerStatuses"] = [
        {
            "name": "vllm",
            "ready": False,
            "restartCount": 3,
            "state": state,
            "lastState": {"terminated": ended},
        }
    ]
    return body


OOM = {"reason": "OOMKilled", "exitCode": 137}
BACK_OFF = {"waiting": {"reason": "CrashLoopBackOff", "message": "back-off 40s"}}
RUNNING = {"running": {"startedAt": NOW}}


def _pulling(reason: str, message: str) -> dict[str, Any]:
    body = pod("p1", ready=False)
    body["status"]["containerStatuses"] = [
        {
            "name": "vllm",
            "ready": False,
            "restartCount": 0,
            "state": {"waiting": {"reason": reason, "message": message}},
        }
    ]
    return body


def test_a_failing_pull_is_one_reason_and_message_across_retries() -> None:
    """The kubelet alternates ErrImagePull and ImagePullBackOff at every retry:
    each change was a status write and a Warning Event."""
    error = 'failed to pull and unpack image "docker.io/vllm/vllm:v0.99": not found'
    back_off = 'Back-off pulling image "vllm/vllm:v0.99"'
    body = model_body(**PINNED)
    seen = set()
    for i, (reason, message) in enumerate(
        [("ErrImagePull", error), ("ImagePullBackOff", back_off)] * 3
    ):
        model = LLMModel.from_body(body)
        status = derive_status(
            model,
            deployment(ready=0),
            [_pulling(reason, message)],
            NODES,
            f"2026-05-01T12:0{i}:00Z",
        )
        assert status.phase is Phase.DEGRADED
        seen.add(_cond(status, ConditionType.DEGRADED))
        body["status"] = status.model_dump(
            by_alias=True, exclude_none=True, mode="json"
        )
    assert seen == {
        (
            "True",
            "ImagePullBackOff",
            f"pod p1, container vllm: ImagePullBackOff {error}",
        )
    }
    # Seen first while it waits, the back-off's message is all there is.
    first = _derive(
        make_model(**PINNED),
        deployment(ready=0),
        [_pulling("ImagePullBackOff", back_off)],
    )
    assert _cond(first, ConditionType.DEGRADED)[1:] == (
        "ImagePullBackOff",
        f"pod p1, container vllm: ImagePullBackOff {back_off}",
    )


def test_a_crash_loop_stays_degraded_while_the_container_loads_again() -> None:
    """Between back-offs the container runs (vLLM loads again): the model must
    not flip to Progressing and back, with a status write and Events, at every
    restart."""
    model = make_model(**PINNED)
    seen: set[tuple[str, str, str]] = set()
    for state in (BACK_OFF, RUNNING, BACK_OFF, RUNNING):
        status = _derive(model, deployment(ready=0), [_restarted(state, OOM)])
        assert status.phase is Phase.DEGRADED
        seen.add(_cond(status, ConditionType.DEGRADED))
    assert len(seen) == 1
    assert seen.pop() == (
        "True",
        "CrashLoopBackOff",
        "pod p1, container vllm: CrashLoopBackOff last exit: OOMKilled (exit code 137)",
    )
    # A non-zero exit counts as well as an OOM kill.
    error = {"reason": "Error", "exitCode": 1}
    status = _derive(model, deployment(ready=0), [_restarted(RUNNING, error)])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("True", "CrashLoopBackOff")


def test_a_restart_that_turned_ready_is_not_a_crash() -> None:
    model = make_model(**PINNED)
    serving = _restarted(RUNNING, OOM)
    serving["status"]["conditions"][1]["status"] = "True"
    serving["status"]["containerStatuses"][0]["ready"] = True
    status = _derive(model, deployment(), [serving])
    assert _cond(status, ConditionType.DEGRADED)[0] == "False"
    assert status.phase is Phase.READY


def test_a_restart_long_ago_does_not_make_a_readiness_blip_a_crash_loop() -> None:
    """A container OOM-killed once, 11 days ago, that has served since: its
    readiness probe failing for a while is no crash loop (nor a Warning)."""
    model = make_model(**PINNED)
    started = "2026-04-20T01:00:00Z"
    blip = _restarted({"running": {"startedAt": started}}, OOM)
    blip["status"]["conditions"][1]["lastTransitionTime"] = "2026-05-01T11:59:30Z"
    status = _derive(model, deployment(ready=0), [blip])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert _cond(status, ConditionType.PROGRESSING)[:2] == (
        "True",
        "WaitingForReplicas",
    )
    # Not ready since it started again (the crash turned it not ready): a loop.
    for since in ("2026-04-20T00:59:55Z", started):
        blip["status"]["conditions"][1]["lastTransitionTime"] = since
        status = _derive(model, deployment(ready=0), [blip])
        assert _cond(status, ConditionType.DEGRADED)[:2] == (
            "True",
            "CrashLoopBackOff",
        )
    # Waiting out the back-off is a crash loop whatever the times say.
    waiting = _restarted(BACK_OFF, OOM)
    waiting["status"]["conditions"][1]["lastTransitionTime"] = NOW
    status = _derive(model, deployment(ready=0), [waiting])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("True", "CrashLoopBackOff")


def test_a_surge_rollout_is_rolling_out_not_scaling_down() -> None:
    """maxSurge 1, maxUnavailable 0: the new pod loads while the old one serves."""
    model = make_model(**PINNED, rollout={"maxSurge": 1, "maxUnavailable": 0})
    status = _derive(
        model,
        deployment(replicas=2, ready=1, updated=1),
        [pod("old"), pod("new", ready=False)],
    )
    assert _cond(status, ConditionType.PROGRESSING) == (
        "True",
        "RollingOut",
        "1/1 replicas updated, 1 old replica still running",
    )
    assert status.phase is Phase.PROGRESSING
    # A plain scale-down keeps its reason.
    down = _derive(
        make_model(**PINNED),
        deployment(replicas=3, ready=3),
        [pod("a"), pod("b"), pod("c")],
    )
    assert _cond(down, ConditionType.PROGRESSING)[:2] == ("True", "ScalingDown")


def test_scaled_to_zero_on_a_node_that_is_gone_is_not_failed() -> None:
    model = make_model(replicas=0, placement={"nodeName": "hx-gone"})
    status = _derive(model, deployment(replicas=0, ready=0), [])
    assert status.phase is Phase.READY
    assert _cond(status, ConditionType.SCHEDULED)[:2] == ("True", "ScaledToZero")
    assert _cond(status, ConditionType.READY)[:2] == ("False", "ScaledToZero")


def test_every_node_of_the_largest_surge_rollout_is_listed() -> None:
    """64 replicas and maxSurge 64 on one node each: the status still validates
    (a ValidationError would freeze it) and lists them all."""
    nodes = [node(f"n{i:03}", 8) for i in range(129)]
    model = make_model(
        replicas=64,
        resources={"gpus": 8},
        rollout={"maxSurge": 64, "maxUnavailable": 0},
    )
    pods = [pod(f"p{i}", node_name=f"n{i:03}", ready=i < 64) for i in range(128)]
    status = derive_status(
        model, deployment(replicas=128, ready=64, updated=64), pods, nodes, NOW
    )
    assert status.nodes == [f"n{i:03}" for i in range(128)]
    # Pods made by others with the model's labels are left out past the bound.
    pods.append(pod("stray", node_name="n128"))
    status = derive_status(
        model, deployment(replicas=129, ready=65, updated=64), pods, nodes, NOW
    )
    assert len(status.nodes) == 128
    LLMModelStatus.model_validate(status.model_dump())


def test_a_message_longer_than_a_condition_holds_is_cut() -> None:
    """A message from the cluster of any length: copied whole, one past 32,768
    characters failed the status's validation, which then froze."""
    message = "Node didn't have enough resource: " + "x" * 40_000
    model = make_model(**PINNED)
    failed = _failed_pod("p-old", "OutOfnvidia.com/gpu", message)
    status = _derive(model, deployment(ready=0), [failed])
    degraded = _cond(status, ConditionType.DEGRADED)
    assert degraded[:2] == ("True", "OutOfResource")
    assert len(degraded[2]) == 32768
    assert degraded[2].startswith("pod p-old (OutOfnvidia.com/gpu): Node didn't")
    assert degraded[2].endswith("x [cut]")
    LLMModelStatus.model_validate(status.model_dump())


INIT = "fetch-weights"
INIT_CRASH = (
    "CrashLoopBackOff",
    f"pod p1, init container {INIT}: CrashLoopBackOff last exit: Error (exit code 1)",
)


def _initializing(init: dict[str, Any]) -> dict[str, Any]:
    """A pod whose init container `fetch-weights` is in `init` (its status's
    state, lastState and restartCount), as the kubelet reports it: the pod
    Pending, not Initialized, its server container waiting PodInitializing."""
    body = pod("p1", ready=False)
    body["status"]["phase"] = "Pending"
    body["status"]["conditions"] += [
        {
            "type": "Initialized",
            "status": "False",
            "reason": "ContainersNotInitialized",
            "message": f"containers with incomplete status: [{INIT}]",
        },
        {"type": "ContainersReady", "status": "False", "reason": "ContainersNotReady"},
    ]
    body["status"]["initContainerStatuses"] = [
        {"name": INIT, "ready": False, "restartCount": 0, **init}
    ]
    body["status"]["containerStatuses"] = [
        {
            "name": "vllm",
            "ready": False,
            "restartCount": 0,
            "state": {"waiting": {"reason": "PodInitializing"}},
        }
    ]
    return body


FAILED_ONCE = {"terminated": {"reason": "Error", "exitCode": 1}}


@pytest.mark.parametrize(
    ("init", "degraded"),
    [
        (
            {
                "state": {
                    "waiting": {
                        "reason": "CrashLoopBackOff",
                        "message": f"back-off 40s restarting failed container={INIT}",
                    }
                },
                "lastState": FAILED_ONCE,
                "restartCount": 3,
            },
            INIT_CRASH,
        ),
        # Run again between back-offs, and failed just now (`Init:Error`,
        # before any restart): one reason and message throughout.
        (
            {
                "state": {"running": {"startedAt": NOW}},
                "lastState": FAILED_ONCE,
                "restartCount": 4,
            },
            INIT_CRASH,
        ),
        ({"state": FAILED_ONCE}, INIT_CRASH),
        (
            {"state": {"waiting": {"reason": "ErrImagePull", "message": "not found"}}},
            (
                "ImagePullBackOff",
                f"pod p1, init container {INIT}: ImagePullBackOff not found",
            ),
        ),
        (
            {
                "state": {
                    "waiting": {
                        "reason": "CreateContainerConfigError",
                        "message": 'secret "hf-token" not found',
                    }
                }
            },
            (
                "CreateContainerConfigError",
                f"pod p1, init container {INIT}: CreateContainerConfigError "
                'secret "hf-token" not found',
            ),
        ),
    ],
    ids=["crash loop back-off", "crash loop running", "error", "pull", "config"],
)
def test_a_stuck_init_container_degrades_and_is_named(
    init: dict[str, Any], degraded: tuple[str, str]
) -> None:
    """An init container that keeps failing holds the server back for ever:
    read like the server's own container, and named as an init container."""
    status = _derive(make_model(**PINNED), deployment(ready=0), [_initializing(init)])
    assert _cond(status, ConditionType.DEGRADED) == ("True", *degraded)
    assert _cond(status, ConditionType.READY) == ("False", *degraded)
    assert status.phase is Phase.DEGRADED


def test_an_init_container_that_runs_or_completed_is_no_failure() -> None:
    model = make_model(**PINNED)
    for init in (
        {"state": {"running": {"startedAt": NOW}}},
        {"state": {"terminated": {"reason": "Completed", "exitCode": 0}}},
    ):
        status = _derive(model, deployment(ready=0), [_initializing(init)])
        assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
        assert _cond(status, ConditionType.PROGRESSING)[1] == "WaitingForReplicas"
        assert status.phase is Phase.PROGRESSING


STARTED = "2026-05-01T09:00:00Z"
UNREADY = "containers with unready status: [vllm]"
NODE_GONE_QUIET = {
    "type": "Ready",
    "status": "Unknown",
    "reason": "NodeStatusUnknown",
    "message": "Kubelet stopped posting node status.",
}


def _served(name: str, since: str, *, node_down: bool = False) -> dict[str, Any]:
    """A replica that started at 09:00, turned ready, and has not been ready
    since `since`, as the cluster writes it: its readiness probe failing (the
    kubelet's ContainersNotReady on Ready and ContainersReady), or, with
    `node_down`, its node NotReady (the node lifecycle controller turns Ready
    False and nothing else; the kubelet, cut off, last said it was ready)."""
    body = pod(name, ready=False)
    body["metadata"]["creationTimestamp"] = STARTED
    if node_down:
        ready = {"type": "Ready", "status": "False", "lastTransitionTime": since}
        containers = {
            "type": "ContainersReady",
            "status": "True",
            "lastTransitionTime": "2026-05-01T09:04:00Z",
        }
    else:
        ready = {
            "type": "Ready",
            "status": "False",
            "lastTransitionTime": since,
            "reason": "ContainersNotReady",
            "message": UNREADY,
        }
        containers = {**ready, "type": "ContainersReady"}
    body["status"]["conditions"] = [
        {"type": "PodReadyToStartContainers", "status": "True"},
        {"type": "Initialized", "status": "True", "lastTransitionTime": STARTED},
        ready,
        containers,
        {"type": "PodScheduled", "status": "True", "lastTransitionTime": STARTED},
    ]
    body["status"]["containerStatuses"] = [
        {
            "name": "vllm",
            "ready": node_down,
            "started": True,
            "restartCount": 0,
            "state": {"running": {"startedAt": "2026-05-01T09:00:01Z"}},
        }
    ]
    return body


def _unready_nodes() -> list[dict[str, Any]]:
    """NODES with hx-llm-server-01 cut off: its kubelet stopped reporting."""
    down = node("hx-llm-server-01", 4)
    down["status"]["conditions"] = [NODE_GONE_QUIET]
    down["spec"] = {
        "taints": [{"key": "node.kubernetes.io/unreachable", "effect": "NoExecute"}]
    }
    return [down, *NODES[1:]]


def test_a_replica_whose_node_went_not_ready_degrades_the_model() -> None:
    """The node stopped reporting, its pod was marked not ready two minutes
    ago: capacity lost, not a model loading; the pod, its node and the node's
    condition are named, and the message holds while nothing changes."""
    model = make_model(**PINNED)
    lost = _served("mixtral-abc-x", "2026-05-01T11:58:00Z", node_down=True)
    expected = (
        "True",
        "NodeNotReady",
        "pod mixtral-abc-x on node hx-llm-server-01: not ready since "
        "2026-05-01T11:58:00Z; node hx-llm-server-01 is NotReady (Ready=Unknown, "
        "NodeStatusUnknown)",
    )
    for now in (NOW, "2026-05-01T12:04:00Z"):
        status = derive_status(
            model, deployment(ready=0), [lost], _unready_nodes(), now
        )
        assert _cond(status, ConditionType.DEGRADED) == expected
        assert status.phase is Phase.DEGRADED
        assert _cond(status, ConditionType.READY) == ("False", *expected[1:])
        assert _cond(status, ConditionType.PROGRESSING) == (
            "False",
            "NodeNotReady",
            "0/1 replicas ready, none loading: 1 replica stopped being ready "
            "(see Degraded)",
        )
    # The node's own condition out of reach, the pod's status tells alike:
    # the kubelet never turns Ready False with its containers ready.
    status = _derive(model, deployment(ready=0), [lost])
    assert _cond(status, ConditionType.DEGRADED)[1:] == (
        "NodeNotReady",
        "pod mixtral-abc-x on node hx-llm-server-01: not ready since "
        "2026-05-01T11:58:00Z; marked not ready by the node lifecycle controller",
    )


def test_a_replica_that_stopped_answering_degrades_a_serving_model() -> None:
    """One of two replicas fails its readiness probe for two minutes: the
    model still serves (Ready), with a replica short (Degraded)."""
    model = make_model(**PINNED, replicas=2)
    lost = _served("mixtral-abc-y", "2026-05-01T11:58:00Z")
    status = _derive(model, deployment(replicas=2, ready=1), [pod("p1"), lost])
    assert _cond(status, ConditionType.DEGRADED) == (
        "True",
        "ReplicaNotReady",
        "pod mixtral-abc-y on node hx-llm-server-01: not ready since "
        f"2026-05-01T11:58:00Z (ContainersNotReady: {UNREADY})",
    )
    assert _cond(status, ConditionType.READY)[:2] == ("True", "ReplicasReady")
    assert _cond(status, ConditionType.PROGRESSING)[:2] == (
        "False",
        "ReplicaNotReady",
    )
    assert status.phase is Phase.DEGRADED


def _after(time: str, seconds: int) -> str:
    later = datetime.fromisoformat(time) + timedelta(seconds=seconds)
    return later.strftime("%Y-%m-%dT%H:%M:%SZ")


@pytest.mark.parametrize("node_down", [False, True], ids=["probe", "node"])
def test_a_replica_not_ready_for_less_than_the_grace_is_not_yet_degraded(
    node_down: bool,
) -> None:
    """A readiness probe that fails three times and answers again is no lost
    replica: within NOT_READY_GRACE_SECONDS it reads as loading, as before."""
    model = make_model(**PINNED)
    since = "2026-05-01T11:59:30Z"
    blip = _served("p1", since, node_down=node_down)
    nodes = _unready_nodes() if node_down else NODES
    for now in (since, _after(since, NOT_READY_GRACE_SECONDS - 1)):
        status = derive_status(model, deployment(ready=0), [blip], nodes, now)
        assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
        assert _cond(status, ConditionType.PROGRESSING)[:2] == (
            "True",
            "WaitingForReplicas",
        )
        assert status.phase is Phase.PROGRESSING
    now = _after(since, NOT_READY_GRACE_SECONDS)
    status = derive_status(model, deployment(ready=0), [blip], nodes, now)
    assert _cond(status, ConditionType.DEGRADED)[:2] == (
        "True",
        "NodeNotReady" if node_down else "ReplicaNotReady",
    )


def test_a_lapse_is_due_when_the_first_lost_replica_reaches_the_grace() -> None:
    """The refresh that turns the model Degraded is asked for then: nothing in
    the cluster changes at that moment."""
    since = "2026-05-01T11:59:30Z"
    lost = [_served("p1", since), _served("p2", _after(since, 10), node_down=True)]
    now = _after(since, 20)
    assert lapse_due_in(lost, now) == NOT_READY_GRACE_SECONDS - 20
    assert lapse_due_in(lost[1:], now) == NOT_READY_GRACE_SECONDS - 10
    # Past the grace it is Degraded already; a ready or never-served pod waits
    # for nothing.
    assert lapse_due_in(lost, _after(since, NOT_READY_GRACE_SECONDS + 10)) is None
    assert lapse_due_in([pod("p3"), pod("p4", ready=False)], now) is None
    gone = _served("p5", since)
    gone["metadata"]["deletionTimestamp"] = now
    assert lapse_due_in([gone], now) is None


def test_a_replica_that_never_served_since_it_started_is_loading() -> None:
    """Hours after it started, a pod whose Ready has not changed since the
    kubelet first wrote it, or whose container started again after it last
    was ready (a crash, a liveness probe's restart), loads the model."""
    model = make_model(**PINNED)
    never = _served("p1", STARTED)  # Ready False since its first status
    restarted = _served("p2", "2026-05-01T10:00:00Z")
    restarted["status"]["containerStatuses"][0].update(
        restartCount=1, state={"running": {"startedAt": "2026-05-01T10:00:00Z"}}
    )
    for loading in (never, restarted):
        status = _derive(model, deployment(ready=0), [loading])
        assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
        assert _cond(status, ConditionType.PROGRESSING)[1] == "WaitingForReplicas"
        assert status.phase is Phase.PROGRESSING


def test_a_lost_replica_beside_one_loading_leaves_progressing_as_it_is() -> None:
    """A scale-up loads while another replica is lost: both are said, the
    load in Progressing, the loss in Degraded; a lost pod that takes no
    capacity the model needs (the old one of a surge rollout) is none."""
    model = make_model(**PINNED, replicas=2)
    lost = _served("old", "2026-05-01T11:50:00Z")
    pods = [lost, pod("new", ready=False)]
    status = _derive(model, deployment(replicas=2, ready=0), pods)
    assert _cond(status, ConditionType.PROGRESSING)[:2] == (
        "True",
        "WaitingForReplicas",
    )
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("True", "ReplicaNotReady")
    surge = make_model(**PINNED, rollout={"maxSurge": 1, "maxUnavailable": 0})
    status = _derive(
        surge, deployment(replicas=2, ready=1, updated=1), [lost, pod("p")]
    )
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")


def test_every_lost_replica_is_counted_and_the_longest_lost_named() -> None:
    model = make_model(**PINNED, replicas=3)
    pods = [
        _served("b", "2026-05-01T11:50:00Z"),
        _served("a", "2026-05-01T11:55:00Z"),
        _served("c", "2026-05-01T11:50:00Z"),
    ]
    status = _derive(model, deployment(replicas=3, ready=0), pods)
    degraded = _cond(status, ConditionType.DEGRADED)[2]
    assert degraded.startswith("pod b on node hx-llm-server-01: not ready since")
    assert degraded.endswith("; 2 more replicas that served not ready either")
    assert _cond(status, ConditionType.PROGRESSING)[2].startswith(
        "0/3 replicas ready, none loading: 3 replicas stopped being ready"
    )


def test_a_replica_on_a_node_that_says_it_is_not_ready_or_is_gone() -> None:
    """A node whose kubelet still reports says why itself (the pods' own
    status then reads as a failing probe); a node deleted is named so."""
    model = make_model(**PINNED)
    lost = _served("p1", "2026-05-01T11:58:00Z")
    sick = node("hx-llm-server-01", 4)
    sick["status"]["conditions"] = [
        {
            "type": "Ready",
            "status": "False",
            "reason": "KubeletNotReady",
            "message": "container runtime is down",
        }
    ]
    for nodes, said in (
        (
            [sick, *NODES[1:]],
            "node hx-llm-server-01 is NotReady (Ready=False, KubeletNotReady)",
        ),
        (NODES[1:], "node hx-llm-server-01 no longer exists"),
    ):
        status = derive_status(model, deployment(ready=0), [lost], nodes, NOW)
        assert _cond(status, ConditionType.DEGRADED) == (
            "True",
            "NodeNotReady",
            "pod p1 on node hx-llm-server-01: not ready since "
            f"2026-05-01T11:58:00Z; {said}",
        )


def test_a_node_message_that_counts_time_rewrites_nothing() -> None:
    """A kubelet that still reports NotReady says for how long in its message
    (PLEG): quoted, it changed the Degraded message, a status write, at every
    pass with nothing else changed. Its status and reason say enough."""
    model_of = model_body(**PINNED)
    lost = _served("p1", "2026-05-01T11:58:00Z")
    seen = set()
    for now, ago in (
        (NOW, "3m2.118s"),
        ("2026-05-01T12:02:00Z", "5m2.533s"),
        ("2026-05-01T12:04:00Z", "7m2.904s"),
    ):
        sick = node("hx-llm-server-01", 4)
        sick["status"]["conditions"] = [
            {
                "type": "Ready",
                "status": "False",
                "reason": "KubeletNotReady",
                "message": f"PLEG is not healthy: pleg was last seen active {ago} "
                "ago; threshold is 3m0s",
            }
        ]
        model = LLMModel.from_body(model_of)
        status = derive_status(
            model, deployment(ready=0), [lost], [sick, *NODES[1:]], now
        )
        assert now == NOW or status == model.status
        seen.add(_cond(status, ConditionType.DEGRADED))
        model_of["status"] = status.model_dump(
            by_alias=True, exclude_none=True, mode="json"
        )
    assert seen == {
        (
            "True",
            "NodeNotReady",
            "pod p1 on node hx-llm-server-01: not ready since 2026-05-01T11:58:00Z; "
            "node hx-llm-server-01 is NotReady (Ready=False, KubeletNotReady)",
        )
    }


def _served_crashing(state: dict[str, Any], restarts: int) -> dict[str, Any]:
    """A replica that served until its container was OOM-killed at 11:00, and
    has crash-looped since (not ready since then), its container in `state`."""
    body = _served("p1", "2026-05-01T11:00:00Z")
    body["status"]["containerStatuses"][0].update(
        restartCount=restarts, state=state, lastState={"terminated": OOM}
    )
    return body


def test_a_served_replica_that_crash_loops_does_not_flip_at_each_restart() -> None:
    """Waiting out a back-off, or just ended, its container is not running:
    read as a replica lost (ReplicaNotReady) then, and as loading while it ran
    again, Progressing flipped at every restart, a status write and an Event
    each. Restarting is loading, or a crash loop, throughout."""
    body = model_body(**PINNED)
    seen = set()
    for i, (state, at) in enumerate(
        [
            (BACK_OFF, "11:10:00"),
            ({"running": {"startedAt": "2026-05-01T11:15:00Z"}}, "11:15:05"),
            ({"terminated": OOM}, "11:19:00"),
            (BACK_OFF, "11:19:01"),
            ({"running": {"startedAt": "2026-05-01T11:24:00Z"}}, "11:24:05"),
        ]
    ):
        now = f"2026-05-01T{at}Z"
        pods = [_served_crashing(state, 5 + i)]
        model = LLMModel.from_body(body)
        status = derive_status(model, deployment(ready=0), pods, NODES, now)
        assert i == 0 or status == model.status
        assert lapse_due_in(pods, now) is None
        seen.add(
            (
                _cond(status, ConditionType.PROGRESSING)[:2],
                _cond(status, ConditionType.DEGRADED)[:2],
            )
        )
        body["status"] = status.model_dump(
            by_alias=True, exclude_none=True, mode="json"
        )
    assert seen == {(("True", "WaitingForReplicas"), ("True", "CrashLoopBackOff"))}


def test_a_replica_whose_container_is_made_again_is_loading_not_lost() -> None:
    """Its node back from a reboot, the kubelet makes the pod's sandbox and
    containers again (waiting ContainerCreating): a replica on its way back,
    not one lost, though the pod has not been ready for minutes."""
    model = make_model(**PINNED)
    back = _served("p1", "2026-05-01T11:58:00Z")
    back["status"]["containerStatuses"][0].update(
        ready=False, state={"waiting": {"reason": "ContainerCreating"}}
    )
    status = _derive(model, deployment(ready=0), [back])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert _cond(status, ConditionType.PROGRESSING)[:2] == (
        "True",
        "WaitingForReplicas",
    )
    assert lapse_due_in([back], NOW) is None


@pytest.mark.parametrize(
    "ended",
    [
        # containerd, for a container whose task was gone after a reboot.
        {"reason": "Unknown", "exitCode": 255},
        # The kubelet, for a container it could no longer find.
        {"reason": "ContainerStatusUnknown", "exitCode": 137},
    ],
    ids=["containerd", "kubelet"],
)
def test_a_restart_after_an_end_nobody_saw_is_no_crash(ended: dict[str, Any]) -> None:
    """Its node rebooted, the container runs again (vLLM loads) and its last
    end is one the runtime did not see: no crash loop, and no Warning."""
    model = make_model(**PINNED)
    rebooted = _restarted(
        {"running": {"startedAt": NOW}}, {**ended, "finishedAt": "2026-05-01T11:58:00Z"}
    )
    status = _derive(model, deployment(ready=0), [rebooted])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert _cond(status, ConditionType.PROGRESSING)[1] == "WaitingForReplicas"
    assert status.phase is Phase.PROGRESSING
    # Ended so now, before it is started again, likewise.
    ending = _restarted({"terminated": ended}, OOM)
    status = _derive(model, deployment(ready=0), [ending])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")


def _new_sandbox(restarts: int) -> dict[str, Any]:
    """A pod that served until 12:00:00, when its sandbox was made again (a
    runtime or network plugin restart): the kubelet killed its server's
    container, started at 09:00:01 (it reads `terminated`, exit code 137,
    not yet restarted), and runs the init container again (it downloads)."""
    since = "2026-05-01T12:00:00Z"
    body = _served("p1", since)
    body["status"]["phase"] = "Pending"
    conditions = body["status"]["conditions"]
    initialized = next(c for c in conditions if c["type"] == "Initialized")
    initialized.update(
        status="False",
        lastTransitionTime=since,
        reason="ContainersNotInitialized",
        message=f"containers with incomplete status: [{INIT}]",
    )
    body["status"]["initContainerStatuses"] = [
        {
            "name": INIT,
            "ready": False,
            "restartCount": 1,
            "state": {"running": {"startedAt": since}},
            "lastState": {"terminated": {"reason": "Completed", "exitCode": 0}},
        }
    ]
    body["status"]["containerStatuses"][0].update(
        restartCount=restarts,
        state={
            "terminated": {
                "reason": "Error",
                "exitCode": 137,
                "startedAt": "2026-05-01T09:00:01Z",
                "finishedAt": since,
            }
        },
        lastState={"terminated": OOM} if restarts else {},
    )
    return body


NEW_SANDBOX_NOW = "2026-05-01T12:02:00Z"


@pytest.mark.parametrize("restarts", [0, 2], ids=["never restarted", "restarted"])
def test_a_server_killed_for_a_new_sandbox_is_no_crash(restarts: int) -> None:
    """Its init container runs again for minutes meanwhile: the model loads,
    it is not Degraded (a Warning) for a crash loop. The rule that reads an
    init container just ended (Init:Error) is for init containers alone, and
    a container that served since it last started is none."""
    model = make_model(**PINNED)
    status = derive_status(
        model, deployment(ready=0), [_new_sandbox(restarts)], NODES, NEW_SANDBOX_NOW
    )
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert _cond(status, ConditionType.PROGRESSING)[1] == "WaitingForReplicas"
    assert status.phase is Phase.PROGRESSING


def _with_sidecar(body: dict[str, Any], sidecar: dict[str, Any]) -> dict[str, Any]:
    """`body` with a sidecar, `mesh-proxy` (an init container that keeps
    running, `restartPolicy: Always`), in the state, restart count and last
    state `sidecar`."""
    body["spec"]["initContainers"] = [
        {"name": "mesh-proxy", "image": "proxy:1", "restartPolicy": "Always"}
    ]
    body["status"]["initContainerStatuses"] = [
        {"name": "mesh-proxy", "ready": False, "restartCount": 0, **sidecar}
    ]
    return body


def test_a_sidecar_is_read_as_a_container_that_runs_beside_the_server() -> None:
    """A sidecar runs for as long as the pod does: running since before, it
    leaves a lost replica lost; started again since, the replica is
    restarting; ended before any restart, it is no crash yet, as the server's
    own container would not be (an init container's first end would be)."""
    model = make_model(**PINNED)
    since = "2026-05-01T11:58:00Z"
    before = {"state": {"running": {"startedAt": "2026-05-01T09:00:00Z"}}}
    lost = _with_sidecar(_served("p1", since, node_down=True), before)
    status = _derive(model, deployment(ready=0), [lost])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("True", "NodeNotReady")
    # Its node rebooted: its last end is one nobody saw, no crash.
    restarted = {
        "state": {"running": {"startedAt": "2026-05-01T11:58:05Z"}},
        "restartCount": 1,
        "lastState": {"terminated": {"reason": "Unknown", "exitCode": 255}},
    }
    back = _with_sidecar(_served("p1", since), restarted)
    status = _derive(model, deployment(ready=0), [back])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert _cond(status, ConditionType.PROGRESSING)[1] == "WaitingForReplicas"
    killed = {"state": {"terminated": {"reason": "Error", "exitCode": 137}}}
    ended = _with_sidecar(_served("p1", since), killed)
    status = _derive(model, deployment(ready=0), [ended])
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert _cond(status, ConditionType.PROGRESSING)[1] == "WaitingForReplicas"
    # One that crash-loops is named, as any init container.
    looping = {**killed, "restartCount": 3}
    status = _derive(
        model, deployment(ready=0), [_with_sidecar(_served("p1", since), looping)]
    )
    assert _cond(status, ConditionType.DEGRADED) == (
        "True",
        "CrashLoopBackOff",
        "pod p1, init container mesh-proxy: CrashLoopBackOff last exit: Error "
        "(exit code 137)",
    )


def _follow(
    steps: list[tuple[str, list[dict[str, Any]], dict[str, Any]]],
) -> list[tuple[str, str, str]]:
    """The Degraded condition at each of `steps` (a time, the pods and the
    Deployment then), each status fed back as the model's, as the
    reconciler does."""
    body = model_body(**PINNED)
    seen = []
    for now, pods, deploy in steps:
        model = LLMModel.from_body(body)
        status = derive_status(model, deploy, pods, NODES, now)
        seen.append(_cond(status, ConditionType.DEGRADED))
        body["status"] = status.model_dump(
            by_alias=True, exclude_none=True, mode="json"
        )
    return seen


SANDBOX_GONE = "2026-05-01T12:00:00Z"
KILLED = {
    "reason": "Error",
    "exitCode": 137,
    "startedAt": "2026-05-01T09:00:01Z",
    "finishedAt": SANDBOX_GONE,
}


def _in_new_sandbox(signal: str, started: str) -> dict[str, Any]:
    """The pod of `_new_sandbox(0)` once its server's container runs again in
    the new sandbox since `started`, restarted twice (once last week), its
    last state the kill: with `signal` PodReadyToStartContainers, a pod
    without init containers whose sandbox condition turned True again at
    12:00:02; with Initialized, one whose init container ran again until
    12:02:30, on a kubelet without a sandbox condition (before 1.25)."""
    body = _new_sandbox(0)
    body["status"]["phase"] = "Running"
    conditions = body["status"]["conditions"]
    for cond in conditions:
        if cond["type"] == "PodReadyToStartContainers":
            cond["lastTransitionTime"] = "2026-05-01T12:00:02Z"
        if cond["type"] == "Initialized":
            cond.update(status="True", lastTransitionTime=STARTED)
    if signal == "Initialized":
        body["status"]["conditions"] = [
            c for c in conditions if c["type"] != "PodReadyToStartContainers"
        ]
        init = next(c for c in conditions if c["type"] == "Initialized")
        init["lastTransitionTime"] = "2026-05-01T12:02:30Z"
        body["status"]["initContainerStatuses"][0].update(
            ready=True,
            state={"terminated": {"reason": "Completed", "exitCode": 0}},
        )
    else:
        del body["status"]["initContainerStatuses"]
    body["status"]["containerStatuses"][0].update(
        restartCount=2,
        state={"running": {"startedAt": started}},
        lastState={"terminated": KILLED},
    )
    return body


@pytest.mark.parametrize("signal", ["PodReadyToStartContainers", "Initialized"])
def test_a_server_started_again_in_a_new_sandbox_is_no_crash(signal: str) -> None:
    """Once the kubelet starts the server again in the new sandbox, it has
    restarted again and its last state is the kill: read as a crash, the model
    was Degraded/CrashLoopBackOff, a Warning, for the whole reload. The
    sandbox's condition (or Initialized, where init containers ran again)
    changed after that end: no crash. One in the new sandbox still is."""
    started = "2026-05-01T12:02:31Z"
    loading = _in_new_sandbox(signal, started)
    ready = copy.deepcopy(loading)
    for cond in ready["status"]["conditions"]:
        if cond["type"] in ("Ready", "ContainersReady"):
            cond.update(status="True", lastTransitionTime="2026-05-01T12:06:40Z")
    ready["status"]["containerStatuses"][0]["ready"] = True
    seen = _follow(
        [
            (
                "2026-05-01T11:59:00Z",
                [_served("p1", "2026-05-01T09:04:00Z")],
                deployment(),
            ),
            ("2026-05-01T12:00:05Z", [_new_sandbox(0)], deployment(ready=0)),
            ("2026-05-01T12:02:35Z", [loading], deployment(ready=0)),
            ("2026-05-01T12:05:00Z", [loading], deployment(ready=0)),
            ("2026-05-01T12:06:41Z", [ready], deployment()),
        ]
    )
    assert {degraded[:2] for degraded in seen} == {("False", "AsExpected")}
    # It crashes in the new sandbox: that end is later than the sandbox.
    crashed = copy.deepcopy(loading)
    crashed["status"]["containerStatuses"][0].update(
        restartCount=3,
        state={"running": {"startedAt": "2026-05-01T12:03:10Z"}},
        lastState={"terminated": {**OOM, "finishedAt": "2026-05-01T12:03:00Z"}},
    )
    status = derive_status(
        make_model(**PINNED), deployment(ready=0), [crashed], NODES, NOW
    )
    assert _cond(status, ConditionType.DEGRADED) == (
        "True",
        "CrashLoopBackOff",
        "pod p1, container vllm: CrashLoopBackOff last exit: OOMKilled (exit code 137)",
    )


def test_an_init_container_killed_for_a_new_sandbox_is_no_crash() -> None:
    """A new sandbox kills the init container mid-download (exit code 137,
    not yet restarted: what reads as `Init:Error`), then runs it again: the
    sandbox's condition turned False then, and True again once made."""
    gone = {
        "type": "PodReadyToStartContainers",
        "status": "False",
        "lastTransitionTime": SANDBOX_GONE,
    }
    back = {**gone, "status": "True", "lastTransitionTime": "2026-05-01T12:00:02Z"}
    killed = {"reason": "Error", "exitCode": 137, "finishedAt": SANDBOX_GONE}

    def fetching(init: dict[str, Any], sandbox: dict[str, Any]) -> dict[str, Any]:
        body = _initializing(init)
        body["status"]["conditions"].append(sandbox)
        return body

    seen = _follow(
        [
            (
                "2026-05-01T12:00:01Z",
                [fetching({"state": {"terminated": killed}}, gone)],
                deployment(ready=0),
            ),
            (
                "2026-05-01T12:00:05Z",
                [
                    fetching(
                        {
                            "state": {"running": {"startedAt": "2026-05-01T12:00:03Z"}},
                            "restartCount": 1,
                            "lastState": {"terminated": killed},
                        },
                        back,
                    )
                ],
                deployment(ready=0),
            ),
        ]
    )
    assert {degraded[:2] for degraded in seen} == {("False", "AsExpected")}


def test_a_server_that_exits_0_at_each_start_is_one_crash_loop() -> None:
    """The kubelet backs off restarting a container that exits 0 as one that
    fails (kubectl: Completed, then CrashLoopBackOff): read as no crash while
    it ran again, and with the back-off's doubling wait in the message, the
    status was rewritten at every restart, a Warning and a Normal Event each."""
    steps = []
    for i, back_off in enumerate((10, 20, 40, 80)):
        ended = {"reason": "Completed", "exitCode": 0}
        waiting = {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": f"back-off {back_off}s restarting failed container=vllm "
                "pod=p1_llm(uid)",
            }
        }
        for state in (waiting, RUNNING):
            body = _restarted(state, ended)
            body["status"]["containerStatuses"][0]["restartCount"] = i + 1
            steps.append((NOW, [body], deployment(ready=0)))
    assert set(_follow(steps)) == {
        (
            "True",
            "CrashLoopBackOff",
            "pod p1, container vllm: CrashLoopBackOff last exit: Completed "
            "(exit code 0)",
        )
    }


def test_a_crash_loop_message_leaves_out_the_back_off() -> None:
    """Without a last end to name, the kubelet's message, less its wait, which
    doubles at every restart and rewrote the status at each."""
    unknown = []
    for back_off in (10, 20):
        message = (
            f"back-off {back_off}s restarting failed container=vllm pod=p1_llm(uid)"
        )
        body = _restarted(
            {"waiting": {"reason": "CrashLoopBackOff", "message": message}}, {}
        )
        del body["status"]["containerStatuses"][0]["lastState"]
        unknown.append((NOW, [body], deployment(ready=0)))
    assert set(_follow(unknown)) == {
        (
            "True",
            "CrashLoopBackOff",
            "pod p1, container vllm: CrashLoopBackOff restarting failed "
            "container=vllm pod=p1_llm(uid)",
        )
    }


def test_a_sidecar_that_crash_loops_is_one_crash_loop_ready_or_not() -> None:
    """A sidecar without a readiness probe makes its pod ready as soon as it
    runs: read only while the pod was not ready, its crash loop flipped the
    model Degraded and back at every restart. It is one crash loop while the
    kubelet backs off its restarts, until it has run for 10 minutes."""
    crash_at = "2026-05-01T12:00:00Z"
    last = {
        "reason": "Error",
        "exitCode": 1,
        "startedAt": "2026-05-01T11:59:20Z",
        "finishedAt": crash_at,
    }

    def served(ready: bool, sidecar: dict[str, Any]) -> dict[str, Any]:
        body = _with_sidecar(_served("p1", crash_at), sidecar)
        if ready:
            for cond in body["status"]["conditions"]:
                if cond["type"] in ("Ready", "ContainersReady"):
                    cond.update(
                        status="True", lastTransitionTime="2026-05-01T12:00:10Z"
                    )
                    cond.pop("reason")
                    cond.pop("message")
            body["status"]["containerStatuses"][0]["ready"] = True
        return body

    backing_off = {
        "state": {
            "waiting": {
                "reason": "CrashLoopBackOff",
                "message": "back-off 10s restarting failed container=mesh-proxy",
            }
        },
        "restartCount": 3,
        "lastState": {"terminated": last},
    }
    running = {
        "state": {"running": {"startedAt": "2026-05-01T12:00:10Z"}},
        "ready": True,
        "restartCount": 4,
        "lastState": {"terminated": last},
    }
    seen = _follow(
        [
            ("2026-05-01T12:00:01Z", [served(False, backing_off)], deployment(ready=0)),
            ("2026-05-01T12:00:11Z", [served(True, running)], deployment()),
            ("2026-05-01T12:09:00Z", [served(True, running)], deployment()),
        ]
    )
    assert set(seen) == {
        (
            "True",
            "CrashLoopBackOff",
            "pod p1, init container mesh-proxy: CrashLoopBackOff last exit: Error "
            "(exit code 1)",
        )
    }
    # Ten minutes running since: the kubelet has forgotten its back-off.
    status = derive_status(
        make_model(**PINNED),
        deployment(),
        [served(True, running)],
        NODES,
        "2026-05-01T12:10:10Z",
    )
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert status.phase is Phase.READY


def _serving_with_sidecar(sidecar: dict[str, Any]) -> dict[str, Any]:
    """A replica ready since 09:04, its sandbox made at 09:00, with a sidecar
    without a readiness probe (ready whenever it runs) in `sidecar`."""
    body = _with_sidecar(_served("p1", "2026-05-01T09:04:00Z"), sidecar)
    for cond in body["status"]["conditions"]:
        if cond["type"] in ("Ready", "ContainersReady"):
            cond.update(status="True")
            cond.pop("reason", None)
            cond.pop("message", None)
        if cond["type"] == "PodReadyToStartContainers":
            cond["lastTransitionTime"] = STARTED
    body["status"]["containerStatuses"][0]["ready"] = True
    body["status"]["initContainerStatuses"][0]["ready"] = True
    return body


SIDECAR_OOM = {
    "reason": "OOMKilled",
    "exitCode": 137,
    "startedAt": "2026-05-01T09:00:00Z",
    "finishedAt": "2026-05-01T12:00:00Z",
}


def test_one_sidecar_restart_is_no_crash_loop() -> None:
    """The kubelet restarts a sidecar at once after its first end (OOM-killed
    once after hours), and backs off only from its second: read as a crash
    loop for SIDECAR_LOOP_SECONDS, one restart made the model Degraded, a
    Warning, for ten minutes with every replica serving. Nor is an end after
    a run that long: the kubelet had forgotten the back-off."""
    once = {
        "state": {"running": {"startedAt": "2026-05-01T12:00:01Z"}},
        "restartCount": 1,
        "lastState": {"terminated": SIDECAR_OOM},
    }
    again_next_day = {
        "state": {"running": {"startedAt": "2026-05-02T12:00:01Z"}},
        "restartCount": 2,
        "lastState": {
            "terminated": {
                **SIDECAR_OOM,
                "startedAt": "2026-05-01T12:00:01Z",
                "finishedAt": "2026-05-02T12:00:00Z",
            }
        },
    }
    for sidecar, day in ((once, "2026-05-01"), (again_next_day, "2026-05-02")):
        pods = [_serving_with_sidecar(sidecar)]
        for at in ("12:00:03", "12:09:00"):
            now = f"{day}T{at}Z"
            status = derive_status(make_model(**PINNED), deployment(), pods, NODES, now)
            assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
            assert status.phase is Phase.READY
            assert lapse_due_in(pods, now) is None


def test_a_sidecar_crash_loop_is_refreshed_away_when_its_back_off_lapses() -> None:
    """Ended twice within a minute, the sidecar was backed off: a crash loop
    until it has run for SIDECAR_LOOP_SECONDS. Its pod is ready throughout
    and nothing in the cluster changes when that time is over: lapse_due_in
    asks for the refresh that turns the model back."""
    last = {
        "reason": "Error",
        "exitCode": 1,
        "startedAt": "2026-05-01T11:59:40Z",
        "finishedAt": "2026-05-01T12:00:00Z",
    }
    looped = {
        "state": {"running": {"startedAt": "2026-05-01T12:00:10Z"}},
        "restartCount": 2,
        "lastState": {"terminated": last},
    }
    pods = [_serving_with_sidecar(looped)]
    now = "2026-05-01T12:05:10Z"
    status = derive_status(make_model(**PINNED), deployment(), pods, NODES, now)
    assert _cond(status, ConditionType.DEGRADED) == (
        "True",
        "CrashLoopBackOff",
        "pod p1, init container mesh-proxy: CrashLoopBackOff last exit: Error "
        "(exit code 1)",
    )
    assert lapse_due_in(pods, now) == SIDECAR_LOOP_SECONDS - 300
    # A lost replica's grace that ends first comes first.
    lost = _served("p2", "2026-05-01T12:05:00Z")
    assert lapse_due_in([*pods, lost], now) == NOT_READY_GRACE_SECONDS - 10
    over = _after(now, 300)
    status = derive_status(make_model(**PINNED), deployment(), pods, NODES, over)
    assert _cond(status, ConditionType.DEGRADED)[:2] == ("False", "AsExpected")
    assert status.phase is Phase.READY
    assert lapse_due_in(pods, over) is None


def _loading_with_sidecar(
    server: dict[str, Any], sidecar: dict[str, Any], initialized: str
) -> dict[str, Any]:
    """A new pod (sandbox made at 11:55) whose server loads, not yet
    `started`, beside the sidecar `mesh-proxy` in `sidecar`; Initialized last
    changed at `initialized`, as a kubelet from 1.29 moves it at a sidecar's
    restart until the server has started."""
    body = _with_sidecar(_served("p1", "2026-05-01T11:55:00Z"), sidecar)
    for cond in body["status"]["conditions"]:
        if cond["type"] == "PodReadyToStartContainers":
            cond["lastTransitionTime"] = "2026-05-01T11:55:00Z"
        if cond["type"] == "Initialized":
            cond["lastTransitionTime"] = initialized
    body["status"]["containerStatuses"][0].update(started=False, **server)
    return body


def test_a_sidecar_restart_during_the_load_is_no_new_sandbox() -> None:
    """From Kubernetes 1.29 the kubelet reads Initialized from the sidecars'
    `started` too until the server has started: a sidecar's restart while
    vLLM loads moves it, and nothing of the sandbox. Read as a new sandbox,
    one sidecar OOM kill hid the server's crash loop, and a sidecar's own
    crash loop was no crash at each of its ends."""
    server_loop = {
        "restartCount": 3,
        "state": {"running": {"startedAt": "2026-05-01T12:07:36Z"}},
        "lastState": {
            "terminated": {
                "reason": "Error",
                "exitCode": 1,
                "startedAt": "2026-05-01T12:05:49Z",
                "finishedAt": "2026-05-01T12:07:15Z",
            }
        },
    }
    sidecar_once = {
        "state": {"running": {"startedAt": "2026-05-01T12:08:01Z"}},
        "restartCount": 1,
        "lastState": {
            "terminated": {**SIDECAR_OOM, "finishedAt": "2026-05-01T12:08:00Z"}
        },
    }
    body = _loading_with_sidecar(server_loop, sidecar_once, "2026-05-01T12:08:01Z")
    status = derive_status(
        make_model(**PINNED), deployment(ready=0), [body], NODES, "2026-05-01T12:08:02Z"
    )
    assert _cond(status, ConditionType.DEGRADED) == (
        "True",
        "CrashLoopBackOff",
        "pod p1, container vllm: CrashLoopBackOff last exit: Error (exit code 1)",
    )
    # The sidecar ends a second time, 20 s after its restart: Initialized
    # turned False then.
    loading = {"restartCount": 0, "state": {"running": {"startedAt": STARTED}}}
    ended = {
        "reason": "Error",
        "exitCode": 1,
        "startedAt": "2026-05-01T12:08:01Z",
        "finishedAt": "2026-05-01T12:08:21Z",
    }
    sidecar_again = {"state": {"terminated": ended}, "restartCount": 1}
    body = _loading_with_sidecar(loading, sidecar_again, "2026-05-01T12:08:21Z")
    status = derive_status(
        make_model(**PINNED), deployment(ready=0), [body], NODES, "2026-05-01T12:08:22Z"
    )
    assert _cond(status, ConditionType.DEGRADED) == (
        "True",
        "CrashLoopBackOff",
        "pod p1, init container mesh-proxy: CrashLoopBackOff last exit: Error "
        "(exit code 1)",
    )


@pytest.mark.parametrize(
    "ended",
    [OOM, {"reason": "Completed", "exitCode": 0}, {"reason": "Error", "exitCode": 137}],
    ids=["oom", "exit 0", "killed"],
)
def test_one_server_restart_is_a_reload_until_its_second_end(
    ended: dict[str, Any],
) -> None:
    """The kubelet restarts a server at once after its first end, whatever
    its exit code: read as a crash loop, one restart made the model Degraded,
    a Warning and a page, for the whole reload (minutes for a large model).
    Its second end is one, through the back-off and every reload after; and
    once the back-off has been seen, the reload after it too."""
    said = f"last exit: {ended['reason']} (exit code {ended['exitCode']})"
    back_off = {
        "waiting": {
            "reason": "CrashLoopBackOff",
            "message": "back-off 10s restarting failed container=vllm pod=p1",
        }
    }
    steps = []
    for restarts, state in (
        (1, RUNNING),
        (1, {"terminated": ended}),
        (1, back_off),
        (2, RUNNING),
    ):
        body = _restarted(state, ended)
        body["status"]["containerStatuses"][0]["restartCount"] = restarts
        steps.append((NOW, [body], deployment(ready=0)))
    seen = _follow(steps)
    assert seen[0] == ("False", "AsExpected", "no replica is failing")
    loop = (
        "True",
        "CrashLoopBackOff",
        f"pod p1, container vllm: CrashLoopBackOff {said}",
    )
    assert seen[1:] == [loop] * 3
    # The kubelet backed off its first end (kubectl: CrashLoopBackOff with no
    # restart yet): the reload after it stays a crash loop.
    waited = _restarted(back_off, {})
    waited["status"]["containerStatuses"][0].update(restartCount=0, lastState={})
    reload = _restarted(RUNNING, ended)
    reload["status"]["containerStatuses"][0]["restartCount"] = 1
    seen = _follow(
        [(NOW, [waited], deployment(ready=0)), (NOW, [reload], deployment(ready=0))]
    )
    assert [degraded[:2] for degraded in seen] == [("True", "CrashLoopBackOff")] * 2


def test_a_restart_after_a_long_run_is_a_reload_whatever_the_count() -> None:
    """The restart count spans the pod's life (a reboot last week, an OOM kill
    a month ago): after a run that outlasted any back-off the kubelet restarts
    the server at once, a reload, not the second end of a loop. A short run
    that ended the same way still is one."""
    long_run = {**OOM, "startedAt": "2026-04-28T12:00:00Z", "finishedAt": NOW}
    short_run = {**OOM, "startedAt": "2026-05-01T11:58:00Z", "finishedAt": NOW}
    for ended, ready_changed, verdict in (
        # Served during the long run: Ready turned False at its end.
        (long_run, NOW, ("False", "AsExpected")),
        (short_run, NOW, ("True", "CrashLoopBackOff")),
        # A run as long that never served (a startup probe's kill after 30
        # minutes: the kubelet never backs it off) is a loop all the same.
        (long_run, "2026-04-01T00:00:00Z", ("True", "CrashLoopBackOff")),
    ):
        body = _restarted(RUNNING, ended)  # restartCount 3
        ready = {"type": "Ready", "status": "False"}
        body["status"]["conditions"] = [{**ready, "lastTransitionTime": ready_changed}]
        seen = _follow([(NOW, [body], deployment(ready=0))])
        assert seen[0][:2] == verdict


def test_a_null_message_is_no_message() -> None:
    """A message the API returns as null was written as `None`."""
    model = make_model(**PINNED)
    stuck = pod("p1", node_name=None, unschedulable="x")
    stuck["status"]["conditions"][0]["message"] = None
    status = _derive(model, deployment(ready=0), [stuck])
    assert _cond(status, ConditionType.SCHEDULED)[:2] == ("False", "Unschedulable")
    assert "None" not in _cond(status, ConditionType.SCHEDULED)[2]
    assert _cond(status, ConditionType.SCHEDULED)[2].endswith(": Unschedulable")
    failed = _failed_pod("p-old", "Evicted", "")
    failed["status"]["message"] = None
    status = _derive(model, deployment(ready=0), [failed])
    assert _cond(status, ConditionType.DEGRADED) == ("True", "Evicted", "pod p-old")
    stalled = deployment(ready=0)
    stalled["status"]["conditions"] = [
        {
            "type": "Progressing",
            "status": "False",
            "reason": "ProgressDeadlineExceeded",
            "message": None,
        }
    ]
    status = _derive(model, stalled, [])
    assert _cond(status, ConditionType.PROGRESSING) == (
        "False",
        "ProgressDeadlineExceeded",
        "",
    )


@pytest.mark.parametrize(
    "odd",
    [
        "pod status",
        "pod labels",
        "node status",
        "deployment status",
        "deployment counts",
    ],
)
def test_fields_the_api_returns_as_null_are_read_as_absent(odd: str) -> None:
    """An object may carry null where a field is unset: read with `.get(key,
    default)`, it raised, and the model's status was never written."""
    served = _served("p1", "2026-05-01T09:04:00Z")
    served["metadata"]["labels"]["pod-template-hash"] = "abc"
    nodes = [node(n["metadata"]["name"], 4) for n in NODES]
    deploy = deployment(ready=0)
    if odd == "pod status":
        served["status"] = None
    elif odd == "pod labels":
        served["metadata"]["labels"] = None
    elif odd == "node status":
        nodes[0]["status"] = None
    elif odd == "deployment status":
        deploy["status"] = None
    else:
        deploy["status"].update(replicas=None, updatedReplicas=None, readyReplicas=None)
    model = make_model(replicas=1, placement={"nodeName": "hx-llm-server-01"})
    status = derive_status(model, deploy, [served], nodes, NOW)
    assert status.replicas.ready == 0
    assert _cond(status, ConditionType.DEGRADED)[0] in ("True", "False")
