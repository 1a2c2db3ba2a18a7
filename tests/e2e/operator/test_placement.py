"""Models that cannot be placed say why, in words a person understands."""

from __future__ import annotations

import pytest

from .conftest import Kube, llmmodel

pytestmark = pytest.mark.e2e


def _model(name: str, placement: dict[str, str], gpus: int) -> str:
    return llmmodel(
        name,
        model="Qwen/Qwen2.5-72B-Instruct",
        resources={"gpus": gpus},
        placement=placement,
    )


def _scheduled(kube: Kube, name: str, reason: str) -> dict[str, str]:
    return dict(
        kube.wait(
            f"Scheduled=False/{reason} on {name}",
            lambda: (
                (c := kube.condition(name, "Scheduled")).get("reason") == reason
                and c.get("status") == "False"
                and c
            ),
        )
    )


def test_sixteen_gpus_on_a_four_gpu_node(kube: Kube) -> None:
    kube.apply(_model("huge", {"nodeName": "hx-llm-server-01"}, 16))
    cond = _scheduled(kube, "huge", "InsufficientGPUs")
    assert "16 nvidia.com/gpu" in cond["message"]
    assert "hx-llm-server-01 has 4" in cond["message"]
    # The scheduler's own words join once the pod has been tried.
    kube.wait(
        "the scheduler's message",
        lambda: (
            "Insufficient nvidia.com/gpu"
            in kube.condition("huge", "Scheduled")["message"]
        ),
    )
    assert kube.phase("huge") == "Failed"
    ready = kube.condition("huge", "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "InsufficientGPUs")


def test_sixteen_gpus_anywhere(kube: Kube) -> None:
    kube.apply(_model("huger", {}, 16))
    cond = _scheduled(kube, "huger", "InsufficientGPUs")
    assert "hx-llm-server-02 has 8" in cond["message"]


def test_node_that_does_not_exist(kube: Kube) -> None:
    kube.apply(_model("lost", {"nodeName": "hx-llm-server-99"}, 1))
    cond = _scheduled(kube, "lost", "NodeNotFound")
    assert "node 'hx-llm-server-99' does not exist" in cond["message"]
    assert "hx-llm-server-01" in cond["message"]  # lists the real ones
    events = kube.cluster.kubectl("get", "events", "-n", kube.namespace)
    assert "NodeNotFound" in events


def test_node_already_full_quotes_the_scheduler(kube: Kube) -> None:
    kube.apply(_model("first", {"nodeName": "hx-llm-server-01"}, 3))
    kube.wait_phase("first", "Ready")
    kube.apply(_model("second", {"nodeName": "hx-llm-server-01"}, 3))
    cond = _scheduled(kube, "second", "Unschedulable")
    assert "nvidia.com/gpu" in cond["message"]
    assert kube.phase("second") == "Pending"
    kube.delete_model("second")
    kube.delete_model("first")
