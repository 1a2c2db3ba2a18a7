"""Drift on a real API server: what other field managers add is left alone, what
they change of ours is put back, once."""

from __future__ import annotations

import json
from typing import Any

import pytest
from harness.kube import KubeCluster

from citadel.operator.drift import MAP_LISTS, MAP_LISTS_BY_KIND, SET_LISTS

from .conftest import Kube, OperatorProcess, llmmodel

pytestmark = pytest.mark.e2e

_SCHEMA_PREFIX = "#/components/schemas/"


def _list_fields(
    schemas: dict[str, Any], name: str, found: dict[str, set[Any]], seen: set[str]
) -> None:
    """Every list field reachable from schema `name`, with its list type and map
    keys, not looking inside atomic lists (our apply replaces those whole)."""
    if name in seen:
        return
    seen.add(name)
    for field, prop in schemas[name].get("properties", {}).items():
        target = prop["allOf"][0] if "allOf" in prop else prop
        if target.get("type") == "array":
            kind = prop.get("x-kubernetes-list-type", "atomic")
            keys = tuple(prop.get("x-kubernetes-list-map-keys", ()))
            found.setdefault(field, set()).add((kind, keys))
            items = target["items"]
            items = items["allOf"][0] if "allOf" in items else items
            if kind == "map" and "$ref" in items:
                _list_fields(schemas, items["$ref"][len(_SCHEMA_PREFIX) :], found, seen)
        elif "$ref" in target:
            _list_fields(schemas, target["$ref"][len(_SCHEMA_PREFIX) :], found, seen)


@pytest.mark.parametrize(
    ("path", "schema", "kind"),
    [
        ("apis/apps/v1", "io.k8s.api.apps.v1.Deployment", "Deployment"),
        ("api/v1", "io.k8s.api.core.v1.Service", "Service"),
        ("api/v1", "io.k8s.api.core.v1.PersistentVolumeClaim", "PersistentVolumeClaim"),
        (
            "apis/policy/v1",
            "io.k8s.api.policy.v1.PodDisruptionBudget",
            "PodDisruptionBudget",
        ),
    ],
)
def test_merged_lists_match_the_api_servers_schema(
    cluster: KubeCluster, path: str, schema: str, kind: str
) -> None:
    doc = json.loads(cluster.kubectl("get", "--raw", f"/openapi/v3/{path}"))
    found: dict[str, set[Any]] = {}
    _list_fields(doc["components"]["schemas"], schema, found, set())
    # A field name used for lists of two kinds would make the table ambiguous.
    assert all(len(kinds) == 1 for kinds in found.values()), found
    kinds = {field: next(iter(k)) for field, k in found.items()}
    maps = {f: keys for f, (kind, keys) in kinds.items() if kind == "map"}
    sets = {f for f, (kind, _) in kinds.items() if kind == "set"}
    table = MAP_LISTS_BY_KIND.get(kind, MAP_LISTS)
    assert {f: k for f, k in table.items() if f in kinds} == maps
    assert sets == SET_LISTS


def _drift_events(kube: Kube, model: str) -> int:
    out = kube.cluster.kubectl(
        "get",
        "events",
        "-n",
        kube.namespace,
        "--field-selector",
        f"reason=DriftReverted,involvedObject.name={model}",
        "-o",
        "json",
    )
    return len(json.loads(out)["items"])


def _rolled_out(kube: Kube, name: str) -> bool:
    deployment = kube.get("deployment", name)
    status = deployment.get("status", {})
    return bool(
        status.get("observedGeneration") == deployment["metadata"]["generation"]
        and status.get("updatedReplicas") == deployment["spec"]["replicas"]
        and status.get("readyReplicas") == deployment["spec"]["replicas"]
        and status.get("replicas") == deployment["spec"]["replicas"]
    )


def _patch_containers(kube: Kube, name: str, *containers: dict[str, Any]) -> None:
    """A strategic merge patch of the pod template's containers, by name, as
    kubectl's field manager."""
    patch = {"spec": {"template": {"spec": {"containers": list(containers)}}}}
    kube.cluster.kubectl(
        "patch", "deployment", name, "-n", kube.namespace, "-p", json.dumps(patch)
    )


