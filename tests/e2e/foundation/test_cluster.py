"""The local cluster does what the rest of Citadel relies on: GPU scheduling onto
the right fake node, honest Unschedulable reasons, CRD validation, RBAC and
ServiceAccount tokens, and Helm."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.kube import KubeCluster, KubectlError
from harness.wait import wait_for

pytestmark = pytest.mark.e2e

HERE = Path(__file__).parent


def gpu_deployment(name: str, gpus: int, product: str | None) -> dict[str, Any]:
    pod_spec: dict[str, Any] = {
        "tolerations": [
            {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
        ],
        "containers": [
            {
                "name": "server",
                "image": "registry.invalid/vllm:test",
                "resources": {"limits": {"nvidia.com/gpu": str(gpus)}},
            }
        ],
    }
    if product:
        pod_spec["nodeSelector"] = {"nvidia.com/gpu.product": product}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {"app": name}},
            "template": {"metadata": {"labels": {"app": name}}, "spec": pod_spec},
        },
    }


def pods(cluster: KubeCluster, namespace: str, selector: str) -> list[dict[str, Any]]:
    out = cluster.kubectl("get", "pods", "-n", namespace, "-l", selector, "-o", "json")
    items: list[dict[str, Any]] = json.loads(out)["items"]
    return items


def condition(pod: dict[str, Any], kind: str) -> dict[str, Any] | None:
    for cond in pod.get("status", {}).get("conditions", []):
        if cond["type"] == kind:
            return dict(cond)
    return None


def test_gpu_pod_lands_on_the_matching_node_and_runs(
    cluster: KubeCluster, namespace: str
) -> None:
    if not cluster.local:
        pytest.skip("needs the local harness's fake GPU nodes")
    doc = gpu_deployment("two-gpus", 2, "NVIDIA-H100-80GB-HBM3")
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(doc))

    def ready_pod() -> dict[str, Any] | None:
        for pod in pods(cluster, namespace, "app=two-gpus"):
            ready = condition(pod, "Ready")
            if ready and ready["status"] == "True":
                return pod
        return None

    pod = wait_for("the 2-GPU pod to be Ready", ready_pod)
    assert pod["spec"]["nodeName"] == "hx-llm-server-01"
    assert pod["status"]["phase"] == "Running"
    assert pod["status"]["podIP"]
    cluster.kubectl(
        "rollout", "status", "deployment/two-gpus", "-n", namespace, "--timeout=60s"
    )


def test_too_many_gpus_stays_pending_with_the_schedulers_reason(
    cluster: KubeCluster, namespace: str
) -> None:
    doc = gpu_deployment("sixteen-gpus", 16, None)
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input_text=json.dumps(doc))

    def unschedulable() -> dict[str, Any] | None:
        for pod in pods(cluster, namespace, "app=sixteen-gpus"):
            cond = condition(pod, "PodScheduled")
            if cond and cond["status"] == "False":
                return cond
        return None

    cond = wait_for("PodScheduled=False", unschedulable)
    assert cond["reason"] == "Unschedulable"
    assert "nvidia.com/gpu" in cond["message"]
    pod = pods(cluster, namespace, "app=sixteen-gpus")[0]
    assert pod["status"]["phase"] == "Pending"


WIDGET_CRD = {
    "apiVersion": "apiextensions.k8s.io/v1",
    "kind": "CustomResourceDefinition",
    "metadata": {"name": "widgets.e2e.citadel.ai"},
    "spec": {
        "group": "e2e.citadel.ai",
        "names": {"plural": "widgets", "singular": "widget", "kind": "Widget"},
        "scope": "Namespaced",
        "versions": [
            {
                "name": "v1",
                "served": True,
                "storage": True,
                "schema": {
                    "openAPIV3Schema": {
                        "type": "object",
                        "properties": {
                            "spec": {
                                "type": "object",
                                "required": ["size"],
                                "properties": {
                                    "size": {
                                        "type": "integer",
                                        "minimum": 1,
                                        "maximum": 8,
                                    },
                                    "mode": {"type": "string", "enum": ["a", "b"]},
                                },
                                "x-kubernetes-validations": [
                                    {
                                        "rule": "self.mode != 'b' || self.size > 2",
                                        "message": "mode b needs size > 2",
                                    }
                                ],
                            }
                        },
                    }
                },
            }
        ],
    },
}


def test_crd_applies_and_its_schema_refuses_bad_objects(
    cluster: KubeCluster, namespace: str
) -> None:
    cluster.kubectl("apply", "-f", "-", input_text=json.dumps(WIDGET_CRD))
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "crd/widgets.e2e.citadel.ai",
        "--timeout=30s",
    )

    def widget(spec: dict[str, Any]) -> str:
        doc = {
            "apiVersion": "e2e.citadel.ai/v1",
            "kind": "Widget",
            "metadata": {"name": f"w{abs(hash(json.dumps(spec))) % 10**6}"},
            "spec": spec,
        }
        return json.dumps(doc)

    # Eventually consistent discovery: the first apply can race the new API.
    wait_for(
        "a valid widget to apply",
        lambda: (
            "created"
            in cluster.kubectl(
                "apply",
                "-n",
                namespace,
                "-f",
                "-",
                input_text=widget({"size": 3}),
                check=False,
            )
        ),
    )
    for spec, expected in (
        ({"size": 0}, "spec.size"),
        ({"mode": "a"}, "spec.size"),
        ({"size": 2, "mode": "c"}, "spec.mode"),
        ({"size": 2, "mode": "b"}, "mode b needs size > 2"),
    ):
        with pytest.raises(KubectlError, match=expected):
            cluster.kubectl(
                "apply", "-n", namespace, "-f", "-", input_text=widget(spec)
            )


def test_rbac_is_enforced_and_service_account_tokens_work(
    cluster: KubeCluster, namespace: str, tmp_path: Path
) -> None:
    cluster.kubectl("create", "serviceaccount", "reader", "-n", namespace)
    token = cluster.kubectl(
        "create", "token", "reader", "-n", namespace, "--duration=10m"
    ).strip()
    reader = cluster.with_token(token, tmp_path / "reader.kubeconfig")
    who = json.loads(reader.kubectl("auth", "whoami", "-o", "json"))
    assert who["status"]["userInfo"]["username"] == (
        f"system:serviceaccount:{namespace}:reader"
    )
    denied = reader.kubectl("get", "configmaps", "-n", namespace, check=False)
    assert "forbidden" in denied.lower()
    cluster.kubectl(
        "create",
        "rolebinding",
        "reader-view",
        "--clusterrole=view",
        f"--serviceaccount={namespace}:reader",
        "-n",
        namespace,
    )
    wait_for(
        "the RoleBinding to take effect",
        lambda: (
            "forbidden"
            not in reader.kubectl(
                "get", "configmaps", "-n", namespace, check=False
            ).lower()
        ),
    )
    # `view` still does not reach Secrets.
    denied = reader.kubectl("get", "secrets", "-n", namespace, check=False)
    assert "forbidden" in denied.lower()


def test_helm_installs_a_chart_and_lists_it(
    cluster: KubeCluster, namespace: str
) -> None:
    chart = HERE / "hello-chart"
    version = yaml.safe_load(cluster.kubectl("version", "-o", "yaml"))
    assert version["serverVersion"]["gitVersion"].startswith("v1.")
    cluster.helm(
        "install", "hello", str(chart), "-n", namespace, "--wait", "--timeout=90s"
    )
    releases = json.loads(cluster.helm("list", "-n", namespace, "-o", "json"))
    assert [(r["name"], r["status"]) for r in releases] == [("hello", "deployed")]
    cm = json.loads(
        cluster.kubectl(
            "get", "configmap", "hello-greeting", "-n", namespace, "-o", "json"
        )
    )
    assert cm["data"]["greeting"] == "hello from helm"
    cluster.helm("uninstall", "hello", "-n", namespace, "--wait")
    assert json.loads(cluster.helm("list", "-n", namespace, "-o", "json")) == []
