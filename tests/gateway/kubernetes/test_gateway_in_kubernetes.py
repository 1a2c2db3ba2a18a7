"""The gateway against a real API server: routes from the ConfigMap, replicas from
EndpointSlices, keys from Secrets made by `citadel keys`; changes take effect
without a restart.

The API server refuses loopback addresses in EndpointSlices, and tests target only
loopback, so the slices list documentation addresses (192.0.2.0/24, never routed)
and the test reads the gateway's view of them from `/admin/replicas` without
sending a request there. Traffic through replicas is tested with a routes file
(tests/gateway/test_replicas.py)."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from harness.kube import KubeCluster

pytestmark = pytest.mark.e2e

BIN = Path(sys.executable).parent
WAIT_S = 60.0


def eventually(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.2)
    pytest.fail(f"not within {WAIT_S}s: {what}")


def apply(kube: KubeCluster, obj: dict[str, Any]) -> None:
    kube.kubectl("apply", "-f", "-", input_text=json.dumps(obj))


def routes(namespace: str, aliases: list[str]) -> dict[str, Any]:
    doc = {
        "schemaVersion": 1,
        "models": [
            {
                "name": "smol",
                "namespace": namespace,
                "servedName": "smol",
                "aliases": aliases,
                "service": "smol",
                "strategy": "round-robin",
            }
        ],
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "citadel-routes", "namespace": namespace},
        "data": {"routes.json": json.dumps(doc)},
    }


def endpoint_slice(
    namespace: str, name: str, address: str, **conditions: bool
) -> dict[str, Any]:
    return {
        "apiVersion": "discovery.k8s.io/v1",
        "kind": "EndpointSlice",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"kubernetes.io/service-name": "smol"},
        },
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8000, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": [address], "conditions": {"ready": True, **conditions}}
        ],
    }


def keys(kube: KubeCluster, namespace: str, *args: str) -> str:
    return subprocess.run(
        [
            str(BIN / "citadel"),
            "keys",
            "--kubeconfig",
            str(kube.kubeconfig),
            "-n",
            namespace,
            *args,
        ],
        check=True,
        capture_output=True,
        text=True,
    ).stdout


def test_routes_replicas_and_keys_follow_the_cluster(
    kube: KubeCluster, kube_namespace: str, start_gateway: Any
) -> None:
    ns = kube_namespace
    apply(kube, endpoint_slice(ns, "smol-a", "192.0.2.10"))
    apply(kube, endpoint_slice(ns, "smol-b", "192.0.2.11"))
    apply(kube, routes(ns, []))
    out = keys(kube, ns, "create", "alice", "--models", "smol*")
    key = out.strip().splitlines()[-1]
    admin = keys(kube, ns, "create", "ops", "--role", "admin").strip().splitlines()[-1]
    listing = keys(kube, ns, "list")
    assert "alice" in listing and key not in listing
    gateway = start_gateway(
        None,
        None,
        routes_source="kubernetes",
        kubeconfig=str(kube.kubeconfig),
        namespace=ns,
    )
    as_user = httpx.Client(
        base_url=gateway.url, headers={"authorization": f"Bearer {key}"}
    )
    as_admin = httpx.Client(
        base_url=gateway.url, headers={"authorization": f"Bearer {admin}"}
    )
    with as_user, as_admin:
        changes_take_effect(gateway, kube, ns, as_user, as_admin)


def changes_take_effect(
    gateway: Any,
    kube: KubeCluster,
    ns: str,
    as_user: httpx.Client,
    as_admin: httpx.Client,
) -> None:
    """Changes to slices, the ConfigMap and the key Secrets, each seen in time."""

    def replicas() -> set[str]:
        answer = as_admin.get("/admin/replicas")
        if answer.status_code != 200:
            return set()
        return {r["url"] for m in answer.json()["models"] for r in m["replicas"]}

    def models() -> list[str]:
        answer = as_user.get("/v1/models")
        return [m["id"] for m in answer.json()["data"]] if answer.is_success else []

    both = {"http://192.0.2.10:8000", "http://192.0.2.11:8000"}
    eventually(lambda: replicas() == both, "both replicas are discovered")

    # A terminating pod takes no new requests; a deleted slice takes its pods away.
    apply(
        kube,
        endpoint_slice(
            ns, "smol-b", "192.0.2.11", ready=False, serving=True, terminating=True
        ),
    )
    eventually(lambda: replicas() == {"http://192.0.2.10:8000"}, "b is terminating")
    kube.kubectl("delete", "endpointslice", "smol-a", "-n", ns)
    # With no ready replica left, the still-serving terminating one is used.
    eventually(lambda: replicas() == {"http://192.0.2.11:8000"}, "only b is left")

    # A new alias in the ConfigMap works without a restart; a broken document
    # leaves the last good one in force.
    eventually(lambda: models() == ["smol"], "the user sees the model")
    apply(kube, routes(ns, ["chat"]))
    eventually(lambda: models() == ["smol", "chat"], "the alias appears")
    broken = routes(ns, [])
    broken["data"]["routes.json"] = "{not json"
    apply(kube, broken)
    invalid = 'citadel_gateway_config_reloads_total{status="invalid"}'
    eventually(lambda: gateway.metric(invalid) >= 1, "the broken document is seen")
    assert models() == ["smol", "chat"]
    assert gateway.metric("citadel_gateway_config_last_reload_successful") == 0

    # A revoked key stops working within seconds; others keep working.
    keys(kube, ns, "revoke", "alice")
    eventually(lambda: as_user.get("/v1/models").status_code == 401, "revoked")
    assert as_admin.get("/v1/models").status_code == 200
