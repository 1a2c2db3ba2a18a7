"""Every manifest in docs/examples applies, turns Ready, and lands where it targets."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from .conftest import ROOT, Kube

pytestmark = pytest.mark.e2e
EXAMPLES = sorted((ROOT / "docs" / "examples").glob("*.yaml"))


def _target_nodes(kube: Kube, spec: dict[str, Any]) -> set[str]:
    """The nodes the spec allows: its nodeName, its GPU product, or any GPU node."""
    placement = spec.get("placement", {})
    if "nodeName" in placement:
        return {placement["nodeName"]}
    nodes = kube.cluster.kubectl("get", "nodes", "-o", "yaml")
    found = set()
    for node in yaml.safe_load(nodes)["items"]:
        labels = node["metadata"].get("labels", {})
        product = placement.get("gpuProduct")
        if product and labels.get("nvidia.com/gpu.product") != product:
            continue
        if spec.get("resources", {}).get("gpus", 1) and not int(
            node["status"].get("allocatable", {}).get("nvidia.com/gpu", "0")
        ):
            continue
        found.add(node["metadata"]["name"])
    return found


def _adapter_claims(spec: dict[str, Any]) -> list[str]:
    """The claims of the spec's pvc:// adapter sources, each once."""
    claims = [
        a["source"].removeprefix("pvc://").split("/")[0]
        for a in spec.get("adapters", [])
        if a["source"].startswith("pvc://")
    ]
    return list(dict.fromkeys(claims))


def _claim(name: str) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": name},
        "spec": {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": "",
            "resources": {"requests": {"storage": "1Gi"}},
        },
    }


@pytest.mark.parametrize("path", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_example_becomes_ready_on_its_node(
    kube: Kube, cache_volume: Callable[..., str], path: Path
) -> None:
    manifest = yaml.safe_load(path.read_text())
    name, spec = manifest["metadata"]["name"], manifest["spec"]
    if "cache" in spec:
        cache_volume(
            f"{name}-cache", storage_class=spec["cache"].get("storageClassName", "")
        )
    for claim in _adapter_claims(spec):
        # The adapters' claims are the user's: made here as the example asks.
        cache_volume(claim)
        kube.apply(json.dumps(_claim(claim)))
    kube.apply(path.read_text())
    kube.wait_phase(name, "Ready")

    body = kube.get("llmmodel", name)
    replicas = spec.get("replicas", 1)
    assert body["status"]["replicas"]["ready"] == replicas
    assert body["status"]["endpoint"] == f"http://{name}.{kube.namespace}.svc:8000"
    pods = kube.items("pods", f"citadel.ai/model={name}")
    assert len(pods) == replicas
    targets = _target_nodes(kube, spec)
    assert {p["spec"]["nodeName"] for p in pods} <= targets, targets

    deployment = kube.get("deployment", name)
    container = deployment["spec"]["template"]["spec"]["containers"][0]
    gpus = spec.get("resources", {}).get("gpus", 1)
    assert container["resources"]["limits"]["nvidia.com/gpu"] == str(gpus)
    assert f"--tensor-parallel-size={gpus}" in container["args"]
    assert f"--model={spec['model']}" in container["args"]
    assert ("--enable-lora" in container["args"]) == bool(spec.get("adapters"))
    owner = deployment["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["name"], owner["controller"]) == (
        "LLMModel",
        name,
        True,
    )
    assert deployment["metadata"]["labels"]["app.kubernetes.io/managed-by"] == (
        "citadel-operator"
    )

    service = kube.get("service", name)
    assert service["spec"]["ports"][0]["port"] == 8000
    assert service["spec"]["ports"][0]["name"] == "http"
    if "cache" in spec:
        claim = kube.get("pvc", f"{name}-cache")
        assert (
            claim["spec"]["resources"]["requests"]["storage"] == spec["cache"]["size"]
        )
        assert claim["status"]["phase"] == "Bound"
        assert "ownerReferences" not in claim["metadata"]  # Retain by default
    assert (kube.get("pdb", name) is not None) == (replicas > 1)

    route = kube.wait(
        f"a ready route for {name}",
        lambda: [r for r in kube.routes() if r["name"] == name and r["ready"]],
    )[0]
    assert route["servedName"] == spec.get("servedName", name)
    assert route["aliases"] == spec.get("aliases", [])
    adapters = [a["name"] for a in spec.get("adapters", [])]
    assert route.get("adapters", []) == adapters
    assert route["service"] == name and route["port"] == 8000
    assert route["readyReplicas"] == replicas
    if "limits" in spec:
        assert route["limits"]["rpm"] == spec["limits"].get("rpm")

    # Free the GPUs for the next example (namespaces are removed lazily).
    kube.delete_model(name)
