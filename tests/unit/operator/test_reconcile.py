"""The Reconciler against the in-memory Kube."""

from __future__ import annotations

import asyncio
import copy
from typing import Any

import pytest

from citadel.operator import names, reconcile
from citadel.operator.builders.objects import build_pod_monitor
from citadel.operator.kube.client import ApiError
from citadel.operator.kube.fake import FakeKube
from citadel.operator.kube.heed import AskedWait
from citadel.operator.kube.resources import (
    DEPLOYMENTS,
    LLMMODELS,
    PDBS,
    POD_MONITORS,
    PODS,
    PVCS,
    SERVICES,
    Resource,
)
from citadel.operator.metrics import Metrics
from citadel.operator.model import LLMModel
from citadel.operator.reconcile import (
    LAPSE_MARGIN_S,
    Precedence,
    ReconcileError,
    Reconciler,
    RefreshWish,
    Serializer,
)
from citadel.operator.routing import RoutePublisher
from citadel.operator.settings import OperatorSettings
from citadel.operator.view import ApiView

from .samples import NODES, NOW, foreign, model_body, pod

pytestmark = pytest.mark.unit


def _setup(
    settings: OperatorSettings, *objects: dict[str, Any], monitoring: bool = False
) -> tuple[FakeKube, Reconciler]:
    kube = FakeKube([*NODES, *objects], served=[POD_MONITORS] if monitoring else [])
    return kube, Reconciler(kube, settings, Metrics(), clock=lambda: NOW)


def _the_claim(kube: FakeKube) -> Any:
    return kube.stored(PVCS, "mixtral-cache", "llm")


async def _reconciled_claim(
    settings: OperatorSettings, body: dict[str, Any], *objects: dict[str, Any]
) -> tuple[FakeKube, Any]:
    """The cache claim after one reconcile of `body` among `objects`."""
    kube, reconciler = _setup(settings, body, *objects)
    await reconciler.reconcile(body)
    return kube, _the_claim(kube)


def _reasons(kube: FakeKube) -> list[str]:
    return [e["reason"] for e in kube.events]


async def test_creates_every_owned_object_and_a_status(
    settings: OperatorSettings,
) -> None:
    body = model_body(cache={"size": "10Gi"}, replicas=2)
    kube, reconciler = _setup(settings, body)
    status = await reconciler.reconcile(body)
    for resource, name in (
        (DEPLOYMENTS, "mixtral"),
        (SERVICES, "mixtral"),
        (PVCS, "mixtral-cache"),
        (PDBS, "mixtral"),
    ):
        assert kube.stored(resource, name, "llm")
    stored = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    assert stored["observedGeneration"] == 1
    assert stored["phase"] == status.phase == "Pending"
    assert "MonitoringUnavailable" in _reasons(kube)
    # A healthy first look posts no condition events (events.transitions).
    assert "RollingOut" not in _reasons(kube)


async def test_reconcile_twice_changes_nothing(settings: OperatorSettings) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    body = kube.stored(LLMMODELS, "mixtral", "llm")
    events, statuses = (
        len(kube.events),
        sum(1 for s, _ in kube.applied if s == "status"),
    )
    await reconciler.reconcile(body)
    assert len(kube.events) == events
    assert sum(1 for s, _ in kube.applied if s == "status") == statuses


def _kinds_applied(kube: FakeKube) -> list[str]:
    return sorted(obj["kind"] for sub, obj in kube.applied if not sub)


async def _resync(kube: FakeKube, reconciler: Reconciler) -> None:
    """The periodic pass over the model as stored."""
    await reconciler.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"), resync=True)


def _portless_service(kube: FakeKube) -> Any:
    """Takes the ports off the stored Service, as a hand edit; returns it before."""
    service = kube.stored(SERVICES, "mixtral", "llm")
    kube.put({**service, "spec": {**service["spec"], "ports": []}})
    return service


async def _retained(settings: OperatorSettings) -> tuple[FakeKube, Reconciler, Any]:
    """A model whose claim was made under deletePolicy Delete, then switched to
    Retain; with the claim as it was before the switch."""
    deleting = model_body(cache={"size": "10Gi", "deletePolicy": "Delete"})
    kube, reconciler = _setup(settings, deleting)
    await reconciler.reconcile(deleting)
    owned = _the_claim(kube)
    retaining = model_body(cache={"size": "10Gi", "deletePolicy": "Retain"})
    kube.put(retaining)
    await reconciler.reconcile(retaining)
    return kube, reconciler, owned


async def test_a_resync_of_an_unchanged_model_applies_nothing(
    settings: OperatorSettings,
) -> None:
    body = model_body(cache={"size": "10Gi"}, replicas=2)
    kube, reconciler = _setup(settings, body, monitoring=True)
    await reconciler.reconcile(body)
    stored = kube.stored(LLMMODELS, "mixtral", "llm")
    kube.applied.clear()
    kube.reads.clear()
    await reconciler.reconcile(stored, resync=True)
    assert kube.applied == []
    assert kube.dry_runs == []
    # What is not watched comes from the API server's cache, and the Deployment
    # too (beside the views, which a missed event leaves behind).
    owned = {SERVICES.plural, PVCS.plural, PDBS.plural, POD_MONITORS.plural}
    assert {verb for verb, plural in kube.reads if plural in owned} == {"get cached"}
    assert ("get cached", DEPLOYMENTS.plural) in kube.reads
    # A pass that is not a resync (a changed spec, a new operator) applies all.
    await reconciler.reconcile(stored)
    assert _kinds_applied(kube) == [
        "Deployment",
        "PersistentVolumeClaim",
        "PodDisruptionBudget",
        "PodMonitor",
        "Service",
    ]


async def test_a_resync_puts_back_what_drifted(settings: OperatorSettings) -> None:
    body = model_body(cache={"size": "10Gi"}, replicas=2)
    kube, reconciler = _setup(settings, body, monitoring=True)
    await reconciler.reconcile(body)
    stored = kube.stored(LLMMODELS, "mixtral", "llm")
    service = _portless_service(kube)
    del kube.objects[(POD_MONITORS.plural, "llm", "mixtral")]
    del kube.objects[(DEPLOYMENTS.plural, "llm", "mixtral")]
    kube.applied.clear()
    await reconciler.reconcile(stored, resync=True)
    assert _kinds_applied(kube) == ["Deployment", "PodMonitor", "Service"]
    assert kube.stored(SERVICES, "mixtral", "llm")["spec"] == service["spec"]
    assert kube.stored(POD_MONITORS, "mixtral", "llm")


async def test_a_resync_puts_back_what_drifted_with_an_event(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body(), monitoring=True)
    await reconciler.reconcile(model_body())
    stored = kube.stored(LLMMODELS, "mixtral", "llm")
    _portless_service(kube)
    await reconciler.reconcile(stored, resync=True)
    [event] = [e for e in kube.events if e["reason"] == "DriftReverted"]
    assert event["message"] == "put back manual changes to Service mixtral"
    assert (
        reconciler.metrics.registry.get_sample_value(
            "citadel_operator_drift_reverts_total", {"kind": "Service"}
        )
        == 1
    )
    kube.applied.clear()
    await reconciler.reconcile(stored, resync=True)
    assert kube.applied == [] and _reasons(kube).count("DriftReverted") == 1


async def test_a_resync_before_the_update_applies_the_new_spec_in_full(
    settings: OperatorSettings,
) -> None:
    # The timer's pass can come first while the update waits for a slot.
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    changed = model_body(generation=2, pod={"annotations": {"a": "b"}})
    changed["status"] = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    kube.put(changed)
    kube.applied.clear()
    await _resync(kube, reconciler)
    assert _kinds_applied(kube) == ["Deployment", "Service"]
    assert "DriftReverted" not in _reasons(kube)


