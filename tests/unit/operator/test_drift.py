"""Drift detection on owned objects."""

from __future__ import annotations

import copy
from collections.abc import Callable
from decimal import Decimal
from typing import Any

import pytest

from citadel.operator import names
from citadel.operator.builders.deployment import build_deployment
from citadel.operator.builders.objects import build_service
from citadel.operator.drift import (
    covers,
    drifted,
    fingerprint,
    quantity,
    unchanged_by,
)
from citadel.operator.settings import OperatorSettings

from .samples import make_model

pytestmark = pytest.mark.unit


def test_defaults_added_by_the_server_are_not_drift(settings: OperatorSettings) -> None:
    desired = build_deployment(make_model(), settings)
    actual = copy.deepcopy(desired)
    actual["metadata"].update(uid="u", resourceVersion="7", annotations={"x": "y"})
    actual["spec"]["template"]["spec"]["dnsPolicy"] = "ClusterFirst"
    actual["spec"]["template"]["spec"]["containers"][0]["imagePullPolicy"] = "Always"
    actual["status"] = {"replicas": 1}
    assert not drifted(desired, actual)


@pytest.mark.parametrize(
    "edit",
    [
        lambda d: d["spec"].update(replicas=5),
        lambda d: d["spec"]["template"]["spec"]["containers"][0]["args"].append("--x"),
        lambda d: d["spec"]["template"]["spec"]["containers"][0].update(image="evil:1"),
        lambda d: d["metadata"]["labels"].pop("app.kubernetes.io/managed-by"),
    ],
)
def test_manual_edits_are_drift(settings: OperatorSettings, edit: object) -> None:
    desired = build_deployment(make_model(), settings)
    actual = copy.deepcopy(desired)
    edit(actual)  # type: ignore[operator]
    assert drifted(desired, actual)


def _served(service: dict[str, Any]) -> dict[str, Any]:
    """`service` as the API server stores it, with its defaults."""
    stored = copy.deepcopy(service)
    stored["spec"].update(
        clusterIP="10.96.0.7",
        clusterIPs=["10.96.0.7"],
        ipFamilies=["IPv4"],
        ipFamilyPolicy="SingleStack",
        internalTrafficPolicy="Cluster",
        sessionAffinity="None",
    )
    return stored


def test_a_service_with_its_defaults_and_a_port_of_someone_else_holds_ours() -> None:
    desired = build_service(make_model())
    actual = _served(desired)
    # Another manager's port: a Service's ports merge by port number and
    # protocol (not by a container's port, as in a pod), so ours is still there.
    actual["spec"]["ports"].append(
        {"name": "debug", "port": 9000, "targetPort": 9000, "protocol": "TCP"}
    )
    assert not drifted(desired, actual)


@pytest.mark.parametrize(
    "edit",
    [
        lambda s: s["ports"][0].update(port=8081),
        lambda s: s["ports"].clear(),
        lambda s: s["selector"].pop(names.LABEL_MODEL),
        lambda s: s.update(type="NodePort"),
    ],
)
def test_changes_to_our_service_are_drift(
    edit: Callable[[dict[str, Any]], object],
) -> None:
    desired = build_service(make_model())
    actual = _served(desired)
    edit(actual["spec"])
    assert drifted(desired, actual)


def test_missing_object_is_drift(settings: OperatorSettings) -> None:
    assert drifted(build_deployment(make_model(), settings), None)


def test_scalars_compare_as_the_api_writes_them() -> None:
    assert covers({"a": 1}, {"a": "1"})
    assert not covers({"a": False}, {"a": 0})
    assert not covers([1, 2], [1])


def _pod(deployment: dict[str, Any]) -> dict[str, Any]:
    pod: dict[str, Any] = deployment["spec"]["template"]["spec"]
    return pod


