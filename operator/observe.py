"""Derives an LLMModel's status from what the cluster reports.

A pure function of the model, its Deployment, its pods and the nodes, so every case
(unschedulable, unknown node, too few GPUs, crash loops, rollouts) is unit-tested
without a cluster. docs/concepts.md lists every reason produced here.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any, Literal

from citadel.operator import names
from citadel.operator.builders.common import label_selector
from citadel.operator.builders.deployment import node_selector
from citadel.operator.model import LLMModel
from citadel.operator.status import (
    MAX_NODES,
    MESSAGE_MAX_LENGTH,
    REASON_MAX_LENGTH,
    REASON_PATTERN,
    Condition,
    ConditionType,
    LLMModelStatus,
    Phase,
    ReplicaCounts,
)

Obj = Mapping[str, Any]
CondStatus = Literal["True", "False", "Unknown"]

# Waiting reasons of a container that will not fix themselves: the kubelet's
# image, container-creation and hook errors (pkg/kubelet/images/types.go,
# pkg/kubelet/container/sync_result.go) and its crash-loop back-off.
BAD_WAITING = frozenset(
    {
        "CrashLoopBackOff",
        "ImagePullBackOff",
        "ErrImagePull",
        "ErrImageNeverPull",
        "InvalidImageName",
        "ImageInspectError",
        "SignatureValidationFailed",
        "CreateContainerConfigError",
        "CreateContainerError",
        "RunContainerError",
        "PreCreateHookError",
        "PostStartHookError",
    }
)
# Scheduled=False reasons that need a change to the spec or the cluster (where
# nodes are autoscaled, only for a model pinned to one node: _permanent).
PERMANENT_PLACEMENT = frozenset({"NodeNotFound", "NoMatchingNode", "InsufficientGPUs"})
# The PodScheduled=False reason the API server gives a pod created with
# scheduling gates (spec.schedulingGates), and the Scheduled=False reason of a
# model whose pods wait for theirs: a queue such as Kueue holds them until it
# admits them, and no scheduler tries them before. A wait, not a failure.
SCHEDULING_GATED = "SchedulingGated"
# The kubelet alternates these two waiting reasons at every retry of a pull
# that fails: the pull's error, then the back-off before the next try
# (pkg/kubelet/images/image_manager.go). Both are reported as the second.
PULL_ERROR = "ErrImagePull"
PULL_BACK_OFF = "ImagePullBackOff"
MAX_LISTED = 5
# The Degraded reason of a pod the kubelet refused for want of a resource whose
# name does not fit a condition's reason: `OutOf` and the resource's name
# (pkg/kubelet/lifecycle/predicate.go), `OutOfnvidia.com/gpu` for a GPU.
OUT_OF_RESOURCE = "OutOfResource"
# How long a replica that has served may stay not ready before the model is
# Degraded for it (NodeNotReady, ReplicaNotReady), read from when the pod's
# Ready condition last changed: no state of the operator's own, so every
# replica of the operator, and one just restarted, says the same. The
# readiness probe (every 5 s, 3 failures: builders/deployment.py) takes 15 s to
# mark a replica not ready and one answer to mark it ready again, so a stall it
# catches (a slow /health under a burst of long prompts) is over well within a
# minute; past that, capacity is lost: a NotReady node, a server that no longer
# answers. Until then the replica reads as loading, as before it first served.
NOT_READY_GRACE_SECONDS = 60
# The Degraded reasons of a replica that served and is no longer ready: on a
# node that is not Ready (or gone), or for another reason (its readiness
# probe). They stand in Progressing too while no replica is loading.
NODE_NOT_READY = "NodeNotReady"
REPLICA_NOT_READY = "ReplicaNotReady"
# The reasons of a container's end that nobody saw: containerd's for a
# container whose task it lost (a node reboot, its own state gone:
# pkg/cri/server/restart.go, exit code 255), and the kubelet's for one it can
# no longer find (kubelet_pods.go, exit code 137). Neither says it crashed.
UNSEEN_END = frozenset({"Unknown", "ContainerStatusUnknown"})
# The pod conditions that turn False when the kubelet finds a pod's sandbox
# gone and True once it has made a new one: PodReadyToStartContainers
# (Kubernetes 1.29 on, by default from 1.30, the chart's minimum), PodHasNetwork
# before it (1.25 to 1.28, alpha).
SANDBOX_CONDITIONS = ("PodReadyToStartContainers", "PodHasNetwork")
# How long a sidecar the kubelet backed off must run before it is past a crash
# loop, and how long a run must have lasted for its end to be restarted at
# once. A sidecar without a readiness probe turns its pod ready as soon as it
# runs, so readiness tells nothing of it: read by it, one that crash-loops
# flipped the model Degraded and back at every restart. The kubelet forgets a
# container's back-off once it has run for twice the maximum back-off of 300 s
# (flowcontrol.Backoff, pkg/kubelet/kuberuntime: doBackOff) and restarts it at
# once at its next end: until then it still counts the restarts as a loop.
SIDECAR_LOOP_SECONDS = 600
# The restart count from which a container running again (or waiting for
# anything but the back-off) is read as in a crash loop. The kubelet restarts a
# container at once after its first end and backs off only from its second
# (flowcontrol.Backoff has no entry for it before), so one restart is a crash
# or an OOM kill, not yet a loop: read as one, a single restart made the model
# Degraded, a Warning, for the whole reload (minutes for a large model), and a
# sidecar's for SIDECAR_LOOP_SECONDS with every replica serving.
LOOP_RESTARTS = 2
# The kubelet's CrashLoopBackOff message starts with the back-off it waits out
# ("back-off 40s restarting failed container=..."), which doubles at every
# restart: copied, it rewrote the status at each.
BACK_OFF_PREFIX = re.compile(r"^back-off \S+ ")


@dataclass(frozen=True)
class Verdict:
    """One condition's outcome before timestamps are attached."""

    status: CondStatus
    reason: str
    message: str


