"""Changes after creation: scaling, new engine arguments, hand edits, deletion."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from .conftest import Kube, llmmodel

pytestmark = pytest.mark.e2e


def _model(name: str, **spec: Any) -> str:
    pinned = {"resources": {"gpus": 1}, "placement": {"nodeName": "hx-llm-server-02"}}
    return llmmodel(name, **{**pinned, **spec})


# Models with a PodDisruptionBudget: a pool of nodes (here of one node), not one
# node by name, where a budget would block the drain.
POOL = {"gpuProduct": "NVIDIA-A100-SXM4-80GB"}


def _events(kube: Kube, selector: str) -> str:
    """`kubectl get events` in the test's namespace, by field selector."""
    return kube.cluster.kubectl(
        "get", "events", "-n", kube.namespace, "--field-selector", selector
    )


def _rollout_events(kube: Kube, model: str) -> int:
    """How many RollingOut events the model got (repeats count)."""
    events = kube.items("events")
    return sum(
        max(1, e.get("count") or 0)
        for e in events
        if e.get("reason") == "RollingOut"
        and e["involvedObject"].get("name") == model
        and e["involvedObject"].get("kind") == "LLMModel"
    )


def _args(kube: Kube, name: str) -> list[str]:
    deployment = kube.get("deployment", name)
    return list(deployment["spec"]["template"]["spec"]["containers"][0]["args"])


def test_scaling_through_the_scale_subresource(kube: Kube) -> None:
    kube.apply(_model("scaled", placement=POOL))
    kube.wait_phase("scaled", "Ready")
    kube.cluster.kubectl(
        "scale", "llmmodel/scaled", "--replicas=3", "-n", kube.namespace
    )
    kube.wait(
        "3 ready replicas",
        lambda: kube.get("llmmodel", "scaled")["status"]["replicas"]["ready"] == 3,
    )
    kube.wait_phase("scaled", "Ready")
    assert kube.get("deployment", "scaled")["spec"]["replicas"] == 3
    assert kube.get("pdb", "scaled")["spec"]["maxUnavailable"] == 1
    route = kube.wait(
        "route", lambda: [r for r in kube.routes() if r["readyReplicas"] == 3]
    )
    assert route[0]["name"] == "scaled"

    kube.cluster.kubectl(
        "scale", "llmmodel/scaled", "--replicas=1", "-n", kube.namespace
    )
    kube.wait("the PDB to go", lambda: kube.get("pdb", "scaled") is None)
    kube.wait(
        "one pod", lambda: len(kube.items("pods", "citadel.ai/model=scaled")) == 1
    )
    kube.delete_model("scaled")


def test_engine_argument_change_rolls_the_deployment(kube: Kube) -> None:
    kube.apply(_model("rolled"))
    kube.wait_phase("rolled", "Ready")
    before = kube.get("deployment", "rolled")
    old_pods = {
        p["metadata"]["name"] for p in kube.items("pods", "citadel.ai/model=rolled")
    }

    kube.apply(
        _model("rolled", engine={"maxModelLen": 4096, "extraArgs": ["--enforce-eager"]})
    )
    kube.wait("new arguments", lambda: "--max-model-len=4096" in _args(kube, "rolled"))
    assert "--enforce-eager" in _args(kube, "rolled")
    after = kube.get("deployment", "rolled")
    assert after["metadata"]["generation"] > before["metadata"]["generation"]

    def replaced() -> bool:
        pods = kube.items("pods", "citadel.ai/model=rolled")
        names = {p["metadata"]["name"] for p in pods}
        return bool(names) and not (names & old_pods)

    kube.wait("the pod to be replaced", replaced)
    kube.wait_phase("rolled", "Ready")
    body = kube.get("llmmodel", "rolled")
    assert body["status"]["observedGeneration"] == body["metadata"]["generation"]
    replica_sets = kube.items("replicasets", "citadel.ai/model=rolled")
    assert len(replica_sets) == 2
    kube.delete_model("rolled")


def test_an_annotation_on_the_deployment_does_not_flap_the_model(
    kube: Kube,
) -> None:
    """An annotation bumps a Deployment's generation and rolls nothing out; the
    model stays Ready throughout (a flap leaves a RollingOut event and a new
    transition time behind it)."""
    kube.apply(_model("tagged"))
    kube.wait_phase("tagged", "Ready")
    before = kube.condition("tagged", "Progressing")
    rollouts = _rollout_events(kube, "tagged")
    deployment = kube.get("deployment", "tagged")
    kube.cluster.kubectl(
        "annotate", "deployment", "tagged", "team=search", "-n", kube.namespace
    )

    def observed() -> bool:
        now = kube.get("deployment", "tagged")
        generation = now["metadata"]["generation"]
        seen = now["status"].get("observedGeneration") == generation
        return seen and generation > deployment["metadata"]["generation"]

    kube.wait("the controller to observe the annotation", observed)
    time.sleep(2)  # the operator handles the Deployment's events meanwhile
    assert kube.condition("tagged", "Progressing") == before
    assert kube.phase("tagged") == "Ready"
    assert _rollout_events(kube, "tagged") == rollouts
    kube.delete_model("tagged")