def test_additions_by_other_managers_stay_and_are_not_reverted(kube: Kube) -> None:
    # Quantities the API server stores in another form ("500m", "1Gi").
    kube.apply(
        llmmodel(
            "shared",
            resources={"gpus": 1, "cpu": "0.5", "memory": "1024Mi"},
            placement={"nodeName": "hx-llm-server-02"},
        )
    )
    kube.wait_phase("shared", "Ready")
    kube.wait("the first rollout", lambda: _rolled_out(kube, "shared"))
    stored = kube.get("deployment", "shared")["spec"]["template"]["spec"]
    assert stored["containers"][0]["resources"]["requests"]["cpu"] == "500m"
    assert _drift_events(kube, "shared") == 0

    # What a sidecar injector or a policy engine does: entries beside ours.
    _patch_containers(
        kube,
        "shared",
        {"name": "sidecar", "image": "proxy:1"},
        {"name": "vllm", "env": [{"name": "EXTRA", "value": "1"}]},
    )
    kube.wait("the sidecar's rollout", lambda: _rolled_out(kube, "shared"))
    kube.wait_phase("shared", "Ready")
    assert _drift_events(kube, "shared") == 0

    # A field of ours changed by hand is put back, with one Event, and the other
    # manager's entries stay.
    _patch_containers(kube, "shared", {"name": "vllm", "image": "evil:1"})

    def restored() -> dict[str, Any] | None:
        pod = kube.get("deployment", "shared")["spec"]["template"]["spec"]
        by_name = {c["name"]: c for c in pod["containers"]}
        image = by_name["vllm"]["image"]
        return by_name if image.startswith("vllm/vllm-openai:") else None

    containers = kube.wait("the image to be put back", restored, timeout=30)
    assert set(containers) == {"vllm", "sidecar"}
    assert {"name": "EXTRA", "value": "1"} in containers["vllm"]["env"]
    kube.wait("the DriftReverted event", lambda: _drift_events(kube, "shared") == 1)
    kube.wait("the last rollout", lambda: _rolled_out(kube, "shared"))
    kube.wait_phase("shared", "Ready")
    assert _drift_events(kube, "shared") == 1
    kube.delete_model("shared")


def test_forms_only_the_server_knows_are_confirmed_once_and_left(
    kube: Kube, operator: OperatorProcess
) -> None:
    # The API server rounds a CPU request up to a whole millicore; the quick
    # check does not know that rule, so the dry run of the apply has the last
    # word.
    kube.apply(
        llmmodel(
            "tiny",
            resources={"gpus": 1, "cpu": "0.0000000001"},
            placement={"nodeName": "hx-llm-server-02"},
        )
    )
    kube.wait_phase("tiny", "Ready")
    kube.wait("the rollout", lambda: _rolled_out(kube, "tiny"))
    stored = kube.get("deployment", "tiny")["spec"]["template"]["spec"]
    assert stored["containers"][0]["resources"]["requests"]["cpu"] == "1m"
    # Deployment events that change nothing of ours.
    for i in range(3):
        kube.cluster.kubectl(
            "annotate",
            "deployment",
            "tiny",
            f"e2e/touch={i}",
            "--overwrite",
            "-n",
            kube.namespace,
        )
    kube.wait("the annotations observed", lambda: _rolled_out(kube, "tiny"))
    kube.wait_phase("tiny", "Ready")
    assert _drift_events(kube, "tiny") == 0
    marker = f"{kube.namespace}/tiny: the Deployment differs only in form"
    kube.wait("the dry run's verdict", lambda: marker in operator.tail(400))
    # Remembered: one dry run for the three events and the rollout's.
    assert operator.tail(400).count(marker) == 1
    kube.delete_model("tiny")


def test_a_service_changed_by_hand_is_put_back_at_once(kube: Kube) -> None:
    # Services carrying the operator's label are watched: the edit is put back
    # within a second or two, where the resync (every 30 s here) would take 15 s
    # on average; 10 s leaves room for a slow machine.
    kube.apply(llmmodel("svc", placement={"nodeName": "hx-llm-server-02"}))
    kube.wait_phase("svc", "Ready")
    ours = kube.get("service", "svc")["spec"]["ports"]
    assert [p["port"] for p in ours] == [8000]
    # Someone replaces our port with theirs: ours is put back, theirs stays.
    added = {"name": "debug", "port": 9000, "targetPort": 9000, "protocol": "TCP"}
    patch = {"spec": {"ports": [added]}}
    kube.cluster.kubectl(
        "patch", "service", "svc", "-n", kube.namespace, "--type=merge",
        "-p", json.dumps(patch),
    )  # fmt: skip

    def ports() -> list[int] | None:
        found = sorted(p["port"] for p in kube.get("service", "svc")["spec"]["ports"])
        return found if 8000 in found else None

    assert kube.wait("the port to be put back", ports, timeout=10, interval=0.5) == [
        8000,
        9000,
    ]
    kube.delete_model("svc")


def test_a_deleted_service_is_made_again_at_once(kube: Kube) -> None:
    # Services carrying the operator's label are watched: a deletion brings the
    # model's Service back within a second or two, where the resync (every 30 s
    # here) would take 15 s on average; 10 s leaves room for a slow machine.
    kube.apply(llmmodel("gone-svc", placement={"nodeName": "hx-llm-server-02"}))
    kube.wait_phase("gone-svc", "Ready")
    before = kube.get("service", "gone-svc")["metadata"]["uid"]
    kube.cluster.kubectl("delete", "service", "gone-svc", "-n", kube.namespace)

    def remade() -> str | None:
        found = kube.get("service", "gone-svc")
        uid: str | None = found["metadata"]["uid"] if found else None
        return uid if uid not in (None, before) else None

    assert kube.wait("the Service to be made again", remade, timeout=10, interval=0.5)
    assert [p["port"] for p in kube.get("service", "gone-svc")["spec"]["ports"]] == [
        8000
    ]
    kube.delete_model("gone-svc")