@dataclass(frozen=True)
class Blocker:
    """A problem found by the operator itself, such as a served name already taken;
    it makes the model Failed and not Ready."""

    reason: str
    message: str


def _gpus(node: Obj) -> int:
    status = node.get("status") or {}
    raw = (status.get("allocatable") or {}).get(names.GPU_RESOURCE, "0")
    try:
        return int(str(raw))
    except ValueError:
        return 0


def _listing(items: Sequence[str]) -> str:
    shown = ", ".join(items[:MAX_LISTED])
    return shown + (
        f" and {len(items) - MAX_LISTED} more" if len(items) > MAX_LISTED else ""
    )


def check_placement(model: LLMModel, nodes: Sequence[Obj]) -> Verdict | None:
    """What the operator can tell before the scheduler: the target node is missing,
    no node carries the labels, or no candidate has enough allocatable GPUs."""
    placement = model.spec.placement
    candidates = list(nodes)
    if placement.node_name is not None:
        candidates = [n for n in nodes if n["metadata"]["name"] == placement.node_name]
        if not candidates:
            known = sorted(n["metadata"]["name"] for n in nodes)
            return Verdict(
                "False",
                "NodeNotFound",
                f"placement.nodeName: node {placement.node_name!r} does not exist "
                f"(nodes: {_listing(known) or 'none'})",
            )
    wanted = node_selector(model)
    if wanted:
        candidates = [
            n
            for n in candidates
            if all(
                (n["metadata"].get("labels") or {}).get(k) == v
                for k, v in wanted.items()
            )
        ]
        if not candidates:
            text = ", ".join(f"{k}={v}" for k, v in sorted(wanted.items()))
            return Verdict("False", "NoMatchingNode", f"no node has the labels {text}")
    gpus = model.spec.resources.gpus
    if gpus > 0 and candidates and max(_gpus(n) for n in candidates) < gpus:
        have = _listing([f"{n['metadata']['name']} has {_gpus(n)}" for n in candidates])
        return Verdict(
            "False",
            "InsufficientGPUs",
            f"resources.gpus asks for {gpus} {names.GPU_RESOURCE} per replica, more "
            f"than any candidate node can allocate ({have})",
        )
    return None


def _live(pods: Sequence[Obj]) -> list[Obj]:
    return [p for p in pods if not p.get("metadata", {}).get("deletionTimestamp")]


def _ended(pod: Obj) -> bool:
    """A pod that will not run again (Failed or Succeeded): its ReplicaSet has
    made another, and the object stays until someone or the pod GC deletes it."""
    return (pod.get("status") or {}).get("phase") in ("Failed", "Succeeded")


