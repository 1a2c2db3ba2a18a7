"""Two replicas with Kopf peering: one works, the other takes over when it stops."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.kube import KubeCluster

from .conftest import Kube, OperatorProcess, llmmodel

pytestmark = pytest.mark.e2e


@pytest.fixture
def peer_namespace(cluster: KubeCluster, crds: None) -> Iterator[str]:
    """A namespace outside the session operator's `e2e-*` scope."""
    name = f"peering-{uuid.uuid4().hex[:6]}"
    cluster.kubectl("create", "namespace", name)
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def _reconciles(process: OperatorProcess) -> int:
    return process.log_path.read_text().count("reconciled ")


def test_only_the_higher_priority_replica_works(
    cluster: KubeCluster,
    peer_namespace: str,
    tmp_path: Path,
    operator: OperatorProcess,
) -> None:
    cluster.kubectl(
        "apply",
        "-n",
        peer_namespace,
        "-f",
        "-",
        input_text="apiVersion: kopf.dev/v1\nkind: KopfPeering\n"
        "metadata: {name: citadel-operator}\n",
    )
    replicas = {
        priority: OperatorProcess(
            kubeconfig=operator.kubeconfig,
            log_path=tmp_path / f"operator-{priority}.log",
            env={
                "CITADEL_OPERATOR_WATCH_NAMESPACES": peer_namespace,
                "CITADEL_OPERATOR_GATEWAY_NAMESPACE": peer_namespace,
                "CITADEL_OPERATOR_PEERING": "mandatory",
                "CITADEL_OPERATOR_PEERING_PRIORITY": str(priority),
            },
        )
        for priority in (10, 20)
    }
    kube = Kube(cluster, peer_namespace)
    try:
        # Mandatory peering: each replica starts paused and works only once it
        # knows no peer of higher priority is alive.
        replicas[20].start()
        replicas[10].start()
        kube.apply(
            llmmodel(
                "peered",
                resources={"gpus": 1},
                placement={"gpuProduct": "NVIDIA-A100-SXM4-80GB"},
            )
        )
        kube.wait_phase("peered", "Ready")
        kube.wait(
            "the higher-priority replica to log its reconcile",
            lambda: _reconciles(replicas[20]) >= 1,
            timeout=30,
        )
        assert _reconciles(replicas[10]) == 0

        replicas[20].stop()
        kube.cluster.kubectl(
            "scale", "llmmodel/peered", "--replicas=2", "-n", peer_namespace
        )
        kube.wait(
            "the other replica to take over",
            lambda: kube.get("deployment", "peered")["spec"]["replicas"] == 2,
            timeout=90,
        )
        kube.wait(
            "the other replica to log its reconcile",
            lambda: _reconciles(replicas[10]) >= 1,
            timeout=30,
        )
    finally:
        for process in replicas.values():
            process.stop()
        cluster.kubectl(
            "delete", "llmmodel", "peered", "-n", peer_namespace, check=False
        )
