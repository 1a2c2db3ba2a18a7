"""Two replicas with Kopf peering: one works, the other takes over when it stops."""

from __future__ import annotations

import json
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


def _peering(cluster: KubeCluster, namespace: str) -> None:
    cluster.kubectl(
        "apply",
        "-n",
        namespace,
        "-f",
        "-",
        input_text="apiVersion: kopf.dev/v1\nkind: KopfPeering\n"
        "metadata: {name: citadel-operator}\n",
    )


def _replica(
    operator: OperatorProcess,
    namespace: str,
    tmp_path: Path,
    priority: int,
    **env: str,
) -> OperatorProcess:
    """An operator replica of its own in `namespace`, with mandatory peering."""
    return OperatorProcess(
        kubeconfig=operator.kubeconfig,
        log_path=tmp_path / f"operator-{priority}.log",
        env={
            "CITADEL_OPERATOR_WATCH_NAMESPACES": namespace,
            "CITADEL_OPERATOR_GATEWAY_NAMESPACE": namespace,
            "CITADEL_OPERATOR_PEERING": "mandatory",
            "CITADEL_OPERATOR_PEERING_PRIORITY": str(priority),
            **env,
        },
    )


def _routed(kube: Kube, namespace: str) -> set[str]:
    cm = kube.get("configmap", "citadel-routes", namespace)
    if cm is None:
        return set()
    return {m["name"] for m in json.loads(cm["data"]["routes.json"])["models"]}


def test_only_the_higher_priority_replica_works(
    cluster: KubeCluster,
    peer_namespace: str,
    tmp_path: Path,
    operator: OperatorProcess,
) -> None:
    _peering(cluster, peer_namespace)
    replicas = {
        priority: _replica(operator, peer_namespace, tmp_path, priority)
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


def test_a_model_deleted_while_a_replica_stood_by_is_not_routed_by_it(
    cluster: KubeCluster,
    peer_namespace: str,
    tmp_path: Path,
    operator: OperatorProcess,
) -> None:
    """Paused for a peer, a replica's watches stop; resumed, they list again, and
    Kopf keeps in its indexes the models deleted meanwhile (no event came). The
    replica finds them gone (sweep.py) and leaves them out of the routes."""
    _peering(cluster, peer_namespace)
    # A short period: the sweep runs once per resync period.
    fast = {"CITADEL_OPERATOR_RESYNC_SECONDS": "10"}
    low = _replica(operator, peer_namespace, tmp_path, 10, **fast)
    high = _replica(operator, peer_namespace, tmp_path, 20, **fast)
    kube = Kube(cluster, peer_namespace)
    gpu = {"resources": {"gpus": 0}}
    try:
        low.start()
        kube.apply(llmmodel("kept", **gpu))
        kube.apply(llmmodel("deleted", **gpu))
        kube.wait(
            "both routed by the only replica",
            lambda: _routed(kube, peer_namespace) == {"kept", "deleted"},
            timeout=60,
        )
        high.start()
        kube.wait(
            "the first replica to pause for the higher-priority one",
            lambda: "Pausing operations in favour of" in low.log_path.read_text(),
            timeout=90,
        )
        kube.delete_model("deleted")
        kube.wait(
            "the deleted model to leave the routes",
            lambda: _routed(kube, peer_namespace) == {"kept"},
            timeout=30,
        )
        high.stop()
        kube.wait(
            "the first replica to take over again and find the model gone",
            lambda: "deleted while the watch was down" in low.log_path.read_text(),
            timeout=90,
        )
        # Its next write of the routes (its resync timer forces one at least
        # once a period) leaves the model out, and stays so.
        kube.wait(
            "the routes without the deleted model",
            lambda: _routed(kube, peer_namespace) == {"kept"},
            timeout=30,
        )
        assert kube.get("deployment", "deleted") is None
    finally:
        high.stop()
        low.stop()
        for name in ("kept", "deleted"):
            cluster.kubectl(
                "delete", "llmmodel", name, "-n", peer_namespace, check=False
            )