def _edited(
    desired: dict[str, Any], edit: Callable[[dict[str, Any]], object]
) -> dict[str, Any]:
    """A copy of `desired` with `edit` applied to its pod spec."""
    actual = copy.deepcopy(desired)
    edit(_pod(actual))
    return actual


def _cached_model_deployment(settings: OperatorSettings) -> dict[str, Any]:
    """A Deployment with a volume, a mount and an env var of ours."""
    deployment = build_deployment(
        make_model(engine={"env": [{"name": "HF_HOME", "value": "/x"}]}), settings
    )
    assert _pod(deployment)["volumes"] and _pod(deployment)["containers"][0]["env"]
    return deployment


@pytest.mark.parametrize(
    "addition",
    [
        # A sidecar another tool put in (a mesh, a log shipper).
        lambda p: p["containers"].append({"name": "sidecar", "image": "proxy:1"}),
        lambda p: p["containers"][0]["env"].append({"name": "OTHER", "value": "1"}),
        lambda p: p["volumes"].append({"name": "extra", "emptyDir": {}}),
        lambda p: p["containers"][0]["volumeMounts"].append(
            {"name": "extra", "mountPath": "/extra"}
        ),
        lambda p: p["containers"][0]["ports"].append(
            {"name": "admin", "containerPort": 9000, "protocol": "TCP"}
        ),
        lambda p: p.setdefault("imagePullSecrets", []).append({"name": "regcred"}),
        # Entries of ours, in another order: the server merges by key.
        lambda p: p["containers"][0]["env"].reverse(),
    ],
)
def test_entries_other_managers_add_to_merged_lists_are_not_drift(
    settings: OperatorSettings, addition: Callable[[dict[str, Any]], object]
) -> None:
    desired = _cached_model_deployment(settings)
    actual = _edited(desired, addition)
    actual["metadata"]["labels"]["team"] = "x"
    actual["metadata"]["finalizers"] = ["example.com/keep"]
    assert not drifted(desired, actual)


@pytest.mark.parametrize(
    "edit",
    [
        lambda p: p["containers"][0]["env"].pop(),
        lambda p: p["containers"][0]["env"][-1].update(value="/elsewhere"),
        lambda p: p["volumes"].pop(),
        lambda p: p["containers"][0]["ports"][0].update(containerPort=9999),
        lambda p: p["containers"][0].update(name="renamed"),
        # Atomic lists are replaced whole by our apply: an addition is drift.
        lambda p: p["tolerations"].append({"key": "k", "operator": "Exists"}),
        lambda p: p["containers"][0]["command"].append("--more"),
    ],
)
def test_changes_to_entries_of_ours_are_drift(
    settings: OperatorSettings, edit: Callable[[dict[str, Any]], object]
) -> None:
    desired = _cached_model_deployment(settings)
    assert drifted(desired, _edited(desired, edit))


@pytest.mark.parametrize(
    ("ours", "stored"),
    [("0.5", "500m"), ("1024Mi", "1Gi"), ("1e3", "1k"), ("2", 2), ("1.5Gi", "1536Mi")],
)
def test_quantities_compare_by_value(
    settings: OperatorSettings, ours: str, stored: object
) -> None:
    desired = build_deployment(make_model(resources={"cpu": ours}), settings)
    actual = copy.deepcopy(desired)
    container = _pod(actual)["containers"][0]
    container["resources"]["requests"]["cpu"] = stored
    assert not drifted(desired, actual)
    container["resources"]["requests"]["cpu"] = "3"
    assert drifted(desired, actual)


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("500m", Decimal("0.5")),
        ("1Gi", Decimal(2**30)),
        ("1E", Decimal("1e18")),
        ("1Ei", Decimal(2**60)),
        ("2e3", Decimal(2000)),
        ("1.5k", Decimal(1500)),
        (".5", Decimal("0.5")),
        (3, Decimal(3)),
        (
            "123456789012345678901234567891k",
            Decimal("123456789012345678901234567891000"),
        ),
        ("1x", None),
        ("e3", None),
        ("1e", None),
        (True, None),
    ],
)
def test_quantity(text: object, value: Decimal | None) -> None:
    assert quantity(text) == value