def test_hand_edits_to_the_deployment_are_reverted(kube: Kube) -> None:
    kube.apply(_model("guarded"))
    kube.wait_phase("guarded", "Ready")
    patch = {
        "spec": {
            "replicas": 4,
            "template": {"spec": {"containers": [{"name": "vllm", "image": "evil:1"}]}},
        }
    }
    kube.cluster.kubectl(
        "patch", "deployment", "guarded", "-n", kube.namespace, "-p", json.dumps(patch)
    )

    def restored() -> bool:
        spec = kube.get("deployment", "guarded")["spec"]
        image = spec["template"]["spec"]["containers"][0]["image"]
        return spec["replicas"] == 1 and image.startswith("vllm/vllm-openai:")

    kube.wait("the Deployment to be put back", restored, timeout=30)
    kube.cluster.kubectl("delete", "deployment", "guarded", "-n", kube.namespace)
    kube.wait(
        "the Deployment to be recreated",
        lambda: kube.get("deployment", "guarded") is not None,
        timeout=30,
    )
    kube.wait_phase("guarded", "Ready")
    assert "DriftReverted" in _events(kube, "reason=DriftReverted")
    kube.delete_model("guarded")


def test_delete_removes_what_it_owned_but_keeps_the_cache(
    kube: Kube, cache_volume: Callable[..., str]
) -> None:
    cache_volume("doomed-cache")
    kube.apply(_model("doomed", replicas=2, cache={"size": "10Gi"}, placement=POOL))
    kube.wait_phase("doomed", "Ready")
    kube.wait("its route", lambda: [r for r in kube.routes() if r["name"] == "doomed"])
    kube.delete_model("doomed")
    for kind in ("deployment", "service", "pdb"):
        kube.wait(f"the {kind} to go", lambda k=kind: kube.get(k, "doomed") is None)
    kube.wait(
        "the route to go",
        lambda: not [r for r in kube.routes() if r["name"] == "doomed"],
    )
    claim = kube.get("pvc", "doomed-cache")
    assert claim is not None and claim["metadata"].get("deletionTimestamp") is None


def test_delete_policy_deletes_only_a_claim_the_operator_made(
    kube: Kube, cache_volume: Callable[..., str]
) -> None:
    deleting = {"size": "10Gi", "deletePolicy": "Delete"}
    cache_volume("made-cache")
    kube.apply(_model("made", cache=deleting))
    kube.wait_phase("made", "Ready")

    def owners(claim: str) -> list[str]:
        meta = kube.get("pvc", claim)["metadata"]
        return [r["name"] for r in meta.get("ownerReferences", [])]

    assert owners("made-cache") == ["made"]
    made = kube.get("pvc", "made-cache")["metadata"]
    assert made["annotations"]["citadel.ai/created-as"] == made["uid"]
    # The create set the owner reference, so the create's field manager owns it
    # too: Retain must still take it away (an apply alone would not).
    kube.apply(_model("made", cache={**deleting, "deletePolicy": "Retain"}))
    kube.wait("the owner reference to go", lambda: not owners("made-cache"))
    kube.apply(_model("made", cache=deleting))
    kube.wait("the owner reference back", lambda: owners("made-cache") == ["made"])

    # Someone's claim with our labels and marks copied onto it (`kubectl get
    # -o yaml` of ours, renamed): used, never owned.
    cache_volume("copied-cache")
    labels = {
        "app.kubernetes.io/managed-by": "citadel-operator",
        "citadel.ai/model": "copied",
    }
    kube.apply(
        json.dumps(
            {
                "apiVersion": "v1",
                "kind": "PersistentVolumeClaim",
                "metadata": {
                    "name": "copied-cache",
                    "labels": labels,
                    "annotations": {
                        k: v
                        for k, v in made["annotations"].items()
                        if k.startswith("citadel.ai/")  # not the binder's
                    },
                },
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "resources": {"requests": {"storage": "10Gi"}},
                },
            }
        )
    )
    kube.apply(_model("copied", cache=deleting))
    kube.wait_phase("copied", "Ready")
    assert owners("copied-cache") == []
    adopted = "reason=CacheClaimAdopted,involvedObject.name=copied"
    assert "copied-cache" in _events(kube, adopted)

    kube.delete_model("copied")
    kube.delete_model("made")
    kube.wait(
        "the garbage collector to delete made-cache",
        lambda: (
            (claim := kube.get("pvc", "made-cache")) is None
            or claim["metadata"].get("deletionTimestamp")
        ),
    )
    claim = kube.get("pvc", "copied-cache")
    assert claim is not None and claim["metadata"].get("deletionTimestamp") is None