async def test_a_dry_run_that_refutes_a_services_drift_is_remembered(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    stored = kube.stored(LLMMODELS, "mixtral", "llm")
    # A form the quick check does not know: the server took our port as 8000.0.
    service = kube.stored(SERVICES, "mixtral", "llm")
    ports = [{**service["spec"]["ports"][0], "port": "8000.0"}]
    kube.put({**service, "spec": {**service["spec"], "ports": ports}})
    original = kube.apply

    async def as_stored(obj: dict[str, Any], **kwargs: Any) -> Any:
        if kwargs.get("dry_run") and obj["kind"] == "Service":
            await original(obj, **kwargs)  # recorded
            return kube.stored(SERVICES, "mixtral", "llm")
        return await original(obj, **kwargs)

    kube.apply = as_stored  # type: ignore[method-assign]
    kube.applied.clear()
    for _ in range(2):
        await reconciler.reconcile(stored, resync=True)
    assert [o["kind"] for _, o in kube.dry_runs] == ["Service"]  # once
    assert kube.applied == [] and "DriftReverted" not in _reasons(kube)


async def test_a_put_back_is_left_if_the_object_changed_since_the_read(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    _portless_service(kube)
    original = kube.apply

    async def changed_meanwhile(obj: dict[str, Any], **kwargs: Any) -> Any:
        result = await original(obj, **kwargs)
        if kwargs.get("dry_run"):  # someone writes between the dry run and ours
            kube.put(kube.stored(SERVICES, "mixtral", "llm"))
        return result

    kube.apply = changed_meanwhile  # type: ignore[method-assign]
    await _resync(kube, reconciler)
    assert kube.stored(SERVICES, "mixtral", "llm")["spec"]["ports"] == []
    assert "DriftReverted" not in _reasons(kube)  # left for the next pass


async def test_a_pdb_replaced_before_the_delete_is_left(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body(replicas=2))
    await reconciler.reconcile(model_body(replicas=2))
    one = model_body(replicas=1, generation=2)
    kube.put(one)

    async def replaced(*_: Any, **__: Any) -> bool:
        raise ApiError(409, "Conflict", "Precondition failed: UID in precondition")

    kube.delete = replaced  # type: ignore[method-assign]
    status = await reconciler.reconcile(one)
    assert status.observed_generation == 2


async def test_a_resync_after_a_failed_spec_change_applies_in_full(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    changed = model_body(generation=2, replicas=1, pod={"annotations": {"a": "b"}})
    kube.put(changed)
    kube.fail["services"] = ApiError(403, "Forbidden", "denied by policy")
    with pytest.raises(ReconcileError):
        await reconciler.reconcile(changed)
    # The policy is lifted: the pass applies the whole spec, not what drifted.
    del kube.fail["services"]
    kube.applied.clear()
    await _resync(kube, reconciler)
    assert _kinds_applied(kube) == ["Deployment", "Service"]
    kube.applied.clear()
    await _resync(kube, reconciler)
    assert kube.applied == []


async def test_a_resync_acts_on_etcds_copy_not_a_stale_cache(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body(replicas=2))
    await reconciler.reconcile(model_body(replicas=2))
    ours = kube.stored(PDBS, "mixtral", "llm")
    one = model_body(replicas=1, generation=2)
    kube.put(one)
    await reconciler.reconcile(one)
    assert (PDBS.plural, "llm", "mixtral") in kube.deleted
    stored = kube.stored(LLMMODELS, "mixtral", "llm")
    # Someone made a PDB of that name since; the cache still shows ours.
    kube.put({**ours, "metadata": {"name": "mixtral", "namespace": "llm"}})
    kube.behind[(PDBS.plural, "llm", "mixtral")] = ours
    await reconciler.reconcile(stored, resync=True)
    assert kube.stored(PDBS, "mixtral", "llm")  # not deleted
    # The same for a Service replaced by someone else's: the cache shows ours,
    # drifted, but etcd's copy decides.
    service = kube.stored(SERVICES, "mixtral", "llm")
    kube.put({**service, "metadata": {"name": "mixtral", "namespace": "llm"}})
    kube.behind[(SERVICES.plural, "llm", "mixtral")] = {**service, "spec": {}}
    kube.applied.clear()
    with pytest.raises(ReconcileError, match="does not belong to this LLMModel"):
        await reconciler.reconcile(stored, resync=True)
    assert _kinds_applied(kube) == []  # the status says why


async def test_a_stale_claim_in_the_cache_does_not_fail_a_retained_claim(
    settings: OperatorSettings,
) -> None:
    kube, reconciler, owned = await _retained(settings)
    assert "ownerReferences" not in _the_claim(kube)["metadata"]
    # The cache has not seen the patch that dropped the owner reference yet.
    kube.behind[(PVCS.plural, "llm", "mixtral-cache")] = owned
    patches = len(kube.patched)
    await _resync(kube, reconciler)
    assert len(kube.patched) == patches


async def test_a_resync_puts_back_the_claims_marks(settings: OperatorSettings) -> None:
    body = model_body(cache={"size": "10Gi"})
    kube, reconciler = _setup(settings, body)
    await reconciler.reconcile(body)
    claim = _the_claim(kube)
    marks = claim["metadata"]["annotations"]
    # The mark that holds the claim's own uid, lost: without it, the next model
    # of this name would take the retained claim for someone else's.
    kept = {names.ANNOTATION_CREATED_FOR: marks[names.ANNOTATION_CREATED_FOR]}
    kube.put({**claim, "metadata": {**claim["metadata"], "annotations": kept}})
    await _resync(kube, reconciler)
    assert _the_claim(kube)["metadata"]["annotations"] == marks


async def test_a_resync_recreates_a_deployment_the_watch_still_shows(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    seen = kube.stored(DEPLOYMENTS, "mixtral", "llm")

    class MissedDelete(ApiView):
        async def deployment(self, namespace: str, name: str) -> Any:
            return seen

    reconciler.use(MissedDelete(kube))
    await kube.delete(DEPLOYMENTS, "mixtral", "llm")
    await _resync(kube, reconciler)
    assert kube.stored(DEPLOYMENTS, "mixtral", "llm")
    assert "DriftReverted" in _reasons(kube)


async def test_pod_monitor_when_the_crd_exists(settings: OperatorSettings) -> None:
    kube, reconciler = _setup(settings, model_body(), monitoring=True)
    await reconciler.reconcile(model_body())
    assert kube.stored(POD_MONITORS, "mixtral", "llm")
    assert "MonitoringUnavailable" not in _reasons(kube)


def _has_pod_monitor(kube: FakeKube) -> bool:
    return (POD_MONITORS.plural, "llm", "mixtral") in kube.objects


async def test_no_pod_monitor_when_they_are_turned_off(
    settings: OperatorSettings,
) -> None:
    off = settings.model_copy(update={"pod_monitors": False})
    kube, reconciler = _setup(off, model_body(), monitoring=True)
    await reconciler.reconcile(model_body())
    assert kube.stored(DEPLOYMENTS, "mixtral", "llm")
    assert not _has_pod_monitor(kube)
    assert "PodMonitor" not in _kinds_applied(kube)
    # Asked for none: nothing is missing, so nothing to say.
    assert "MonitoringUnavailable" not in _reasons(kube)


async def test_turning_pod_monitors_off_removes_only_ours(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body(), monitoring=True)
    await reconciler.reconcile(model_body())
    assert kube.stored(POD_MONITORS, "mixtral", "llm")
    # The operator restarts with them off (the chart's monitoring.enabled).
    off = settings.model_copy(update={"pod_monitors": False})
    restarted = Reconciler(kube, off, Metrics(), clock=lambda: NOW)
    await restarted.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))
    assert (POD_MONITORS.plural, "llm", "mixtral") in kube.deleted
    assert not _has_pod_monitor(kube)
    # One of that name that someone else made is neither refused nor deleted,
    # at a full pass or a periodic one.
    theirs = foreign(POD_MONITORS)
    kube.put(theirs)
    kube.deleted.clear()
    await restarted.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))
    await _resync(kube, restarted)
    assert kube.deleted == []
    assert kube.stored(POD_MONITORS, "mixtral", "llm")["spec"] == theirs["spec"]


async def test_a_resync_removes_a_pod_monitor_of_ours_when_they_are_off(
    settings: OperatorSettings,
) -> None:
    off = settings.model_copy(update={"pod_monitors": False})
    kube, reconciler = _setup(off, model_body(), monitoring=True)
    await reconciler.reconcile(model_body())
    # One of ours turns up after the full pass (an operator with them on, say,
    # that was still stopping).
    model = LLMModel.from_body(kube.stored(LLMMODELS, "mixtral", "llm"))
    kube.put(build_pod_monitor(model))
    await _resync(kube, reconciler)
    assert not _has_pod_monitor(kube)


async def test_scaling_to_one_removes_the_pdb(settings: OperatorSettings) -> None:
    kube, reconciler = _setup(settings, model_body(replicas=3))
    await reconciler.reconcile(model_body(replicas=3))
    await reconciler.reconcile(model_body(replicas=1, generation=2))
    assert (PDBS.plural, "llm", "mixtral") in kube.deleted


async def test_foreign_object_with_the_same_name_is_not_taken_over(
    settings: OperatorSettings,
) -> None:
    foreign = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "mixtral", "namespace": "llm"},
        "spec": {"replicas": 9},
    }
    kube, reconciler = _setup(settings, model_body(), foreign)
    with pytest.raises(ReconcileError, match="does not belong") as err:
        await reconciler.reconcile(model_body())
    assert not err.value.retryable
    assert kube.stored(DEPLOYMENTS, "mixtral", "llm")["spec"] == {"replicas": 9}
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    assert status["phase"] == "Failed"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ReconcileFailed"
    assert "rename the model" in ready["message"]


