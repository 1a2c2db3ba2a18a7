"""The harness pod runtime behaves like a kubelet where Citadel's tests lean on it:
a local pod is reported Ready once its program runs, and a deleted pod stays
Terminating through its preStop drain with its ServiceAccount token still valid,
then goes away.

Both were once wrong: two concurrent status writes could land out of order and
leave a running pod reported not Ready for good, and the status write at the
start of the drain triggered a second, immediate deletion, which voided the pod's
token while its program was still shutting down (an operator could not remove its
peering record on exit).
"""

from __future__ import annotations

import ipaddress
import json
import shutil
import time
from pathlib import Path
from typing import Any

import pytest
from harness.kube import KubeCluster
from harness.wait import wait_for

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(
        shutil.which("redis-server") is None,
        reason="the local pod runs Debian's redis-server (installed by .ci/run)",
    ),
]

POD_NETWORK = ipaddress.ip_network("10.244.128.0/17")
DRAIN_S = 6


def local_pod(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "annotations": {"citadel.ai/runtime": "local"}},
        "spec": {
            "nodeName": "hx-cpu-01",
            "serviceAccountName": name,
            "terminationGracePeriodSeconds": 30,
            "containers": [
                {
                    "name": "redis",
                    "image": "docker.io/library/redis:7.4",
                    "lifecycle": {"preStop": {"sleep": {"seconds": DRAIN_S}}},
                }
            ],
        },
    }


def get_pod(cluster: KubeCluster, namespace: str, name: str) -> dict[str, Any] | None:
    out = cluster.kubectl(
        "get", "pod", name, "-n", namespace, "-o", "json", "--ignore-not-found"
    )
    return json.loads(out) if out.strip() else None


def is_ready(pod: dict[str, Any] | None) -> bool:
    conditions = (pod or {}).get("status", {}).get("conditions", [])
    return any(c["type"] == "Ready" and c["status"] == "True" for c in conditions)


def test_local_pod_is_ready_then_drains_with_a_valid_token(
    cluster: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    if not cluster.local:
        pytest.skip("the harness pod runtime only runs on the local cluster")
    cluster.kubectl("create", "serviceaccount", "runner", "-n", namespace)
    cluster.kubectl(
        "apply", "-n", namespace, "-f", "-", input_text=json.dumps(local_pod("runner"))
    )

    pod = wait_for(
        "the local pod to be reported Ready",
        lambda: p if is_ready(p := get_pod(cluster, namespace, "runner")) else None,
        timeout=60,
    )
    assert ipaddress.ip_address(pod["status"]["podIP"]) in POD_NETWORK
    # Ready must stay Ready: a late, stale status write would flip it back.
    time.sleep(2)
    assert is_ready(get_pod(cluster, namespace, "runner"))

    token = cluster.kubectl(
        "create",
        "token",
        "runner",
        "-n",
        namespace,
        "--bound-object-kind=Pod",
        "--bound-object-name=runner",
        "--duration=10m",
    ).strip()
    as_pod = cluster.with_token(token, tmp_path / "runner.kubeconfig")

    cluster.kubectl("delete", "pod", "runner", "-n", namespace, "--wait=false")
    deleted_at = time.monotonic()
    wait_for(
        "the drain to report the pod not Ready",
        lambda: not is_ready(get_pod(cluster, namespace, "runner")),
        timeout=10,
    )
    # Half-way through the preStop drain the pod is still there, Terminating,
    # and a token bound to it still authenticates.
    time.sleep(max(0.0, DRAIN_S / 2 - (time.monotonic() - deleted_at)))
    pod_now = get_pod(cluster, namespace, "runner")
    assert pod_now is not None, "the pod was removed before its drain ended"
    assert pod_now["metadata"].get("deletionTimestamp")
    who = json.loads(as_pod.kubectl("auth", "whoami", "-o", "json"))
    assert who["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{namespace}:runner"
    )
    wait_for(
        "the pod to be removed after its drain",
        lambda: get_pod(cluster, namespace, "runner") is None,
        timeout=40,
    )