def _condition(obj: Obj, kind: str) -> Obj | None:
    """`obj`'s (a pod's, a node's) status condition of type `kind`, if any."""
    for cond in (obj.get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return None


def _gates(pod: Obj) -> list[str]:
    """The names of the scheduling gates that hold `pod` back."""
    gates = pod.get("spec", {}).get("schedulingGates") or []
    return [str(gate.get("name", "")) for gate in gates]


def _gated(pod: Obj) -> bool:
    """Whether `pod` waits for its scheduling gates, or for the scheduler's
    first try since they were removed (the condition still says so)."""
    if pod.get("spec", {}).get("nodeName"):
        return False
    cond = _condition(pod, "PodScheduled") or {}
    held = (cond.get("status"), cond.get("reason")) == ("False", SCHEDULING_GATED)
    return held or bool(_gates(pod))


def _unschedulable(pods: Sequence[Obj]) -> list[tuple[str, str]]:
    """The pods the scheduler tried and could not place, with its message."""
    found = []
    for pod in pods:
        cond = _condition(pod, "PodScheduled")
        if cond and cond.get("status") == "False" and not _gated(pod):
            # The reason where there is no message (the scheduler writes one):
            # "cannot be placed: " with nothing after it said nothing.
            said = cond.get("message") or cond.get("reason") or "no reason given"
            found.append((pod["metadata"]["name"], str(said)))
    return found


def _created(pod: Obj) -> str:
    # RFC 3339 in UTC, whole seconds: ordered as strings.
    return str(pod.get("metadata", {}).get("creationTimestamp") or "")


def _is_ready(pod: Obj) -> bool:
    cond = _condition(pod, "Ready")
    return bool(cond and cond.get("status") == "True") and not _ended(pod)


def _has_served(pod: Obj) -> bool:
    """Whether `pod` is ready, or was since it started and is no longer.

    The kubelet's first status of a pod has Ready False, its transition time
    stamped just before Initialized's (kubelet/status/status_manager.go), and
    Initialized turns True then or once the init containers end. So a Ready
    whose last transition is later than Initialized's turned True in between
    and back: a readiness probe failing, the node controller marking the pods
    of a NotReady node, the pod failing. Times are whole seconds, so a pod
    ready and back within a second of starting reads as never ready, as does
    one whose init containers ran again (a new sandbox): the reading before
    this check.
    """
    if _is_ready(pod):
        return True
    ready = _condition(pod, "Ready") or {}
    initialized = _condition(pod, "Initialized") or {}
    since = str(initialized.get("lastTransitionTime") or "")
    return bool(since) and str(ready.get("lastTransitionTime") or "") > since


def _seconds(start: str, end: str) -> float | None:
    """Seconds from `start` to `end`, RFC 3339 times; None if either is not one."""
    try:
        delta = datetime.fromisoformat(end) - datetime.fromisoformat(start)
    except (TypeError, ValueError):
        return None
    return delta.total_seconds()


def _not_ready_since(pod: Obj) -> str | None:
    """When `pod`, a replica that has served, stopped being ready; None for a
    pod that is ready, has ended, has not been ready since its containers
    last started, or has a container not running now.

    A container started again since (a crash, a liveness probe's restart), or
    waiting or ended now (a crash loop's back-off, a new sandbox being made),
    loads the model again: loading, or a crash loop, not a replica lost. Read
    from the running containers alone, a crash-looping replica that once
    served flipped between lost (in its back-off) and loading (running again)
    at every restart, a status write and an Event each. The node lifecycle
    controller marks the pods of a NotReady node not ready without touching
    their containers' statuses, so theirs still read as running since before.
    Sidecars (init containers that keep running) count as the server does.
    """
    if _ended(pod) or _is_ready(pod) or not _has_served(pod):
        return None
    ready = _condition(pod, "Ready") or {}
    since = str(ready.get("lastTransitionTime") or "")
    for _, cs, once in _container_statuses(pod):
        if once:
            continue  # ran to completion before the pod first served
        started = ((cs.get("state") or {}).get("running") or {}).get("startedAt")
        if not started or str(started) >= since:
            return None
    return since


def _not_ready_for(pods: Sequence[Obj], now: str) -> list[tuple[str, float, Obj]]:
    """Each of `pods` that served and is not ready now (`_not_ready_since`),
    with since when and for how many seconds."""
    found = []
    for pod in pods:
        since = _not_ready_since(pod)
        elapsed = _seconds(since, now) if since else None
        if since and elapsed is not None:
            found.append((since, elapsed, pod))
    return found


def _lost(pods: Sequence[Obj], now: str) -> list[tuple[str, Obj]]:
    """The pods not ready for NOT_READY_GRACE_SECONDS since they served, each
    with when it stopped, longest first (then by name: the same pods always
    give the same message)."""
    found = [
        (since, pod)
        for since, elapsed, pod in _not_ready_for(pods, now)
        if elapsed >= NOT_READY_GRACE_SECONDS
    ]
    return sorted(found, key=lambda lost: (lost[0], lost[1]["metadata"]["name"]))


def lapse_due_in(pods: Sequence[Obj], now: str) -> float | None:
    """Seconds until the status may change with nothing in the cluster
    changing, the earliest of: the first replica that served and is not ready
    now has been so for NOT_READY_GRACE_SECONDS, when the status would turn
    Degraded for it (see `_lost`); a sidecar in a crash loop has run for
    SIDECAR_LOOP_SECONDS, when it is past it (see `_sidecar_loop_ends_in`).
    None when neither waits.

    Nothing in the cluster changes at those moments (a NotReady node's pods
    are marked once, a sidecar that keeps running writes nothing): without a
    refresh then, the status waited for the next event or periodic pass, up
    to a resync period late.
    """
    due = [
        NOT_READY_GRACE_SECONDS - elapsed
        for _, elapsed, _ in _not_ready_for(_live(pods), now)
        if elapsed < NOT_READY_GRACE_SECONDS
    ]
    loop = _sidecar_loop_ends_in(pods, now)
    if loop is not None:
        due.append(loop)
    return min(due) if due else None


def _node_trouble(name: str, nodes: Sequence[Obj]) -> str | None:
    """What is wrong with the node `name`: its Ready condition not True (with
    its status and reason), or no such node among `nodes` (none at
    all tells nothing); None if nothing is."""
    node = next((n for n in nodes if n["metadata"]["name"] == name), None)
    if node is None:
        return f"node {name} no longer exists" if nodes else None
    ready = _condition(node, "Ready")
    if ready is None or ready.get("status") == "True":
        return None
    # Not the condition's message: free text that may carry a duration the
    # kubelet counts ("PLEG ... last seen active 5m2.533s ago"), which made a
    # status write, the same verdict, at every pass.
    said = f"Ready={ready.get('status')}" + (
        f", {ready['reason']}" if ready.get("reason") else ""
    )
    return f"node {name} is NotReady ({said})"


def _lost_verdict(lost: Sequence[tuple[str, Obj]], nodes: Sequence[Obj]) -> Verdict:
    """Degraded for `lost` (see `_lost`, not empty), named by its first pod.

    The node lifecycle controller turns the pods of a node that stopped
    reporting `Ready=False` and leaves the rest of their status to the kubelet,
    which cannot write it: no reason on Ready, and ContainersReady still True.
    The kubelet itself never writes that pair, so it tells a NotReady node
    apart even when the node's own condition is not at hand.
    """
    since, pod = lost[0]
    name = pod["metadata"]["name"]
    node = str(pod.get("spec", {}).get("nodeName") or "")
    ready = _condition(pod, "Ready") or {}
    containers = _condition(pod, "ContainersReady") or {}
    marked = not ready.get("reason") and containers.get("status") == "True"
    trouble = _node_trouble(node, nodes) if node else None
    if trouble is None and marked:
        trouble = "marked not ready by the node lifecycle controller"
    said = ": ".join(str(ready[key]) for key in ("reason", "message") if ready.get(key))
    message = f"pod {name} on node {node or '(none)'}: not ready since {since}" + (
        f"; {trouble}" if trouble else f" ({said})" if said else ""
    )
    more = len(lost) - 1
    if more:
        message += f"; {more} more " + ("replica" if more == 1 else "replicas")
        message += " that served not ready either"
    return Verdict("True", NODE_NOT_READY if trouble else REPLICA_NOT_READY, message)


def _template_hash(pod: Obj) -> str:
    labels = pod.get("metadata", {}).get("labels") or {}
    return str(labels.get("pod-template-hash") or "")


def _sandbox_since(pod: Obj) -> str:
    """When `pod`'s sandbox last changed, as far as its conditions tell: the
    last change of SANDBOX_CONDITIONS, or of `Initialized` on a kubelet that
    reports neither.

    When the kubelet makes a pod's sandbox again (a runtime or network plugin
    restart), it kills every container and runs the init containers again:
    the sandbox's condition turns False and True again, and nothing else
    moves it. `Initialized` does at a crash: from Kubernetes 1.29 the kubelet
    reads it from its sidecars' `started` too until the server has started
    (its startup probe passed, minutes of loading), so it turned False and
    True at every sidecar restart then. Read with it, a sidecar's crash loop
    during the load was no crash at every restart and one at every back-off,
    and one sidecar restart hid a crash loop of the server. Only a kubelet
    without the sandbox conditions (before 1.25, or 1.25 to 1.28 without the
    alpha gate) is read from `Initialized`, which there follows the init
    containers that run to completion alone.
    """
    conditions = [
        cond
        for kind in SANDBOX_CONDITIONS
        if (cond := _condition(pod, kind)) is not None
    ]
    if not conditions:
        conditions = [_condition(pod, "Initialized") or {}]
    times = (str(cond.get("lastTransitionTime") or "") for cond in conditions)
    return max(times, default="")


def _outlasted_back_off(ended: Obj) -> bool:
    """Whether the run that ended so (a `terminated` state) lasted
    SIDECAR_LOOP_SECONDS or more, after which the kubelet forgets its back-off."""
    ran = _seconds(
        str(ended.get("startedAt") or ""), str(ended.get("finishedAt") or "")
    )
    return ran is not None and ran >= SIDECAR_LOOP_SECONDS


def _restarts_to_loop(
    cs: Obj, once: bool, shown: bool, ready_changed: str
) -> int | None:
    """The restart count from which `cs`'s last end makes a crash loop (see
    `_crash`), None for none; `shown`: the model is Degraded for its
    CrashLoopBackOff; `ready_changed`: when its pod's Ready condition last
    changed.

    One just ended again (`terminated` now, restarted before) ends for the
    second time, and the kubelet waits out the back-off before it restarts
    it, as it does while it waits; one running again after one restart was
    restarted at once (LOOP_RESTARTS), unless the kubelet had backed it off
    (`shown`: the back-off was seen, and the model stays Degraded through the
    reload). An init container that runs to completion reruns at once after
    a failure that was already a crash (`Init:Error`).
    """
    state = cs.get("state") or {}
    waiting = (state.get("waiting") or {}).get("reason")
    if once or shown or state.get("terminated") or waiting == "CrashLoopBackOff":
        return 1
    ended = (cs.get("lastState") or {}).get("terminated") or {}
    started = str(ended.get("startedAt") or "")
    if _outlasted_back_off(ended) and ready_changed >= started:
        # Its last run outlasted any back-off and served (its pod's Ready
        # changed during it, turning False at its end): the kubelet restarted
        # it at once, as after a first end, whatever the count (every restart
        # of the pod's life: a reboot last week, one OOM kill) says. A run as
        # long that never served (a startup probe's kill after 30 minutes, a
        # slow load that fails) is a loop the kubelet never backs off: read by
        # the count, or it never turned the model Degraded.
        return None
    return LOOP_RESTARTS


def _crash(
    cs: Obj, once: bool, sandbox: str, shown: bool = False, ready_changed: str = ""
) -> str | None:
    """How a container that keeps crashing last ended, or None if it does not;
    `once`: an init container that runs to completion (not a sidecar);
    `sandbox`: when its pod's sandbox last changed (`_sandbox_since`);
    `shown`, `ready_changed`: as for `_restarts_to_loop`.

    Between back-offs a crash-looping container is `running` (vLLM loads again)
    and only its restart count and last termination tell; without this the
    model would flip Degraded, Progressing, Degraded at every restart. One
    that has just ended (`terminated` now, what `kubectl get pods` shows as
    `Error` or `Init:Error`) is read from that end. An init container that
    fails at once does so before it is ever restarted, and one that exits 0
    has done its work; the others count only once restarted (running again,
    only once restarted twice: `_restarts_to_loop`), and whatever their exit
    code: the kubelet backs off restarting a server that exits 0 as one that
    fails (kubectl: `Completed`, then `CrashLoopBackOff`), and read as no
    crash it flipped at every restart. No crash either: an end
    that nobody saw (UNSEEN_END: a node reboot), and one no later than the
    pod's new sandbox: the kubelet kills the containers when it makes the
    sandbox again and starts them in the new one, minutes of loading (the
    server's end reads `terminated`, exit code 137, no restart yet, while
    the init containers run again; then its last state once it runs again).
    Times are whole seconds, so an end in the second the kubelet stamped its
    pod's sandbox ready counts as one before it.
    """
    now = (cs.get("state") or {}).get("terminated") or {}
    restarts = int(cs.get("restartCount") or 0)
    loop_from = _restarts_to_loop(cs, once, shown, ready_changed)
    if once and now:
        ended = now
    elif restarts and loop_from is not None and restarts >= loop_from:
        ended = now or (cs.get("lastState") or {}).get("terminated") or {}
    else:
        return None
    code = ended.get("exitCode")
    reason = ended.get("reason")
    if not ended or reason in UNSEEN_END:
        return None
    finished = str(ended.get("finishedAt") or "")
    if finished and finished <= sandbox:
        return None
    if once and reason != "OOMKilled" and not (isinstance(code, int) and code != 0):
        return None
    said = reason or ("Completed" if code == 0 else "Error")
    return f"last exit: {said} (exit code {code})"


def _loop_left(cs: Obj, now: str) -> float | None:
    """For how many more seconds the kubelet backs off `cs`, a sidecar, for
    its last end (were it to end again, or while it waits): None when it does
    not; `inf` until it runs again.

    The kubelet forgets a back-off once the container has run for
    SIDECAR_LOOP_SECONDS: a run that lasted that long ended with no back-off,
    and one running that long since is past it. Whether it backs off at all
    (not after a first end) is `_crash`'s count of restarts.
    """
    state = cs.get("state") or {}
    ended = state.get("terminated") or (cs.get("lastState") or {}).get("terminated")
    if _outlasted_back_off(ended or {}):
        return None
    running = state.get("running")
    if running is None:
        return float("inf")
    elapsed = _seconds(str(running.get("startedAt") or ""), now)
    if elapsed is None or elapsed >= SIDECAR_LOOP_SECONDS:
        return None
    return SIDECAR_LOOP_SECONDS - elapsed


def _served_since_start(pod: Obj, cs: Obj) -> bool:
    """Whether `pod` has been ready since `cs`, its container, last started.

    A container that crashes turns its pod not ready before the kubelet starts
    it again, and the pod stays so while vLLM loads: Ready's last transition is
    no later than the start. One later turned True in between and back, a
    readiness probe failing for a while, say: the restart was long ago (an OOM
    kill last week) and the container is no crash loop. A container that has
    ended is read from when it started (a server's container killed for a new
    sandbox had served). Times are whole seconds, so a pod ready and back
    within a second of its start reads as not ready since; without a start
    time (waiting) nothing tells.
    """
    state = cs.get("state") or {}
    run = state.get("running") or state.get("terminated") or {}
    started = str(run.get("startedAt") or "")
    ready = _condition(pod, "Ready") or {}
    return bool(started) and str(ready.get("lastTransitionTime") or "") > started


def _sidecars(pod: Obj) -> frozenset[str]:
    """The names of `pod`'s sidecars: init containers with `restartPolicy:
    Always`, which start in order with the others and then run beside the
    server, restarted as it is."""
    return frozenset(
        str(c.get("name"))
        for c in pod.get("spec", {}).get("initContainers") or []
        if c.get("restartPolicy") == "Always"
    )


def _container_statuses(pod: Obj) -> list[tuple[str, Obj, bool]]:
    """`pod`'s container statuses, each with what it is a status of and
    whether it is of an init container that runs to completion (not a
    sidecar): its init containers' first, as they run first. An init
    container that crash-loops or cannot be pulled holds the others
    `PodInitializing`, a wait that says nothing; unread, it left the model
    loading for ever."""
    status = pod.get("status") or {}
    sidecars = _sidecars(pod)
    return [
        (kind, cs, init and cs.get("name") not in sidecars)
        for kind, key, init in (
            ("init container", "initContainerStatuses", True),
            ("container", "containerStatuses", False),
        )
        for cs in status.get(key) or []
    ]


def _crashing(
    pod: Obj, cs: Obj, once: bool, now: str, shown: bool = False
) -> str | None:
    """How `cs`, a container of `pod`, last ended if it is in a crash loop
    (see `_crash`; `shown` as there), else None.

    The server's container and the init containers are read while the pod is
    not ready and has not been since the container last started: a server
    that turned ready again after a restart is past it. A sidecar is read
    while the kubelet backs off its restarts (`_loop_left`), ready or not:
    one without a readiness probe makes its pod ready as soon as it runs.
    """
    sidecar = not once and cs.get("name") in _sidecars(pod)
    if sidecar:
        looping = _loop_left(cs, now) is not None
    else:
        looping = (
            not _is_ready(pod)
            and not cs.get("ready")
            and not _served_since_start(pod, cs)
        )
    if not looping:
        return None
    ready = _condition(pod, "Ready") or {}
    changed = str(ready.get("lastTransitionTime") or "")
    return _crash(cs, once, _sandbox_since(pod), shown, changed)


def _sidecar_loop_ends_in(pods: Sequence[Obj], now: str) -> float | None:
    """Seconds until the first sidecar read as in a crash loop while it runs
    again (see `_crashing`) has run for SIDECAR_LOOP_SECONDS and is past it;
    None when none is.

    Its pod is ready by then and nothing in the cluster changes: without a
    refresh at that moment, the model stayed Degraded up to a resync period
    longer. Read as if the model were Degraded for it already (`shown`): at
    worst one refresh that changes nothing.
    """
    due = [
        left
        for pod in _live(pods)
        if not _ended(pod)
        for _, cs, once in _container_statuses(pod)
        if not once
        and cs.get("name") in _sidecars(pod)
        and (cs.get("state") or {}).get("running") is not None
        and _crashing(pod, cs, once, now, shown=True) is not None
        and (left := _loop_left(cs, now)) is not None
    ]
    return min(due) if due else None


def _container_failure(pods: Sequence[Obj], previous: str, now: str) -> Verdict | None:
    """The first container of a pod still running, or about to, that is stuck;
    `previous` is the Degraded message the model carries while Degraded."""
    for pod in pods:
        if _ended(pod):
            continue
        name = pod["metadata"]["name"]
        for kind, cs, once in _container_statuses(pod):
            where = f"pod {name}, {kind} {cs.get('name')}"
            waiting = (cs.get("state") or {}).get("waiting") or {}
            shown = previous.startswith(f"{where}: CrashLoopBackOff")
            crash = _crashing(pod, cs, once, now, shown)
            reason = waiting.get("reason")
            last = ((cs.get("lastState") or {}).get("terminated") or {}).get("reason")
            said = str(waiting.get("message") or "")
            if reason == "CrashLoopBackOff":
                said = BACK_OFF_PREFIX.sub("", said)
            detail = said or (f"last exit: {last}" if last else "")
            if reason == "CrashLoopBackOff" or (crash and reason not in BAD_WAITING):
                # One message whether it waits out the back-off or loads again:
                # the status is not rewritten at every restart.
                reason, detail = "CrashLoopBackOff", crash or detail
            pulling = f"{where}: {PULL_BACK_OFF} "
            if reason == PULL_BACK_OFF and previous.startswith(pulling):
                # Between tries the kubelet says only that it waits: the error
                # of its last try stays, and neither the reason nor the
                # message changes at every retry (a status write and a
                # Warning Event each).
                return Verdict("True", PULL_BACK_OFF, previous)
            if reason == PULL_ERROR:
                reason = PULL_BACK_OFF
            if reason in BAD_WAITING:
                return Verdict(
                    "True", str(reason), f"{where}: {reason} {detail}".rstrip()
                )
    return None


def _condition_reason(raw: str, default: str) -> str:
    """`raw`, a reason the cluster gave, as a condition's reason.

    A pod's reason is free text to the API server, but a condition's must be
    a CamelCase word (REASON_PATTERN): copied as it is, `OutOfnvidia.com/gpu`
    made the status fail validation, and it stayed frozen at its last value.
    One that does not fit becomes `OutOfResource` for the kubelet's
    `OutOf<resource>`, else its letters and digits in CamelCase, else
    `default`; the same raw reason always gives the same word, so the status
    is not rewritten while it holds.
    """
    if len(raw) <= REASON_MAX_LENGTH and re.fullmatch(REASON_PATTERN, raw):
        return raw
    if raw.startswith("OutOf"):
        return OUT_OF_RESOURCE
    words = re.findall(r"[A-Za-z0-9]+", raw)
    word = "".join(w[:1].upper() + w[1:] for w in words).lstrip("0123456789")
    return word[:REASON_MAX_LENGTH] or default


def _failure(
    pods: Sequence[Obj],
    short: bool,
    previous: str,
    lost: Verdict | None,
    now: str,
) -> Verdict | None:
    """The first container stuck in a state that will not fix itself, else a
    failed pod that explains why the model is `short` of ready replicas, else
    `lost`, replicas that served and have not been ready for a while.

    An evicted pod, or one the kubelet refused, stays listed after its
    ReplicaSet replaced it, and must not stand for the cause when a later
    rollout, restart or scale-up waits for a replica to load. So a failed pod
    counts only if it belongs to the current ReplicaSet (the pod-template-hash
    of the newest pod still running) or is newer than every pod still running;
    and only while no newer pod has served. Ready now is not enough: once the
    replacement has served, the eviction is dealt with, and it must not stand
    for the cause when that pod stops being ready for a while (a readiness
    probe failing, its node NotReady; see `_has_served`).
    """
    stuck = _container_failure(pods, previous, now)
    if stuck is not None or not short:
        return stuck
    running = [p for p in pods if not _ended(p)]
    # Ended pods too: of two evictions, the pod that had served since the
    # first is the one to name.
    newest_served = max((_created(p) for p in pods if _has_served(p)), default="")
    newest = max(running, key=_created, default=None)
    current = _template_hash(newest) if newest is not None else ""
    for pod in pods:
        status = pod.get("status") or {}
        if status.get("phase") != "Failed" or _created(pod) < newest_served:
            continue
        ours = bool(current) and _template_hash(pod) == current
        if ours or newest is None or _created(pod) >= _created(newest):
            raw = str(status.get("reason") or "")
            reason = _condition_reason(raw, "PodFailed")
            # The kubelet's own word stays in the message when the reason
            # could not carry it.
            said = f" ({raw})" if raw and reason != raw else ""
            # The API returns an unset message as null: no `None` in ours.
            text = str(status.get("message") or "")
            message = f"pod {pod['metadata']['name']}{said}" + (
                f": {text}" if text else ""
            )
            return Verdict("True", reason, message)
    return lost


def _deployment_condition(deployment: Obj | None, kind: str) -> Obj:
    for cond in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if cond.get("type") == kind:
            return dict(cond)
    return {}


def counts(model: LLMModel, deployment: Obj | None) -> ReplicaCounts:
    """Replica counts from the Deployment's status."""
    status = (deployment or {}).get("status") or {}
    return ReplicaCounts(
        desired=model.spec.replicas,
        current=int(status.get("replicas") or 0),
        updated=int(status.get("updatedReplicas") or 0),
        ready=int(status.get("readyReplicas") or 0),
    )


def _scheduled(model: LLMModel, pods: Sequence[Obj], nodes: Sequence[Obj]) -> Verdict:
    """Scheduled, from the pods that still run or will (`pods`: none ended)."""
    stuck = _unschedulable(pods)
    scheduler = f"; scheduler: {stuck[0][1]}" if stuck else ""
    # Once every pod has its node, the nodes' labels and capacity no longer
    # matter: a label that a node's feature discovery drops and puts back while
    # it restarts must not turn a serving model Degraded.
    if model.spec.replicas == 0:
        # Nothing will be placed: a nodeName or label that matches no node now
        # is no failure until the model is scaled up again.
        return Verdict("True", "ScaledToZero", "replicas is 0: nothing to place")
    placing = not pods or any(not p.get("spec", {}).get("nodeName") for p in pods)
    problem = check_placement(model, nodes) if placing else None
    if problem is not None:
        return Verdict("False", problem.reason, problem.message + scheduler)
    if stuck:
        return Verdict(
            "False",
            "Unschedulable",
            f"{len(stuck)} of {len(pods)} pods cannot be placed: {stuck[0][1]}",
        )
    gated = [p for p in pods if _gated(p)]
    if gated:
        gates = _listing(sorted({g for p in gated for g in _gates(p)}))
        return Verdict(
            "False",
            SCHEDULING_GATED,
            f"{len(gated)} of {len(pods)} pods wait for their scheduling gates"
            + (f": {gates}" if gates else " (now removed: the scheduler is next)"),
        )
    placed = sorted(
        {p["spec"]["nodeName"] for p in pods if p.get("spec", {}).get("nodeName")}
    )
    if not pods or not placed:
        return Verdict("Unknown", "Pending", "waiting for pods to be created")
    count = f"{len(pods)} pod" + ("s" if len(pods) != 1 else "")
    return Verdict("True", "Scheduled", f"{count} placed on {_listing(placed)}")


def _progressing(
    model: LLMModel,
    deployment: Obj | None,
    n: ReplicaCounts,
    lost: tuple[Verdict, int] | None,
) -> Verdict:
    """Progressing; `lost`: the Degraded verdict of the replicas that served
    and are no longer ready (see `_lost`), and how many they are."""
    if deployment is None:
        return Verdict("True", "Creating", "creating the Deployment")
    observed = (deployment.get("status") or {}).get("observedGeneration") or 0
    previous = model.status.condition(ConditionType.PROGRESSING)
    lagging = observed < (deployment.get("metadata", {}).get("generation") or 0)
    if lagging and previous and previous.observed_generation == model.generation:
        # Its controller has not looked at the latest change yet. A change to a
        # Deployment's annotations (anyone's) bumps its generation too and rolls
        # nothing out: the verdict stands until the controller says, or the model
        # would turn Progressing and back to Ready at every such change. Not
        # after a change of the model's spec: that one we just applied.
        return Verdict(previous.status, previous.reason, previous.message)
    rolling = Verdict("True", "RollingOut", f"{n.updated}/{n.desired} replicas updated")
    if lagging:
        # Its progress deadline, if any, is the old spec's: a change that fixes
        # a stuck rollout must not be reported stuck under the new generation.
        return rolling
    progress = _deployment_condition(deployment, "Progressing")
    if progress.get("reason") == "ProgressDeadlineExceeded":
        return Verdict(
            "False", "ProgressDeadlineExceeded", str(progress.get("message") or "")
        )
    if n.updated < n.desired:
        return rolling
    if n.current > n.updated:
        # A surge rollout (maxSurge > 0) has started every updated replica and
        # keeps the old ones until those turn ready: not a scale-down.
        old = n.current - n.updated
        return Verdict(
            "True",
            "RollingOut",
            f"{n.updated}/{n.desired} replicas updated, {old} old "
            + ("replica" if old == 1 else "replicas")
            + " still running",
        )
    if lost is not None and n.ready + lost[1] >= n.desired:
        # Every replica short is one that served: none loads, nothing is
        # under way, and Degraded says why.
        verdict, count = lost
        return Verdict(
            "False",
            verdict.reason,
            f"{n.ready}/{n.desired} replicas ready, none loading: {count} "
            + ("replica" if count == 1 else "replicas")
            + " stopped being ready (see Degraded)",
        )
    if n.ready < n.desired:
        return Verdict(
            "True",
            "WaitingForReplicas",
            f"{n.ready}/{n.desired} replicas ready (the model loads before a replica "
            "turns ready)",
        )
    if n.current > n.desired:
        return Verdict(
            "True", "ScalingDown", f"{n.current} replicas, {n.desired} wanted"
        )
    return Verdict(
        "False", "Complete", f"{n.ready}/{n.desired} replicas updated and ready"
    )


def _degraded(
    model: LLMModel,
    pods: Sequence[Obj],
    n: ReplicaCounts,
    progressing: Verdict,
    lost: Verdict | None,
    now: str,
) -> Verdict:
    """Degraded; a progress deadline counts as `progressing` reads it (not
    while the Deployment's controller has yet to look at a change); `lost`:
    the verdict of the replicas that served and are no longer ready; `now`,
    for how long a restarted sidecar has run."""
    before = model.status.condition(ConditionType.DEGRADED)
    previous = before.message if before is not None and before.status == "True" else ""
    failure = _failure(pods, n.ready < n.desired, previous, lost, now)
    if failure is not None:
        return failure
    if progressing.reason == "ProgressDeadlineExceeded":
        return Verdict("True", progressing.reason, progressing.message)
    return Verdict("False", "AsExpected", "no replica is failing")


def _ready(
    model: LLMModel, n: ReplicaCounts, blocker: Blocker | None, others: list[Verdict]
) -> Verdict:
    if blocker is not None:
        return Verdict("False", blocker.reason, blocker.message)
    if n.desired == 0:
        return Verdict("False", "ScaledToZero", "replicas is 0")
    if n.ready > 0:
        return Verdict(
            "True",
            "ReplicasReady",
            f"{n.ready}/{n.desired} replicas ready at {model.endpoint}",
        )
    scheduled, degraded, progressing = others
    for verdict, bad in (
        (scheduled, "False"),
        (degraded, "True"),
        (progressing, "True"),
    ):
        if verdict.status == bad:
            return Verdict("False", verdict.reason, verdict.message)
    return Verdict("False", "NoReadyReplicas", "no replica is ready")


def _permanent(model: LLMModel, nodes_autoscaled: bool) -> frozenset[str]:
    """The Scheduled=False reasons that make the model Failed: all of them,
    unless nodes are autoscaled and the model may run on a node yet to come
    (no autoscaler makes a named node, nor adds GPUs to one)."""
    if nodes_autoscaled and not model.spec.placement.one_node:
        return frozenset()
    return PERMANENT_PLACEMENT


def _phase(
    verdicts: Mapping[ConditionType, Verdict],
    n: ReplicaCounts,
    blocker: Blocker | None,
    permanent: frozenset[str],
) -> Phase:
    scheduled = verdicts[ConditionType.SCHEDULED]
    if blocker is not None or (scheduled.reason in permanent and n.ready == 0):
        return Phase.FAILED
    if verdicts[ConditionType.DEGRADED].status == "True":
        return Phase.DEGRADED
    if scheduled.reason == SCHEDULING_GATED:
        # Queued (Kueue): the pods wait their turn like pods yet to be made, and
        # a scale-up or rollout held that way is under way, not broken.
        return Phase.PENDING if n.ready == 0 else Phase.PROGRESSING
    if scheduled.status == "False":
        return Phase.PENDING if n.ready == 0 else Phase.DEGRADED
    if verdicts[ConditionType.PROGRESSING].status == "True":
        return Phase.PENDING if scheduled.status == "Unknown" else Phase.PROGRESSING
    return Phase.READY


def _bounded(message: str) -> str:
    """`message` cut to what a condition holds: messages come from the cluster
    (a scheduler's, a kubelet's, an API server's refusal) in any length, and
    one too long failed the status's validation, which then froze."""
    if len(message) <= MESSAGE_MAX_LENGTH:
        return message
    cut = " [cut]"
    return message[: MESSAGE_MAX_LENGTH - len(cut)] + cut


def _stamp(
    kind: ConditionType, verdict: Verdict, model: LLMModel, now: str
) -> Condition:
    previous = model.status.condition(kind)
    unchanged = previous is not None and previous.status == verdict.status
    return Condition(
        type=str(kind),
        status=verdict.status,
        reason=verdict.reason,
        message=_bounded(verdict.message),
        observed_generation=model.generation,
        last_transition_time=previous.last_transition_time
        if unchanged and previous
        else now,
    )


def derive_status(
    model: LLMModel,
    deployment: Obj | None,
    pods: Sequence[Obj],
    nodes: Sequence[Obj],
    now: str,
    blocker: Blocker | None = None,
    *,
    nodes_autoscaled: bool = False,
) -> LLMModelStatus:
    """The status the model should carry.

    Args:
        model: the LLMModel (its previous conditions keep their transition times).
        deployment: its Deployment, or None before it exists.
        pods: its pods.
        nodes: every node (for the target-node and GPU-capacity checks).
        now: the current time, RFC 3339, for conditions that change.
        blocker: a problem found by the operator that makes the model Failed.
        nodes_autoscaled: nodes join on demand, so no node for the model yet
            is a wait (Pending), not a failure.
    """
    live = _live(pods)
    running = [p for p in live if not _ended(p)]
    n = counts(model, deployment)
    lost = _lost(running, now)
    # Only while the model is short of ready replicas: a surge rollout's old
    # pod on a node that went NotReady, say, takes no capacity the model has.
    lapse = _lost_verdict(lost, nodes) if lost and n.ready < n.desired else None
    progressing = _progressing(
        model, deployment, n, (lapse, len(lost)) if lapse else None
    )
    verdicts: dict[ConditionType, Verdict] = {
        ConditionType.SCHEDULED: _scheduled(model, running, nodes),
        ConditionType.DEGRADED: _degraded(model, live, n, progressing, lapse, now),
        ConditionType.PROGRESSING: progressing,
    }
    verdicts[ConditionType.READY] = _ready(
        model,
        n,
        blocker,
        [
            verdicts[t]
            for t in (
                ConditionType.SCHEDULED,
                ConditionType.DEGRADED,
                ConditionType.PROGRESSING,
            )
        ],
    )
    order = (
        ConditionType.READY,
        ConditionType.SCHEDULED,
        ConditionType.PROGRESSING,
        ConditionType.DEGRADED,
    )
    return LLMModelStatus(
        phase=_phase(verdicts, n, blocker, _permanent(model, nodes_autoscaled)),
        conditions=[_stamp(t, verdicts[t], model, now) for t in order],
        replicas=n,
        served_name=model.served_name,
        endpoint=model.endpoint,
        nodes=sorted(
            {
                p["spec"]["nodeName"]
                for p in running
                if p.get("spec", {}).get("nodeName")
            }
        )[:MAX_NODES],
        selector=label_selector(model),
        observed_generation=model.generation,
    )
