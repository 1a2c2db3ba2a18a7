"""Operator restarts, and how quickly a new model gets its Deployment."""

from __future__ import annotations

import queue
import statistics
import subprocess
import threading
import time

import pytest
from prometheus_client.parser import text_string_to_metric_families

from .conftest import Kube, OperatorProcess, llmmodel

pytestmark = pytest.mark.e2e


def _model(name: str) -> str:
    return llmmodel(
        name, resources={"gpus": 1}, placement={"gpuProduct": "NVIDIA-A100-SXM4-80GB"}
    )


def test_restart_mid_reconcile_converges_without_duplicates(
    kube: Kube, operator: OperatorProcess
) -> None:
    names = [f"restart-{i}" for i in range(4)]
    operator.stop()
    try:
        for name in names:
            kube.apply(_model(name))
    finally:
        operator.start()
    # Killed while the new models are being reconciled, then started again.
    time.sleep(0.3)
    operator.stop(kill=True)
    operator.start()
    for name in names:
        kube.wait_phase(name, "Ready")
    for name in names:
        # Kopf's handling state stays in the operator's memory: the restarted
        # operator handled the models without writing to them.
        annotations = kube.get("llmmodel", name)["metadata"].get("annotations", {})
        assert not [a for a in annotations if a.startswith("citadel.ai/")], annotations
        selector = f"citadel.ai/model={name}"
        assert len(kube.items("deployments", selector)) == 1
        assert len(kube.items("replicasets", selector)) == 1, "template changed"
        assert len(kube.items("pods", selector)) == 1
        assert len(kube.items("services", selector)) == 1
    routes = kube.wait(
        "four ready routes",
        lambda: (
            (r := kube.routes()) and len(r) == 4 and all(x["ready"] for x in r) and r
        ),
    )
    assert sorted(r["name"] for r in routes) == names
    for name in names:
        kube.delete_model(name)


def test_changes_made_while_stopped_are_applied_on_start(
    kube: Kube, operator: OperatorProcess
) -> None:
    # The operator keeps no handling state on the models, so the one that starts
    # must find the change by itself.
    kube.apply(_model("offline"))
    kube.wait_phase("offline", "Ready")
    operator.stop()
    try:
        kube.cluster.kubectl(
            "scale", "llmmodel/offline", "--replicas=2", "-n", kube.namespace
        )
    finally:
        operator.start()
    kube.wait(
        "two replicas",
        lambda: kube.get("deployment", "offline")["spec"]["replicas"] == 2,
    )
    kube.wait(
        "the new generation observed",
        lambda: (
            (body := kube.get("llmmodel", "offline"))["status"].get(
                "observedGeneration"
            )
            == body["metadata"]["generation"]
        ),
    )
    # And the running operator still tells updates from its own status writes.
    kube.cluster.kubectl(
        "scale", "llmmodel/offline", "--replicas=1", "-n", kube.namespace
    )
    kube.wait(
        "one replica",
        lambda: kube.get("deployment", "offline")["spec"]["replicas"] == 1,
    )
    kube.delete_model("offline")


class _Watch:
    """`kubectl get deployments --watch`, with the arrival time of every line."""

    def __init__(self, kube: Kube) -> None:
        cluster = kube.cluster
        args = [cluster.kubectl_path, f"--kubeconfig={cluster.kubeconfig}"]
        if cluster.context:
            args.append(f"--context={cluster.context}")
        args += ["get", "deployments", "-n", kube.namespace, "--watch", "-o", "name"]
        self.proc = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
        )
        self.lines: queue.Queue[tuple[float, str]] = queue.Queue()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put((time.monotonic(), line.strip()))

    def first(self, name: str, timeout: float = 30) -> float:
        deadline = time.monotonic() + timeout
        while True:
            seen, line = self.lines.get(timeout=max(0.1, deadline - time.monotonic()))
            if line.endswith(f"/{name}"):
                return seen

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()


def test_time_from_apply_to_deployment(
    kube: Kube, record_property: pytest.RecordProperty
) -> None:
    """Measured, not a target: the time is reported, the bound is only a sanity one."""
    watch = _Watch(kube)
    time.sleep(1.0)  # the watch is established
    from_start, from_return = [], []
    try:
        for i in range(8):
            name = f"latency-{i}"
            start = time.monotonic()
            kube.apply(_model(name))
            returned = time.monotonic()
            seen = watch.first(name)
            from_start.append(seen - start)
            from_return.append(seen - returned)
    finally:
        watch.close()
    report = (
        f"apply -> Deployment over {len(from_start)} models: "
        f"median {statistics.median(from_start) * 1000:.0f} ms, "
        f"max {max(from_start) * 1000:.0f} ms from starting `kubectl apply`; "
        f"median {statistics.median(from_return) * 1000:.0f} ms after it returned"
    )
    print(f"\n{report}")
    record_property("apply_to_deployment", report)
    assert max(from_start) < 10, report
    for i in range(8):
        kube.cluster.kubectl("delete", "llmmodel", f"latency-{i}", "-n", kube.namespace)


def test_metrics_count_reconciles_and_phases(
    kube: Kube, operator: OperatorProcess
) -> None:
    kube.apply(_model("counted"))
    kube.wait_phase("counted", "Ready")

    def exported() -> str | None:
        text = operator.metrics()
        ready = [
            line
            for line in text.splitlines()
            if line.startswith('citadel_operator_models{phase="Ready"}')
        ]
        return text if ready and float(ready[0].split()[-1]) >= 1 else None

    text = kube.wait("a Ready model in the metrics", exported)
    assert 'citadel_operator_reconciles_total{kind="full",result="ok"}' in text
    assert "citadel_operator_reconcile_duration_seconds_bucket" in text
    assert 'citadel_operator_route_publishes_total{result="ok"}' in text
    mine = {"model_namespace": kube.namespace, "model": "counted"}
    assert _samples(text, "citadel_operator_model_phase", mine) == {
        ("counted", "Ready"): 1.0
    }
    assert _samples(text, "citadel_operator_model_replicas", mine) == {
        ("counted", "desired"): 1.0,
        ("counted", "current"): 1.0,
        ("counted", "updated"): 1.0,
        ("counted", "ready"): 1.0,
    }
    kube.delete_model("counted")

    def gone() -> bool:
        current = operator.metrics()
        return not _samples(current, "citadel_operator_model_phase", mine)

    kube.wait("the deleted model's series gone", gone)


def _samples(
    text: str, name: str, labels: dict[str, str]
) -> dict[tuple[str, str], float]:
    """(served_name, phase or state) -> value of the samples of `name` that carry
    `labels`, from an exposition in any label order."""
    return {
        (
            sample.labels["served_name"],
            sample.labels.get("phase") or sample.labels["state"],
        ): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == name and labels.items() <= sample.labels.items()
    }
