"""Kopf's handling state in memory: nothing of it is written to the model."""

from __future__ import annotations

import copy
from typing import Any

import kopf
import pytest

from citadel.operator.kopfstate import MemoryState

pytestmark = pytest.mark.unit


def _body(replicas: int = 1, **status: Any) -> kopf.Body:
    return kopf.Body(
        {
            "apiVersion": "citadel.ai/v1alpha1",
            "kind": "LLMModel",
            "metadata": {
                "name": "m",
                "namespace": "ns",
                "uid": "uid-1",
                "generation": replicas,
                "resourceVersion": "7",
                "annotations": {
                    # What an older operator left behind: not part of the essence.
                    "citadel.ai/last-handled-configuration": '{"spec": {}}',
                },
            },
            "spec": {"replicas": replicas},
            "status": status,
        }
    )


def _cause(state: MemoryState, body: kopf.Body) -> str:
    """What Kopf makes of `body` with this state: no essence stored is a creation,
    an empty diff against it nothing, anything else an update (the e2e tests run
    Kopf itself)."""
    old = state.diffbase.fetch(body=body)
    if old is None:
        return "create"
    return "noop" if old == state.diffbase.build(body=body) else "update"


def test_what_was_handled_is_remembered_without_patching() -> None:
    state = MemoryState()
    body = _body()
    assert _cause(state, body) == "create"
    patch = kopf.Patch()
    state.diffbase.store(
        body=body, patch=patch, essence=state.diffbase.build(body=body)
    )
    assert not patch
    # Our own status write changes nothing Kopf handles...
    assert _cause(state, _body(phase="Ready")) == "noop"
    # ...a new spec is an update.
    assert _cause(state, _body(replicas=2)) == "update"
    # A deleted model's state goes; a model of that name made again is new.
    state.forget(["uid-1"])
    assert len(state.diffbase) == 0
    assert _cause(state, body) == "create"


def test_progress_is_kept_and_purged_in_memory() -> None:
    state = MemoryState()
    body = _body()
    patch = kopf.Patch()
    key = kopf.HandlerId("reconcile-create")
    record: kopf.ProgressRecord = {"started": "2026-11-29T00:00:00", "retries": 1}
    state.progress.store(key=key, record=copy.deepcopy(record), body=body, patch=patch)
    assert not patch
    assert state.progress.fetch(key=key, body=body) == record
    state.progress.purge(key=key, body=body, patch=patch)
    assert not patch
    assert state.progress.fetch(key=key, body=body) is None
    assert len(state.progress) == 0


def test_touch_still_wakes_the_object_after_a_retry_delay() -> None:
    # Kopf patches a dummy annotation to get an event when a delay is over;
    # without it a failed reconcile would wait for the periodic resync.
    state = MemoryState()
    patch = kopf.Patch()
    state.progress.touch(body=_body(), patch=patch, value="now")
    assert patch["metadata"]["annotations"]


def test_essence_is_what_kopfs_own_storage_builds() -> None:
    # Built from the spec, labels, annotations and generation only (not a copy of
    # the whole body), and the same as Kopf's stock storage makes of the whole
    # body with the generation as an extra field.
    raw = dict(_body(phase="Ready"))
    raw["metadata"] = {
        **raw["metadata"],
        "labels": {"team": "a"},
        "managedFields": [{"manager": "citadel-operator", "fieldsV1": {"f:x": {}}}],
        "creationTimestamp": "2026-11-29T00:00:00Z",
    }
    raw["metadata"]["annotations"] = {
        **raw["metadata"]["annotations"],
        "note": "kept",
        "kubectl.kubernetes.io/last-applied-configuration": "{}",
    }
    body = kopf.Body(raw)
    stock = kopf.AnnotationsDiffBaseStorage(
        prefix="citadel.ai", key="last-handled-configuration"
    )
    essence = MemoryState().diffbase.build(body=body)
    assert essence == stock.build(body=body, extra_fields=["metadata.generation"])
    assert essence == {
        "metadata": {
            "labels": {"team": "a"},
            "annotations": {"note": "kept"},
            "generation": 1,
        },
        "spec": {"replicas": 1},
    }


def test_pods_and_deployments_get_no_essence() -> None:
    # Kopf builds an essence for every event, but compares them only for
    # resources with change or timer handlers; the operator has those for
    # LLMModels alone.
    pod = kopf.Body(
        {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "p", "namespace": "ns", "uid": "uid-2"},
            "spec": {"containers": [{"name": "vllm", "image": "vllm"}]},
        }
    )
    assert MemoryState().diffbase.build(body=pod) == {}
    # A body without a kind (never seen from Kopf) is treated as a model.
    raw = dict(_body())
    del raw["kind"]
    assert MemoryState().diffbase.build(body=kopf.Body(raw)) == {
        "metadata": {"generation": 1},
        "spec": {"replicas": 1},
    }


def test_a_spec_changed_and_changed_back_is_still_an_update() -> None:
    state = MemoryState()
    handled = _body()
    state.diffbase.store(
        body=handled, patch=kopf.Patch(), essence=state.diffbase.build(body=handled)
    )
    # Spec 1 -> 2 -> 1 while the model waited: the same spec, generation 3,
    # and generation 3 was never reconciled.
    back = copy.deepcopy(dict(handled))
    back["metadata"]["generation"] = 3
    assert _cause(state, kopf.Body(back)) == "update"