def test_empty_values_the_server_drops_are_not_drift(
    settings: OperatorSettings,
) -> None:
    desired = build_deployment(
        make_model(
            engine={"env": [{"name": "EMPTY", "value": ""}]},
            placement={"tolerations": [{"key": "", "operator": "Exists"}]},
        ),
        settings,
    )
    actual = copy.deepcopy(desired)
    pod = _pod(actual)
    next(e for e in pod["containers"][0]["env"] if e["name"] == "EMPTY").pop("value")
    next(t for t in pod["tolerations"] if t.get("key") == "").pop("key")
    assert not drifted(desired, actual)


def test_a_divisor_compares_by_value(settings: OperatorSettings) -> None:
    ref = {"resource": "limits.memory", "divisor": "1024Ki"}
    env = [{"name": "MEM", "valueFrom": {"resourceFieldRef": ref}}]
    desired = build_deployment(make_model(engine={"env": env}), settings)
    actual = copy.deepcopy(desired)
    stored = next(e for e in _pod(actual)["containers"][0]["env"] if e["name"] == "MEM")
    stored["valueFrom"]["resourceFieldRef"]["divisor"] = "1Mi"
    assert not drifted(desired, actual)


@pytest.mark.parametrize(
    "edit",
    [
        # Our apply replaces atomic lists whole: a key added inside one of our
        # entries would go, so it is drift.
        lambda p: p["tolerations"][0].update(tolerationSeconds=30),
        lambda p: p["affinity"]["nodeAffinity"][
            "requiredDuringSchedulingIgnoredDuringExecution"
        ]["nodeSelectorTerms"][0].update(
            matchExpressions=[{"key": "k", "operator": "Exists"}]
        ),
    ],
)
def test_keys_added_inside_entries_of_atomic_lists_are_drift(
    settings: OperatorSettings, edit: Callable[[dict[str, Any]], object]
) -> None:
    desired = build_deployment(
        make_model(resources={"gpus": 1}, placement={"nodeName": "n1"}), settings
    )
    assert drifted(desired, _edited(desired, edit))


def test_the_dry_run_comparison_and_fingerprint(settings: OperatorSettings) -> None:
    desired = build_deployment(make_model(), settings)
    actual = copy.deepcopy(desired)
    actual["metadata"].update(generation=3, resourceVersion="9", annotations={"a": "b"})
    actual["status"] = {"replicas": 1}
    result = copy.deepcopy(actual)
    result["metadata"]["annotations"] = {}
    result["status"] = {}
    assert unchanged_by(result, actual)
    result["spec"]["replicas"] = 4
    assert not unchanged_by(result, actual)

    mark = fingerprint(desired, actual)
    status_only = copy.deepcopy(actual)
    status_only["status"] = {"replicas": 2}
    status_only["metadata"]["resourceVersion"] = "10"
    assert fingerprint(desired, status_only) == mark
    status_only["metadata"]["generation"] = 4
    status_only["metadata"]["annotations"] = {"c": "d"}
    assert fingerprint(desired, status_only) == mark
    for change in (
        lambda a: a["spec"].update(paused=True),
        lambda a: a["metadata"]["labels"].update(x="y"),
    ):
        changed = copy.deepcopy(actual)
        change(changed)
        assert fingerprint(desired, changed) != mark


def test_an_empty_label_or_node_selector_value_removed_is_drift(
    settings: OperatorSettings,
) -> None:
    desired = build_deployment(
        make_model(placement={"nodeSelector": {"pool": "", "zone": "a"}}), settings
    )
    actual = copy.deepcopy(desired)
    del _pod(actual)["nodeSelector"]["pool"]  # the server keeps "" in such maps
    assert drifted(desired, actual)
