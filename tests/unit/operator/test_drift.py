"""Drift detection on owned objects."""

from __future__ import annotations

import copy

import pytest

from citadel.operator.builders.deployment import build_deployment
from citadel.operator.drift import covers, drifted
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


def test_missing_object_is_drift(settings: OperatorSettings) -> None:
    assert drifted(build_deployment(make_model(), settings), None)


def test_scalars_compare_as_the_api_writes_them() -> None:
    assert covers({"a": 1}, {"a": "1"})
    assert not covers({"a": False}, {"a": 0})
    assert not covers([1, 2], [1])