@pytest.mark.parametrize(
    "taken", [SERVICES, DEPLOYMENTS, PDBS, POD_MONITORS], ids=lambda r: r.kind
)
async def test_a_taken_name_is_refused_before_anything_is_made(
    settings: OperatorSettings, taken: Resource
) -> None:
    # Two replicas of four GPUs and a Retain claim: all made, and left, before
    # the check of the Service refused the model.
    body = model_body(resources={"gpus": 4}, replicas=2, cache={"size": "200Gi"})
    theirs = foreign(taken)
    kube, reconciler = _setup(settings, body, theirs, monitoring=True)
    with pytest.raises(ReconcileError, match=f"{taken.kind} mixtral already") as err:
        await reconciler.reconcile(body)
    assert not err.value.retryable
    assert kube.created == []
    assert [sub for sub, _ in kube.applied] == ["status"]
    assert {plural for plural, _, _ in kube.objects} == {
        "nodes",
        LLMMODELS.plural,
        taken.plural,
    }
    assert kube.stored(taken, "mixtral", "llm")["spec"] == theirs["spec"]
    # The Service's clash has a reason of its own: the routes leave the model
    # out for that one only (routing.service_taken).
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == (
        "ServiceNameTaken" if taken is SERVICES else "ReconcileFailed"
    )
    assert status["phase"] == "Failed"


async def test_a_resync_that_finds_the_service_taken_makes_nothing_again(
    settings: OperatorSettings,
) -> None:
    body = model_body(cache={"size": "10Gi"})
    kube, reconciler = _setup(settings, body)
    await reconciler.reconcile(body)
    # Everything of the model's gone (a clean-up by hand), a Service of its
    # name someone else's now.
    for resource, name in (
        (DEPLOYMENTS, "mixtral"),
        (SERVICES, "mixtral"),
        (PVCS, "mixtral-cache"),
    ):
        del kube.objects[(resource.plural, "llm", name)]
    kube.put(foreign(SERVICES))
    kube.applied.clear()
    with pytest.raises(ReconcileError, match="Service mixtral already exists"):
        await _resync(kube, reconciler)
    assert [sub for sub, _ in kube.applied] == ["status"]
    assert (DEPLOYMENTS.plural, "llm", "mixtral") not in kube.objects
    assert (PVCS.plural, "llm", "mixtral-cache") not in kube.objects


async def test_a_model_refused_its_service_is_routed_once_it_has_its_own(
    settings: OperatorSettings,
) -> None:
    body = model_body()
    kube, reconciler = _setup(settings, body, model_body("llama"), foreign(SERVICES))
    with pytest.raises(ReconcileError, match="Service mixtral already exists"):
        await reconciler.reconcile(body)
    # Its route would name the payments team's Service: the gateway would send
    # mixtral's clients there. Its status says so, for a new operator too.
    doc = await reconciler.routes.publish()
    assert [r.name for r in doc.models] == ["llama"]
    assert await RoutePublisher(kube, settings).publish() == doc
    # A new operator's refresh before its first reconcile keeps the failure
    # (the status says so), and the model stays out of the routes.
    restarted = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    await restarted.refresh("llm", "mixtral")
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (status["phase"], ready["reason"]) == ("Failed", "ServiceNameTaken")
    assert await restarted.routes.publish() == doc
    # Their Service goes; the periodic pass makes the model's own.
    del kube.objects[(SERVICES.plural, "llm", "mixtral")]
    await _resync(kube, reconciler)
    service = kube.stored(SERVICES, "mixtral", "llm")
    assert [r["uid"] for r in service["metadata"]["ownerReferences"]] == ["uid-mixtral"]
    doc = await reconciler.routes.publish()
    assert {(r.name, r.service) for r in doc.models} == {
        ("llama", "llama"),
        ("mixtral", "mixtral"),
    }


async def test_a_spec_the_deployment_cannot_be_built_from_fails_for_good(
    settings: OperatorSettings,
) -> None:
    # nodeSelectorTerms as a map: the CRD refuses it now, not objects stored before.
    placement = {
        "nodeName": "hx-llm-server-01",
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": {
                    "nodeSelectorTerms": {"matchExpressions": []}
                }
            }
        },
    }
    body = model_body(placement=placement)
    kube, reconciler = _setup(settings, body)
    with pytest.raises(ReconcileError, match="nodeSelectorTerms") as err:
        await reconciler.reconcile(body)
    assert not err.value.retryable  # Kopf does not retry it forever
    assert (DEPLOYMENTS.plural, "llm", "mixtral") not in kube.objects
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    assert status["phase"] == "Failed"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ReconcileFailed"
    assert "must be a list of objects, not a map" in ready["message"]


async def test_a_drift_repair_of_a_spec_that_cannot_be_built_is_only_logged(
    settings: OperatorSettings, caplog: pytest.LogCaptureFixture
) -> None:
    # As after a restart of the operator: the failed generation was observed, and
    # its failure is no longer in memory.
    placement = {
        "nodeName": "hx-llm-server-01",
        "affinity": {
            "nodeAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [
                    {"nodeSelectorTerms": []}
                ]
            }
        },
    }
    body = model_body(placement=placement, status={"observedGeneration": 1})
    kube, reconciler = _setup(settings, body)
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert "requiredDuringSchedulingIgnoredDuringExecution must be an object" in (
        caplog.text
    )
    assert (DEPLOYMENTS.plural, "llm", "mixtral") not in kube.objects


async def test_existing_cache_claim_is_used_untouched(
    settings: OperatorSettings,
) -> None:
    theirs = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "mixtral-cache", "namespace": "llm"},
        "spec": {"resources": {"requests": {"storage": "1Ti"}}},
    }
    body = model_body(cache={"size": "10Gi"})
    kube, reconciler = _setup(settings, body, theirs)
    await reconciler.reconcile(body)
    assert _the_claim(kube)["spec"] == theirs["spec"]
    assert "CacheClaimAdopted" in _reasons(kube)


def _claim(**metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "mixtral-cache", "namespace": "llm", **metadata},
        "spec": {"resources": {"requests": {"storage": "1Ti"}}},
    }


