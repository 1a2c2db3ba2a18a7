"""A routing document too large for a ConfigMap as text, on a real API server.

The operator's publisher writes the ConfigMap as the operator does (server-side
apply, its field manager): gzipped once the document is large, the text key the
first create made removed, and text again with the binary key gone once it is
small. A gateway watching the ConfigMap serves every model of either form.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import httpx
import kopf
import pytest
from harness.kube import KubeCluster

from citadel.gateway.routes import parse_document
from citadel.operator.kube.client import AioKube, Manifest
from citadel.operator.routing import RoutePublisher
from citadel.operator.settings import OperatorSettings

pytestmark = pytest.mark.e2e

MODELS = 4000
"""Past the 1 MiB a ConfigMap holds as text (some 1.3 MiB)."""
WAIT_S = 60.0


def _model(name: str, namespace: str) -> Manifest:
    return {
        "apiVersion": "citadel.ai/v1alpha1",
        "kind": "LLMModel",
        "metadata": {
            "name": name,
            "namespace": namespace,
            "uid": f"uid-{name}",
            "generation": 1,
            "resourceVersion": "1",
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "spec": {"model": "HuggingFaceTB/SmolLM2-135M-Instruct"},
    }


def _stored(kube: KubeCluster, namespace: str) -> dict[str, Any]:
    out = kube.kubectl(
        "get", "configmap", "citadel-routes", "-n", namespace, "-o", "json"
    )
    found: dict[str, Any] = json.loads(out)
    return found


def _served(url: str) -> int:
    answer = httpx.get(url + "/v1/models", timeout=10)
    return len(answer.json()["data"]) if answer.is_success else -1


def _eventually_served(url: str, count: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while _served(url) != count:
        if time.monotonic() > deadline:
            pytest.fail(f"the gateway did not serve {count} models in {WAIT_S} s")
        time.sleep(0.5)


def test_a_document_past_a_configmap_of_text_is_stored_gzipped(
    kube: KubeCluster,
    kube_namespace: str,
    start_gateway: Any,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ns = kube_namespace
    monkeypatch.setenv("KUBECONFIG", str(kube.kubeconfig))
    settings = OperatorSettings(
        watch_namespaces=(ns,),
        gateway_namespace=ns,
        route_publish_delay=0,
        route_publish_interval=0,
    )
    models = [_model(f"model-{i:05d}-instruct-v2", ns) for i in range(MODELS)]
    listed: list[list[Manifest]] = [[]]

    async def source() -> list[Manifest]:
        return listed[0]

    async def publish(wanted: list[Manifest], ensure: bool = False) -> int:
        kube_client = AioKube(
            lambda: kopf.login_with_kubeconfig(settings=kopf.OperatorSettings())
        )
        try:
            publisher = RoutePublisher(kube_client, settings, source, source)
            if ensure:
                await publisher.ensure()
            listed[0] = wanted
            return len((await publisher.publish()).models)
        finally:
            await kube_client.close()

    # As the operator starts: the ConfigMap made empty by a create, whose field
    # manager entry owns the text key too, so that applying the gzipped form
    # alone leaves the text key there.
    assert asyncio.run(publish([], ensure=True)) == 0
    gateway = start_gateway(
        None,
        None,
        routes_source="kubernetes",
        kubeconfig=str(kube.kubeconfig),
        namespace=ns,
        auth="disabled",
    )
    _eventually_served(gateway.url, 0)

    assert asyncio.run(publish(models)) == MODELS
    stored = _stored(kube, ns)
    assert "routes.json" not in (stored.get("data") or {})
    assert list(stored["binaryData"]) == ["routes.json.gz"]
    _eventually_served(gateway.url, MODELS)

    assert asyncio.run(publish(models[:2])) == 2
    stored = _stored(kube, ns)
    assert "routes.json.gz" not in (stored.get("binaryData") or {})
    assert len(parse_document(stored["data"]["routes.json"]).models) == 2
    _eventually_served(gateway.url, 2)