async def test_a_new_claim_is_created_owned_and_marked_with_its_uid(
    settings: OperatorSettings,
) -> None:
    body = model_body(cache={"size": "10Gi", "deletePolicy": "Delete"})
    kube, reconciler = _setup(settings, body)
    await reconciler.reconcile(body)
    [created] = kube.created
    # Owned from the first moment: a model deleted before the next write
    # still takes its claim with it.
    assert [r["uid"] for r in created["metadata"]["ownerReferences"]] == ["uid-mixtral"]
    claim = _the_claim(kube)
    annotations = claim["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_CREATED_FOR] == "uid-mixtral"
    assert annotations[names.ANNOTATION_CREATED_AS] == claim["metadata"]["uid"]


async def test_a_claim_deleted_with_its_model_even_if_marking_it_failed(
    settings: OperatorSettings,
) -> None:
    body = model_body(cache={"size": "10Gi", "deletePolicy": "Delete"})
    kube, reconciler = _setup(settings, body)
    original = kube.apply

    async def unavailable(obj: dict[str, Any], **kwargs: Any) -> Any:
        if obj["kind"] == "PersistentVolumeClaim":
            raise ApiError(503, "ServiceUnavailable", "etcd")
        return await original(obj, **kwargs)

    kube.apply = unavailable  # type: ignore[method-assign]
    with pytest.raises(ReconcileError):
        await reconciler.reconcile(body)
    claim = _the_claim(kube)
    assert [r["uid"] for r in claim["metadata"]["ownerReferences"]] == ["uid-mixtral"]
    # Half marked, it is this model's alone until the next turn marks it whole.
    kube.apply = original  # type: ignore[method-assign]
    await reconciler.reconcile(body)
    claim = _the_claim(kube)
    annotations = claim["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_CREATED_AS] == claim["metadata"]["uid"]


def _marked(made_for: str, made_as: str, **metadata: Any) -> dict[str, Any]:
    annotations = {
        names.ANNOTATION_CREATED_FOR: made_for,
        names.ANNOTATION_CREATED_AS: made_as,
    }
    return _claim(annotations=annotations, **metadata)


async def test_a_retained_claim_serves_the_next_model_of_its_name(
    settings: OperatorSettings,
) -> None:
    retained = _marked("uid-earlier", "uid-claim", uid="uid-claim")
    body = model_body(cache={"size": "2Ti"})
    kube, claim = await _reconciled_claim(settings, body, retained)
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Ti"
    annotations = claim["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_CREATED_FOR] == "uid-earlier"
    assert not kube.created
    assert "CacheClaimAdopted" not in _reasons(kube)


@pytest.mark.parametrize(
    "copied",
    [
        # Labels can be copied from any manifest of ours; with deletePolicy
        # Delete an owner reference on such a claim would have the garbage
        # collector delete it.
        _claim(
            labels={names.LABEL_MANAGED_BY: names.MANAGER_NAME, names.LABEL_MODEL: "x"}
        ),
        # `kubectl get pvc -o yaml` of a claim of ours, renamed and applied.
        _marked("uid-other", "uid-original", uid="uid-copy"),
        # Marked by a create for another model and never marked whole.
        _claim(annotations={names.ANNOTATION_CREATED_FOR: "uid-other"}),
    ],
    ids=["our labels", "our marks", "half our marks"],
)
async def test_copied_labels_or_marks_do_not_make_a_claim_ours(
    settings: OperatorSettings, copied: dict[str, Any]
) -> None:
    body = model_body(cache={"size": "10Gi", "deletePolicy": "Delete"})
    kube, claim = await _reconciled_claim(settings, body, copied)
    assert "ownerReferences" not in claim["metadata"]
    assert claim["spec"] == copied["spec"]
    assert not [o for _, o in kube.applied if o["kind"] == "PersistentVolumeClaim"]
    assert "CacheClaimAdopted" in _reasons(kube)


async def test_retain_removes_the_owner_reference_the_create_set(
    settings: OperatorSettings,
) -> None:
    # The create's field manager entry owns the reference too, so an apply
    # without it would leave it: a JSON patch takes it away.
    kube, reconciler, _ = await _retained(settings)
    claim = _the_claim(kube)
    assert "ownerReferences" not in claim["metadata"]
    [(plural, _, operations)] = kube.patched
    assert plural == "persistentvolumeclaims"
    assert operations[0] == {
        "op": "test",
        "path": "/metadata/ownerReferences/0/uid",
        "value": "uid-mixtral",
    }
    deleting = model_body(cache={"size": "10Gi", "deletePolicy": "Delete"})
    kube.put(deleting)
    await reconciler.reconcile(deleting)
    claim = _the_claim(kube)
    assert [r["uid"] for r in claim["metadata"]["ownerReferences"]] == ["uid-mixtral"]


async def test_a_claim_from_before_the_mark_is_ours_by_its_owner_reference(
    settings: OperatorSettings,
) -> None:
    owned = _claim(
        ownerReferences=[
            {
                "apiVersion": names.API_VERSION,
                "kind": names.KIND,
                "name": "mixtral",
                "uid": "uid-mixtral",
                "controller": True,
            }
        ]
    )
    body = model_body(cache={"size": "2Ti", "deletePolicy": "Delete"})
    _, claim = await _reconciled_claim(settings, body, owned)
    assert claim["spec"]["resources"]["requests"]["storage"] == "2Ti"
    annotations = claim["metadata"]["annotations"]
    assert annotations[names.ANNOTATION_CREATED_FOR] == "uid-mixtral"


async def test_a_claim_made_by_someone_else_meanwhile_is_left_alone(
    settings: OperatorSettings,
) -> None:
    body = model_body(cache={"size": "10Gi", "deletePolicy": "Delete"})
    kube, reconciler = _setup(settings, body)
    original = kube.create

    async def someone_first(obj: dict[str, Any]) -> Any:
        if obj["kind"] == "PersistentVolumeClaim":
            kube.put(_claim())  # between our read and our create
        return await original(obj)

    kube.create = someone_first  # type: ignore[method-assign]
    with pytest.raises(ReconcileError, match="someone else") as err:
        await reconciler.reconcile(body)
    assert err.value.retryable
    claim = _the_claim(kube)
    assert claim["metadata"].get("annotations") is None
    assert "ownerReferences" not in claim["metadata"]


async def test_retain_drops_the_owner_reference_even_when_a_resize_is_refused(
    settings: OperatorSettings,
) -> None:
    deleting = model_body(cache={"size": "100Gi", "deletePolicy": "Delete"})
    kube, reconciler = _setup(settings, deleting)
    await reconciler.reconcile(deleting)
    claim = _the_claim(kube)
    assert [r["uid"] for r in claim["metadata"]["ownerReferences"]] == ["uid-mixtral"]

    # A StorageClass that does not allow expansion refuses the larger size.
    original = kube.apply
    refused: list[str] = []

    async def refuse_growth(
        obj: dict[str, Any], *, subresource: str = "", dry_run: bool = False
    ) -> Any:
        size = obj.get("spec", {}).get("resources", {}).get("requests", {})
        if obj["kind"] == "PersistentVolumeClaim" and size.get("storage") == "200Gi":
            refused.append(obj["metadata"]["name"])
            raise ApiError(
                403, "Forbidden", "only dynamically provisioned pvc can be resized"
            )
        return await original(obj, subresource=subresource, dry_run=dry_run)

    kube.apply = refuse_growth  # type: ignore[method-assign]
    retaining = model_body(cache={"size": "200Gi", "deletePolicy": "Retain"})
    kube.put(retaining)
    await reconciler.reconcile(retaining)
    claim = _the_claim(kube)
    assert "ownerReferences" not in claim["metadata"]  # not deleted with the model
    assert claim["spec"]["resources"]["requests"]["storage"] == "100Gi"
    assert "CacheClaimNotUpdated" in _reasons(kube)
    # The spec still asks for 200Gi at every resync: said once, not every time;
    # asked again each time (a refusal stores nothing), with no other write
    # while the metadata holds.
    kube.applied.clear()
    for _ in range(3):
        await _resync(kube, reconciler)
    assert _reasons(kube).count("CacheClaimNotUpdated") == 1
    assert len(refused) == 4
    assert kube.applied == []
    # A label edit is put back, the spec still refused.
    claim = _the_claim(kube)
    kube.put({**claim, "metadata": {**claim["metadata"], "labels": {}}})
    await _resync(kube, reconciler)
    assert len(refused) == 5
    assert _the_claim(kube)["metadata"]["labels"] == claim["metadata"]["labels"]
    # Once the refusal goes (a quota raised, a class that allows expansion now),
    # the next pass grows the claim.
    kube.apply = original  # type: ignore[method-assign]
    await _resync(kube, reconciler)
    assert _the_claim(kube)["spec"]["resources"]["requests"]["storage"] == "200Gi"


async def test_api_errors_are_classified(settings: OperatorSettings) -> None:
    kube, reconciler = _setup(settings, model_body())
    kube.fail["services"] = ApiError(503, "ServiceUnavailable", "etcd")
    with pytest.raises(ReconcileError) as temporary:
        await reconciler.reconcile(model_body())
    assert temporary.value.retryable
    kube.fail["services"] = ApiError(422, "Invalid", "spec.ports")
    with pytest.raises(ReconcileError) as permanent:
        await reconciler.reconcile(model_body())
    assert not permanent.value.retryable


async def test_refresh_reverts_a_hand_edit(settings: OperatorSettings) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    kube.stored(DEPLOYMENTS, "mixtral", "llm")["spec"]["replicas"] = 7
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert kube.stored(DEPLOYMENTS, "mixtral", "llm")["spec"]["replicas"] == 1
    assert "DriftReverted" in _reasons(kube)


async def test_refresh_recreates_a_deleted_deployment(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    await kube.delete(DEPLOYMENTS, "mixtral", "llm")
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert kube.stored(DEPLOYMENTS, "mixtral", "llm")


async def test_refresh_recreates_a_deleted_service(settings: OperatorSettings) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    made = copy.deepcopy(kube.stored(SERVICES, "mixtral", "llm"))
    await kube.delete(SERVICES, "mixtral", "llm")
    await reconciler.refresh("llm", "mixtral", fix_service=True)
    again = kube.stored(SERVICES, "mixtral", "llm")
    assert again["spec"] == made["spec"]
    assert again["metadata"]["ownerReferences"] == made["metadata"]["ownerReferences"]
    assert kube.events[-1]["reason"] == "DriftReverted"
    assert kube.events[-1]["message"] == "created the missing Service mixtral"
    # Someone else's of that name, made before the refresh, is left alone.
    await kube.delete(SERVICES, "mixtral", "llm")
    kube.put(foreign(SERVICES))
    await reconciler.refresh("llm", "mixtral", fix_service=True)
    assert "ownerReferences" not in kube.stored(SERVICES, "mixtral", "llm")["metadata"]


async def test_drift_repair_leaves_a_deployment_of_someone_else_alone(
    settings: OperatorSettings,
) -> None:
    class LabelledView(ApiView):
        """Like Kopf's indexes: only Deployments labelled as ours."""

        async def deployment(self, namespace: str, name: str) -> Any:
            found = await super().deployment(namespace, name)
            labels = (found or {}).get("metadata", {}).get("labels", {})
            return found if labels.get(names.LABEL_MANAGED_BY) else None

    kube, reconciler = _setup(settings, model_body())
    reconciler.use(LabelledView(kube))
    await reconciler.reconcile(model_body())
    # Ours is deleted; someone makes their own of that name before the refresh.
    await kube.delete(DEPLOYMENTS, "mixtral", "llm")
    theirs = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "mixtral", "namespace": "llm"},
        "spec": {"replicas": 9},
    }
    kube.put(theirs)
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert kube.stored(DEPLOYMENTS, "mixtral", "llm")["spec"] == {"replicas": 9}
    assert (
        "ownerReferences" not in kube.stored(DEPLOYMENTS, "mixtral", "llm")["metadata"]
    )


async def test_refresh_follows_the_pods(settings: OperatorSettings) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    kube.put(pod("mixtral-abc", waiting="CrashLoopBackOff"))
    await reconciler.refresh("llm", "mixtral")
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    assert status["phase"] == "Degraded"
    # Ready, Progressing and Degraded all changed: one Event, led by the warning.
    assert _reasons(kube) == ["MonitoringUnavailable", "CrashLoopBackOff"]
    assert kube.events[-1]["type"] == "Warning"


def _lost_since(since: str) -> dict[str, Any]:
    """A replica that served and has not been ready since `since`: its node
    stopped reporting (the node controller turned Ready False, nothing else)."""
    body = pod("mixtral-abc", ready=False)
    body["status"]["conditions"] = [
        {
            "type": "Initialized",
            "status": "True",
            "lastTransitionTime": "2026-05-01T09:00:00Z",
        },
        {"type": "Ready", "status": "False", "lastTransitionTime": since},
        {
            "type": "ContainersReady",
            "status": "True",
            "lastTransitionTime": "2026-05-01T09:04:00Z",
        },
        {"type": "PodScheduled", "status": "True"},
    ]
    body["status"]["containerStatuses"] = [
        {
            "name": "vllm",
            "ready": True,
            "restartCount": 0,
            "state": {"running": {"startedAt": "2026-05-01T09:00:01Z"}},
        }
    ]
    return body


async def test_a_replica_lost_within_the_grace_is_refreshed_when_it_ends(
    settings: OperatorSettings,
) -> None:
    kube = FakeKube([*NODES, model_body(), _lost_since("2026-05-01T11:59:30Z")])
    now = [NOW]
    reconciler = Reconciler(kube, settings, Metrics(), clock=lambda: now[0])
    await reconciler.reconcile(model_body())
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    assert status["phase"] == "Progressing"  # 30 s of the grace gone
    due = reconciler._lapses["llm/mixtral"]
    loop = asyncio.get_running_loop()
    assert 30 < due.when() - loop.time() <= 30 + LAPSE_MARGIN_S
    # When it is due: Degraded, with no event from the cluster.
    now[0] = "2026-05-01T12:00:31Z"
    reconciler._lapse_due("llm", "mixtral")
    await asyncio.gather(*reconciler._spawned)
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    assert status["phase"] == "Degraded"
    assert "llm/mixtral" not in reconciler._lapses
    # A model deleted meanwhile asks for nothing more.
    now[0] = NOW
    await reconciler.refresh("llm", "mixtral")
    assert "llm/mixtral" in reconciler._lapses
    await reconciler.forget("llm", "mixtral")
    assert reconciler._lapses == {}


async def test_a_refresh_that_ends_after_the_delete_asks_for_no_lapse(
    settings: OperatorSettings,
) -> None:
    """A refresh in flight when the model is deleted ends after forget(): the
    refresh it would ask for at the lost replica's grace is of a model gone."""
    gate = asyncio.Event()
    gate.set()

    class SlowKube(FakeKube):
        async def list(
            self,
            resource: Resource,
            namespace: str | None = None,
            *,
            label_selector: str | None = None,
        ) -> list[dict[str, Any]]:
            if resource == PODS:
                await gate.wait()
            return await super().list(
                resource, namespace, label_selector=label_selector
            )

    kube = SlowKube([*NODES, model_body(), _lost_since("2026-05-01T11:59:30Z")])
    reconciler = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    await reconciler.reconcile(model_body())
    assert "llm/mixtral" in reconciler._lapses
    # The model is deleted while its refresh reads the pods.
    gate.clear()
    refresh = asyncio.create_task(reconciler.refresh("llm", "mixtral"))
    await asyncio.sleep(0.01)
    await kube.delete(LLMMODELS, "mixtral", "llm")
    await reconciler.forget("llm", "mixtral")
    gate.set()
    await refresh
    assert reconciler._lapses == {}
    await reconciler.stop()


async def test_refresh_of_a_missing_model_is_quiet(settings: OperatorSettings) -> None:
    kube, reconciler = _setup(settings)
    await reconciler.refresh("llm", "gone", fix_drift=True)
    assert kube.applied == []


async def test_name_conflict_shows_in_the_status(settings: OperatorSettings) -> None:
    first = model_body("a", servedName="chat")
    second = model_body("b", servedName="chat", created="2026-06-01T00:00:00Z")
    kube, reconciler = _setup(settings, first, second)
    await reconciler.reconcile(first)
    await reconciler.reconcile(second)
    await reconciler.routes.publish()  # finds the clash, starts a refresh of "b"
    await asyncio.gather(*reconciler._spawned)
    status = kube.stored(LLMMODELS, "b", "llm")["status"]
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "ServedNameConflict"
    assert status["phase"] == "Failed"


async def test_fallbacks_and_split_targets_of_no_model_are_told_on_the_model(
    settings: OperatorSettings,
) -> None:
    routing = {
        "fallbacks": ["smoll", "later"],
        "split": [{"model": "v2", "weight": 5}, {"model": "v3", "weight": 5}],
    }
    big = model_body("big", routing=routing)
    kube, reconciler = _setup(settings, big, model_body("smol", servedName="smoll"))
    await reconciler.routes.publish()
    await asyncio.gather(*reconciler._spawned)
    [fallback] = [e for e in kube.events if e["reason"] == reconcile.UNKNOWN_FALLBACK]
    assert fallback["type"] == "Warning"
    assert fallback["involvedObject"]["name"] == "big"
    assert fallback["message"].startswith(
        "spec.routing.fallbacks: 'later' names no model the gateway routes"
    )
    assert "requests skip it until one does" in fallback["message"]
    [split] = [e for e in kube.events if e["reason"] == reconcile.UNKNOWN_SPLIT_TARGET]
    assert split["type"] == "Warning"
    assert split["message"].startswith(
        "spec.routing.split: 'v2', 'v3' name no model the gateway routes"
    )
    assert "their shares stay with this model until one does" in split["message"]
    # A replica paused for a peer tells nothing (the peer does).
    kube.put(model_body("other", routing={"fallbacks": ["nowhere"]}))
    reconciler.pause()
    await reconciler.routes.publish()
    await asyncio.gather(*reconciler._spawned)
    assert len(kube.events) == 2


async def _conflicting_and_serving(
    settings: OperatorSettings,
) -> tuple[FakeKube, dict[str, Any]]:
    """Models "a" and, newer, "b" claim the served name "chat"; b's replica is
    ready and its status says ServedNameConflict (Failed)."""
    first = model_body("a", servedName="chat")
    second = model_body("b", servedName="chat", created="2026-06-01T00:00:00Z")
    kube, reconciler = _setup(settings, first, second)
    await reconciler.reconcile(first)
    await reconciler.reconcile(second)
    serving = kube.stored(DEPLOYMENTS, "b", "llm")
    serving["status"] = {
        "observedGeneration": serving["metadata"]["generation"],
        "replicas": 1,
        "updatedReplicas": 1,
        "readyReplicas": 1,
    }
    kube.put(pod("b-abc", model="b"))
    await reconciler.routes.publish()
    await asyncio.gather(*reconciler._spawned)
    await reconciler.refresh("llm", "b")  # the pod's event
    status = kube.stored(LLMMODELS, "b", "llm")["status"]
    assert (status["phase"], status["replicas"]["ready"]) == ("Failed", 1)
    return kube, first


async def test_a_name_conflict_outlives_an_operator_restart(
    settings: OperatorSettings,
) -> None:
    """A new operator knows no conflict until its first publish: the pod events
    and resume reconciles that come before it must not report the model that
    is left out of the routes as Ready (and Failed again a moment later)."""
    kube, _ = await _conflicting_and_serving(settings)
    restarted = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    events = len(kube.events)
    await restarted.refresh("llm", "b")
    await restarted.reconcile(kube.stored(LLMMODELS, "b", "llm"))
    status = kube.stored(LLMMODELS, "b", "llm")["status"]
    assert status["phase"] == "Failed"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ServedNameConflict")
    assert "already served by llm/a" in ready["message"]
    assert kube.events[events:] == []
    # The first publish finds the same: nothing to recheck.
    await restarted.routes.publish()
    assert not restarted._spawned


async def test_a_name_conflict_gone_while_no_operator_ran_is_not_kept(
    settings: OperatorSettings,
) -> None:
    """The conflict is derived from the models, not read back from the status:
    the older model deleted meanwhile, the newer one serves at once."""
    kube, first = await _conflicting_and_serving(settings)
    await kube.delete(LLMMODELS, "a", "llm", uid=first["metadata"]["uid"])
    restarted = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    await restarted.refresh("llm", "b")
    status = kube.stored(LLMMODELS, "b", "llm")["status"]
    assert status["phase"] == "Ready"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("True", "ReplicasReady")


async def test_conflict_rechecks_do_not_hold_the_publisher(
    settings: OperatorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each recheck may wait out a burst of new models; the publish that finds
    the conflicts goes on at once (it took one wait per model in turn)."""
    monkeypatch.setattr(reconcile, "PRECEDENCE_MAX_WAIT_S", 0.5)
    bodies = [model_body("a", servedName="chat")] + [
        model_body(f"copy{i}", servedName="chat", created="2026-06-01T00:00:00Z")
        for i in range(3)
    ]
    _, reconciler = _setup(settings, *bodies)
    async with reconciler._precedence.urgent():  # a new model's reconcile runs
        await asyncio.wait_for(reconciler.routes.publish(), timeout=1)
        assert len(reconciler._spawned) == 3
    await asyncio.wait_for(asyncio.gather(*reconciler._spawned), timeout=5)
    await reconciler.stop()


async def test_forget_clears_the_phase_metrics(settings: OperatorSettings) -> None:
    _, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    registry = reconciler.metrics.registry
    mine = {"model_namespace": "llm", "model": "mixtral", "served_name": "mixtral"}

    def sample(name: str, **labels: str) -> float | None:
        return registry.get_sample_value(name, labels)

    assert sample("citadel_operator_models", phase="Pending") == 1
    assert sample("citadel_operator_model_phase", **mine, phase="Pending") == 1
    assert sample("citadel_operator_model_replicas", **mine, state="desired") == 1
    await reconciler.forget("llm", "mixtral")
    assert sample("citadel_operator_models", phase="Pending") == 0
    assert sample("citadel_operator_model_phase", **mine, phase="Pending") is None
    assert sample("citadel_operator_model_replicas", **mine, state="desired") is None


async def test_a_failed_resync_still_renews_the_models_report(
    settings: OperatorSettings,
) -> None:
    now = [0.0]
    kube = FakeKube([*NODES, model_body()])
    metrics = Metrics(clock=lambda: now[0], stale_after_s=360.0)
    reconciler = Reconciler(kube, settings, metrics, clock=lambda: NOW)
    await reconciler.reconcile(model_body())
    mine = {"model_namespace": "llm", "model": "mixtral", "served_name": "mixtral"}
    labels = {**mine, "phase": "Pending"}
    now[0] = 300.0
    # Changed by hand, so the resync applies it.
    _portless_service(kube)
    kube.fail["services"] = ApiError(503, "ServiceUnavailable", "etcd")
    with pytest.raises(ReconcileError):
        await reconciler.reconcile(model_body(), resync=True)
    now[0] = 400.0
    sample = metrics.registry.get_sample_value
    assert sample("citadel_operator_model_phase", labels) == 1
    now[0] = 700.0  # no resync since 300 s: this replica no longer reports it
    assert sample("citadel_operator_model_phase", labels) is None


async def test_a_pass_that_ends_after_the_delete_leaves_no_series(
    settings: OperatorSettings,
) -> None:
    gate = asyncio.Event()
    gate.set()

    class SlowKube(FakeKube):
        async def apply(
            self, obj: dict[str, Any], *, subresource: str = "", dry_run: bool = False
        ) -> dict[str, Any]:
            if obj["kind"] == "Deployment":
                await gate.wait()
            return await super().apply(obj, subresource=subresource, dry_run=dry_run)

    kube = SlowKube([*NODES, model_body()])
    reconciler = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    await reconciler.reconcile(model_body())
    # A resync of the unchanged model (no status write, so no 404 to stop it)
    # waits while the model is deleted.
    gate.clear()
    stored = kube.stored(LLMMODELS, "mixtral", "llm")
    resync = asyncio.create_task(reconciler.reconcile(stored, resync=True))
    await asyncio.sleep(0.01)
    await kube.delete(LLMMODELS, "mixtral", "llm")
    await reconciler.forget("llm", "mixtral")
    gate.set()
    await resync
    sample = reconciler.metrics.registry.get_sample_value
    labels = {"model_namespace": "llm", "model": "mixtral", "served_name": "mixtral"}
    assert (
        sample("citadel_operator_model_phase", {**labels, "phase": "Pending"}) is None
    )
    assert sample("citadel_operator_models", {"phase": "Pending"}) == 0


async def test_serializer_merges_requests_that_come_while_one_waits() -> None:
    serial = Serializer()
    async with serial.hold("k"), serial.coalesce("x", RefreshWish()) as first:
        assert first == RefreshWish()
    gate = asyncio.Event()
    entered: list[RefreshWish | None] = []

    async def ask(wish: RefreshWish) -> None:
        async with serial.coalesce("k", wish, first=gate.wait) as merged:
            entered.append(merged)

    # The first request waits (for `first`, then the lock); the next two are
    # merged into it, the drift fix of the second with them.
    waiting = asyncio.create_task(ask(RefreshWish()))
    await asyncio.sleep(0)
    await ask(RefreshWish(fix_drift=True))
    await ask(RefreshWish())
    assert entered == [None, None]
    gate.set()
    await waiting
    assert entered == [None, None, RefreshWish(fix_drift=True)]
    # Once it has run, a request waits again, with its own wishes.
    await ask(RefreshWish())
    assert entered[-1] == RefreshWish()


async def test_resyncs_hold_few_slots_and_new_models_pass_them(
    settings: OperatorSettings,
) -> None:
    settings = settings.model_copy(update={"max_concurrent_reconciles": 8})
    gate = asyncio.Event()
    busy = {"now": 0, "peak": 0}

    class SlowKube(FakeKube):
        async def apply(
            self, obj: dict[str, Any], *, subresource: str = "", dry_run: bool = False
        ) -> dict[str, Any]:
            if obj["kind"] == "Deployment" and obj["metadata"]["name"] != "new":
                busy["now"] += 1
                busy["peak"] = max(busy["peak"], busy["now"])
                await gate.wait()
                busy["now"] -= 1
            return await super().apply(obj, subresource=subresource, dry_run=dry_run)

    old = [model_body(f"old{i}") for i in range(4)]
    kube = SlowKube([*NODES, *old, model_body("new")])
    reconciler = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    resyncs = [asyncio.create_task(reconciler.reconcile(b, resync=True)) for b in old]
    await asyncio.sleep(0.05)
    assert busy["peak"] == 1  # 8 slots, an eighth of them for resyncs
    await asyncio.wait_for(reconciler.reconcile(model_body("new")), timeout=2)
    gate.set()
    await asyncio.gather(*resyncs)
    assert busy["peak"] == 1


async def test_refreshes_wait_while_new_models_are_reconciled(
    settings: OperatorSettings,
) -> None:
    gate = asyncio.Event()
    status_writes: list[str] = []

    class SlowKube(FakeKube):
        async def apply(
            self, obj: dict[str, Any], *, subresource: str = "", dry_run: bool = False
        ) -> dict[str, Any]:
            if obj["kind"] == "Deployment" and obj["metadata"]["name"] == "new":
                await gate.wait()
            if subresource == "status":
                status_writes.append(obj["metadata"]["name"])
            return await super().apply(obj, subresource=subresource, dry_run=dry_run)

    kube = SlowKube([*NODES, model_body("old"), model_body("new")])
    reconciler = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    await reconciler.reconcile(model_body("old"))
    status_writes.clear()
    await kube.apply(pod("old-0", model="old"))
    new = asyncio.create_task(reconciler.reconcile(model_body("new")))
    await asyncio.sleep(0.05)
    refresh = asyncio.create_task(reconciler.refresh("llm", "old"))
    await asyncio.sleep(0.05)
    # The old model's status waits while the new model gets its Deployment.
    assert not refresh.done() and status_writes == []
    gate.set()
    await asyncio.wait_for(asyncio.gather(new, refresh), timeout=2)
    assert status_writes == ["new", "old"]


async def test_precedence_waits_a_bounded_time() -> None:
    precedence = Precedence(max_wait_s=0.05)
    await asyncio.wait_for(precedence.wait(), timeout=0.01)  # nothing pending
    async with precedence.urgent():
        began = asyncio.get_running_loop().time()
        await precedence.wait()
        assert asyncio.get_running_loop().time() - began >= 0.05
    await asyncio.wait_for(precedence.wait(), timeout=0.01)


async def test_a_burst_of_new_models_gets_its_deployments_first(
    settings: OperatorSettings,
) -> None:
    settings = settings.model_copy(update={"max_concurrent_reconciles": 1})
    bodies = [model_body(f"m{i}") for i in range(3)]

    class YieldingKube(FakeKube):
        async def apply(
            self, obj: dict[str, Any], *, subresource: str = "", dry_run: bool = False
        ) -> dict[str, Any]:
            await asyncio.sleep(0)  # as a request would, letting others queue
            return await super().apply(obj, subresource=subresource, dry_run=dry_run)

    kube = YieldingKube([*NODES, *bodies])
    reconciler = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    await asyncio.gather(*(reconciler.reconcile(b) for b in bodies))
    order = [
        (obj["kind"], obj["metadata"]["name"])
        for sub, obj in kube.applied
        if not sub and obj["kind"] in ("Deployment", "Service")
    ]
    # Each model's Service (and status) waits behind the Deployments of the
    # models already queued: a model's pods start as early as they can.
    assert order == [
        ("Deployment", "m0"),
        ("Deployment", "m1"),
        ("Deployment", "m2"),
        ("Service", "m0"),
        ("Service", "m1"),
        ("Service", "m2"),
    ]
    for body in bodies:
        stored = kube.stored(LLMMODELS, body["metadata"]["name"], "llm")
        assert stored["status"]["observedGeneration"] == 1


async def test_drift_the_server_refutes_is_left_and_not_asked_again(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    stored = kube.stored(DEPLOYMENTS, "mixtral", "llm")
    # A form the quick check does not know: the fake's dry run (a plain merge)
    # then gives back the object as it is, as the server does for a no-op.
    stored["spec"]["template"]["spec"]["containers"][0]["image"] = "same:in-form"

    async def no_change(obj: dict[str, Any], **_: Any) -> dict[str, Any]:
        kube.dry_runs.append(("", obj))
        return dict(kube.stored(DEPLOYMENTS, "mixtral", "llm"))

    applied = len(kube.applied)
    real_apply = kube.apply
    kube.apply = lambda obj, **kw: (  # type: ignore[method-assign]
        no_change(obj, **kw) if kw.get("dry_run") else real_apply(obj, **kw)
    )
    for _ in range(3):
        await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert len(kube.dry_runs) == 1  # then remembered
    assert "DriftReverted" not in _reasons(kube)
    assert not [o for s, o in kube.applied[applied:] if o["kind"] == "Deployment"]
    # A change to the Deployment is asked about again.
    stored["spec"]["paused"] = True
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert len(kube.dry_runs) == 2


async def test_drift_the_server_confirms_is_put_back(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    kube.stored(DEPLOYMENTS, "mixtral", "llm")["spec"]["template"]["spec"][
        "containers"
    ][0]["image"] = "evil:1"
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert len(kube.dry_runs) == 1
    image = kube.stored(DEPLOYMENTS, "mixtral", "llm")["spec"]["template"]["spec"][
        "containers"
    ][0]["image"]
    assert image != "evil:1"
    assert _reasons(kube).count("DriftReverted") == 1


def _fail_dry_runs(kube: FakeKube, error: ApiError) -> None:
    """Makes every dry-run apply raise `error`; real applies go through."""
    real_apply = kube.apply

    async def apply(obj: dict[str, Any], **kw: Any) -> dict[str, Any]:
        if kw.get("dry_run"):
            raise error
        return await real_apply(obj, **kw)

    kube.apply = apply  # type: ignore[method-assign]


async def test_drift_is_put_back_once_when_the_dry_run_is_refused(
    settings: OperatorSettings, monkeypatch: pytest.MonkeyPatch
) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    kube.stored(DEPLOYMENTS, "mixtral", "llm")["spec"]["replicas"] = 7
    _fail_dry_runs(
        kube,
        ApiError(
            400,
            "BadRequest",
            'admission webhook "audit.example.com" does not support dry run',
        ),
    )
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert kube.stored(DEPLOYMENTS, "mixtral", "llm")["spec"]["replicas"] == 1
    assert "DriftReverted" in _reasons(kube)
    # A quick check that stays wrong (a form it does not know) with no dry run
    # to refute it: what the apply left needs no second apply.
    monkeypatch.setattr("citadel.operator.reconcile.drifted", lambda *_: True)
    applied = len(kube.applied)
    for _ in range(2):
        await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert len(kube.applied) == applied
    assert _reasons(kube).count("DriftReverted") == 1


async def _reconciled_then_updated(
    settings: OperatorSettings,
) -> tuple[FakeKube, Reconciler]:
    """A model reconciled with image A, then changed to image B (generation 2)
    and not reconciled again."""
    body = model_body(engine={"image": "vllm:A"})
    kube, reconciler = _setup(settings, body)
    await reconciler.reconcile(body)
    updated = copy.deepcopy(kube.stored(LLMMODELS, "mixtral", "llm"))
    updated["spec"]["engine"] = {"image": "vllm:B"}
    updated["metadata"]["generation"] = 2
    kube.put(updated)
    return kube, reconciler


async def test_a_refresh_before_the_reconcile_of_a_new_generation_waits_for_it(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = await _reconciled_then_updated(settings)
    # The update is seen by the watch; its reconcile has not run yet.
    statuses = sum(1 for s, _ in kube.applied if s == "status")
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    # Neither "put back manual changes" for the new spec, nor a status that
    # claims generation 2 observed while the Deployment still runs image A.
    assert "DriftReverted" not in _reasons(kube)
    assert sum(1 for s, _ in kube.applied if s == "status") == statuses
    await reconciler.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))
    stored = kube.stored(LLMMODELS, "mixtral", "llm")
    assert stored["status"]["observedGeneration"] == 2


async def test_drift_is_not_judged_on_a_view_behind_the_server(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = await _reconciled_then_updated(settings)
    stale = copy.deepcopy(kube.stored(DEPLOYMENTS, "mixtral", "llm"))
    await reconciler.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))

    class LaggingView(ApiView):
        async def deployment(self, namespace: str, name: str) -> Any:
            return copy.deepcopy(stale)  # the write above not seen yet

    reconciler.use(LaggingView(kube))
    applied = len(kube.applied)
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    assert len(kube.dry_runs) == 1
    assert not [o for s, o in kube.applied[applied:] if o["kind"] == "Deployment"]
    assert "DriftReverted" not in _reasons(kube)


class _GatedKube(FakeKube):
    """Holds the Deployment apply of model `held` until `gate` is set."""

    def __init__(self, objects: list[dict[str, Any]], held: str) -> None:
        super().__init__(objects)
        self.gate = asyncio.Event()
        self._held = held

    async def apply(
        self, obj: dict[str, Any], *, subresource: str = "", dry_run: bool = False
    ) -> dict[str, Any]:
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] == self._held:
            await self.gate.wait()
        return await super().apply(obj, subresource=subresource, dry_run=dry_run)


@pytest.mark.parametrize("turn", ["first", "second"])
async def test_a_model_deleted_while_it_waits_for_a_turn_gets_nothing_more(
    settings: OperatorSettings, turn: str
) -> None:
    settings = settings.model_copy(update={"max_concurrent_reconciles": 1})
    first, doomed = model_body("first"), model_body("doomed", cache={"size": "5Gi"})
    kube = _GatedKube([*NODES, first, doomed], held="first")
    reconciler = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    # "doomed" waits for the only slot, held by "first"; its second turn queues
    # behind "first"'s.
    held = asyncio.create_task(reconciler.reconcile(first))
    await asyncio.sleep(0.01)
    task = asyncio.create_task(reconciler.reconcile(doomed))
    await asyncio.sleep(0.01)
    if turn == "second":
        kube.gate.set()
        while ("deployments", "llm", "doomed") not in kube.objects:
            await asyncio.sleep(0)
    await kube.delete(LLMMODELS, "doomed", "llm")
    await reconciler.forget("llm", "doomed")
    kube.gate.set()
    await asyncio.wait_for(asyncio.gather(held, task), timeout=2)
    gone = [("services", "doomed")]
    if turn == "first":
        # A claim made now would outlive the model (deletePolicy Retain).
        gone += [("deployments", "doomed"), ("persistentvolumeclaims", "doomed-cache")]
    for plural, name in gone:
        assert (plural, "llm", name) not in kube.objects
    # No 404 on a status write counted, no lock left behind.
    errors = reconciler.metrics.registry.get_sample_value(
        "citadel_operator_reconcile_errors_total", {"error": "temporary"}
    )
    assert not errors
    assert "llm/doomed" not in reconciler._serial.held()


async def test_a_permanent_failure_stays_in_the_status_of_its_generation(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = await _reconciled_then_updated(settings)
    kube.put(pod("mixtral-abc"))
    kube.fail["deployments"] = ApiError(403, "Forbidden", "denied by policy")
    with pytest.raises(ReconcileError):
        await reconciler.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))
    applied = len(kube.applied)
    # Pod and Deployment events: the failure is what the status says, and the
    # refused spec is neither applied nor announced as a hand edit put back.
    await reconciler.refresh("llm", "mixtral")
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    assert status["phase"] == "Failed"
    assert not [o for s, o in kube.applied[applied:] if o["kind"] == "Deployment"]
    assert not kube.dry_runs and "DriftReverted" not in _reasons(kube)
    # Once the policy allows it, the next reconcile applies and clears it.
    del kube.fail["deployments"]
    await reconciler.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))
    await reconciler.refresh("llm", "mixtral")
    assert kube.stored(LLMMODELS, "mixtral", "llm")["status"]["phase"] != "Failed"


async def test_a_dry_run_refused_for_this_apply_does_not_lead_to_the_apply(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    kube.stored(DEPLOYMENTS, "mixtral", "llm")["spec"]["replicas"] = 7
    _fail_dry_runs(kube, ApiError(403, "Forbidden", "denied by policy"))
    applied = len(kube.applied)
    await reconciler.refresh("llm", "mixtral", fix_drift=True)
    # The dry run said this apply is refused; only "no dry runs here" falls
    # back to the quick check.
    assert len(kube.applied) == applied
    assert "DriftReverted" not in _reasons(kube)


async def test_a_permanent_failure_outlives_an_operator_restart(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = await _reconciled_then_updated(settings)
    serving = kube.stored(DEPLOYMENTS, "mixtral", "llm")
    serving["status"] = {
        "observedGeneration": serving["metadata"]["generation"],
        "replicas": 1,
        "updatedReplicas": 1,
        "readyReplicas": 1,
    }
    kube.put(pod("mixtral-abc"))
    kube.fail["deployments"] = ApiError(403, "Forbidden", "denied by policy")
    with pytest.raises(ReconcileError):
        await reconciler.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))
    del kube.fail["deployments"]
    # A new operator (a restart, a peer taking over) knows the failure only from
    # the status: pod and Deployment events that come before its first reconcile
    # neither report generation 2 (never applied) as Ready nor apply it.
    restarted = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    events, applied = len(kube.events), len(kube.applied)
    await restarted.refresh("llm", "mixtral")
    await restarted.refresh("llm", "mixtral", fix_drift=True)
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    assert (status["phase"], status["observedGeneration"]) == ("Failed", 2)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "ReconcileFailed")
    assert "denied by policy" in ready["message"]
    assert kube.events[events:] == [] and kube.applied[applied:] == []
    # Its periodic pass applies the failed spec in full, and that clears it.
    kube.applied.clear()
    await _resync(kube, restarted)
    assert _kinds_applied(kube) == ["Deployment", "Service"]
    await restarted.refresh("llm", "mixtral")
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    assert status["phase"] != "Failed"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] != "ReconcileFailed"


async def test_a_spec_change_after_a_restart_does_not_inherit_the_failure(
    settings: OperatorSettings,
) -> None:
    kube, reconciler = await _reconciled_then_updated(settings)
    kube.fail["deployments"] = ApiError(403, "Forbidden", "denied by policy")
    with pytest.raises(ReconcileError):
        await reconciler.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))
    del kube.fail["deployments"]
    restarted = Reconciler(kube, settings, Metrics(), clock=lambda: NOW)
    fixed = copy.deepcopy(kube.stored(LLMMODELS, "mixtral", "llm"))
    fixed["spec"]["engine"] = {"image": "vllm:C"}
    fixed["metadata"]["generation"] = 3
    kube.put(fixed)
    await restarted.reconcile(kube.stored(LLMMODELS, "mixtral", "llm"))
    await restarted.refresh("llm", "mixtral")
    status = kube.stored(LLMMODELS, "mixtral", "llm")["status"]
    assert (status["phase"], status["observedGeneration"]) == ("Pending", 3)
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] != "ReconcileFailed"


async def test_a_paused_replica_writes_no_status(settings: OperatorSettings) -> None:
    """Kopf pauses its handlers for a peer, not the refreshes they set off:
    those in flight are cancelled, new ones do not start, and a pass that
    still ends writes no status from the frozen view."""
    kube, reconciler = _setup(settings, model_body())
    await reconciler.reconcile(model_body())
    gate = asyncio.Event()
    view = reconciler.view

    class Slow(ApiView):
        async def model(self, namespace: str, name: str) -> dict[str, Any] | None:
            await gate.wait()
            return await view.model(namespace, name)

    reconciler.use(Slow(kube))
    kube.put(pod("mixtral-abc", waiting="CrashLoopBackOff"))
    reconciler.spawn_refresh("llm", "mixtral")
    await asyncio.sleep(0)
    [in_flight] = reconciler._spawned
    reconciler.pause()
    reconciler.spawn_refresh("llm", "mixtral")
    assert reconciler._spawned == {in_flight}
    await asyncio.gather(in_flight, return_exceptions=True)
    assert in_flight.cancelled() and not reconciler._spawned
    gate.set()
    written = len(kube.applied)
    await reconciler.refresh("llm", "mixtral")  # a pass Kopf started before
    assert len(kube.applied) == written
    assert kube.stored(LLMMODELS, "mixtral", "llm")["status"]["phase"] != "Degraded"
    assert reconciler.routes.paused
    reconciler.resume()
    assert not reconciler.routes.paused
    await reconciler.refresh("llm", "mixtral")
    assert kube.stored(LLMMODELS, "mixtral", "llm")["status"]["phase"] == "Degraded"


async def _reconciled_at(
    settings: OperatorSettings, now: list[float]
) -> tuple[FakeKube, Reconciler]:
    """A model reconciled by a reconciler whose asked wait's clock reads
    `now[0]`, told by the fake as the client tells it (see main.connect)."""
    wait = AskedWait(reconcile.RETRY_AFTER_MAX_S, lambda: now[0])
    kube = FakeKube([*NODES, model_body()], on_refusal=wait.heed)
    reconciler = Reconciler(
        kube, settings, Metrics(), clock=lambda: NOW, asked_wait=wait
    )
    await reconciler.reconcile(model_body())
    return kube, reconciler


def _requests(kube: FakeKube) -> int:
    """How many requests reached the fake API server (refused writes aside)."""
    made = (kube.reads, kube.applied, kube.dry_runs, kube.created, kube.events)
    return sum(map(len, made)) + len(kube.deleted) + len(kube.patched)


async def test_periodic_passes_send_nothing_while_the_api_server_asks_to_wait(
    settings: OperatorSettings,
) -> None:
    now = [0.0]
    kube, reconciler = await _reconciled_at(settings, now)
    stored = kube.stored(LLMMODELS, "mixtral", "llm")
    # A hand edit the pass puts back; the overloaded API server refuses that
    # write and asks for 30 s of quiet.
    _portless_service(kube)
    kube.fail["services"] = ApiError(429, "TooManyRequests", "slow", retry_after_s=30)
    with pytest.raises(ReconcileError):
        await reconciler.reconcile(stored, resync=True)
    del kube.fail["services"]
    sent = _requests(kube)
    now[0] = 29.0
    await reconciler.reconcile(stored, resync=True)
    await reconciler.refresh("llm", "mixtral", fix_service=True)
    reconciler.spawn_refresh("llm", "mixtral", fix_drift=True)
    await asyncio.gather(*reconciler._spawned)
    assert _requests(kube) == sent
    assert kube.stored(SERVICES, "mixtral", "llm")["spec"]["ports"] == []
    # After the wait, the next pass does what the skipped ones would have.
    now[0] = 30.5
    await reconciler.reconcile(stored, resync=True)
    assert _requests(kube) > sent
    assert kube.stored(SERVICES, "mixtral", "llm")["spec"]["ports"] != []


async def test_a_changed_spec_is_applied_while_the_api_server_asks_to_wait(
    settings: OperatorSettings,
) -> None:
    wait = AskedWait(reconcile.RETRY_AFTER_MAX_S, lambda: 0.0)
    kube = FakeKube([*NODES, model_body()], on_refusal=wait.heed)
    reconciler = Reconciler(
        kube, settings, Metrics(), clock=lambda: NOW, asked_wait=wait
    )
    kube.fail["services"] = ApiError(429, "TooManyRequests", "slow", retry_after_s=30)
    with pytest.raises(ReconcileError) as failed:
        await reconciler.reconcile(model_body())
    assert failed.value.delay == 30  # Kopf's retry waits as asked
    assert reconciler.asked_wait.left() == 30
    del kube.fail["services"]
    # Kopf's create and update handlers are not held back: their retry
    # already waits as long as the API server asked.
    await reconciler.reconcile(model_body())
    assert kube.stored(SERVICES, "mixtral", "llm")


async def test_a_wait_asked_on_any_request_holds_refreshes_back(
    settings: OperatorSettings,
) -> None:
    now = [0.0]
    kube, reconciler = await _reconciled_at(settings, now)
    # The routing ConfigMap's write, not a reconcile, got the 429.
    kube.fail["configmaps"] = ApiError(
        429, "TooManyRequests", "slow", retry_after_s=3600
    )
    with pytest.raises(ApiError):
        await reconciler.routes.publish()
    del kube.fail["configmaps"]
    kube.put(pod("mixtral-abc", waiting="CrashLoopBackOff"))
    now[0] = reconcile.RETRY_AFTER_MAX_S - 1  # the asked hour is capped
    sent = _requests(kube)
    await reconciler.refresh("llm", "mixtral")
    assert _requests(kube) == sent
    now[0] = reconcile.RETRY_AFTER_MAX_S
    await reconciler.refresh("llm", "mixtral")
    assert kube.stored(LLMMODELS, "mixtral", "llm")["status"]["phase"] == "Degraded"
