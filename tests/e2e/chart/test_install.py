"""`helm install`, `upgrade` and `uninstall` of the chart on a real API server with
the Prometheus Operator's CRDs: every object is accepted (ServiceMonitors and the
PrometheusRule against their real schemas), the Deployments get scheduled and Ready
(kwok plays the kubelets), RBAC grants what the docs say and no more, and upgrades
and uninstalls behave as docs/install.md says."""

from __future__ import annotations

import base64
import json
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.kube import KubeCluster, KubectlError

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[3]
CHART = str(ROOT / "charts" / "citadel")
RELEASE = "citadel-e2e"
# helm's own wait stays under the harness's 120 s limit per command.
WAIT = ("--wait", "--timeout", "100s")


def get(cluster: KubeCluster, *args: str) -> Any:
    return json.loads(cluster.kubectl("get", *args, "-o", "json"))


def can_i(cluster: KubeCluster, sa: str, ns: str, *args: str) -> bool:
    out = cluster.kubectl(
        "auth", "can-i", *args, f"--as=system:serviceaccount:{ns}:{sa}", check=False
    )
    return out.strip() == "yes"


def admin_key(cluster: KubeCluster, ns: str) -> tuple[str, str]:
    """The plain admin key and the hash in its record."""
    plain = get(cluster, "secret", f"{RELEASE}-admin-key", "-n", ns)
    record = get(cluster, "secret", "citadel-key-admin", "-n", ns)
    key = base64.b64decode(plain["data"]["key"]).decode()
    stored = json.loads(base64.b64decode(record["data"]["key.json"]))
    return key, stored["hash"]


@pytest.fixture
def namespaces(cluster: KubeCluster) -> Iterator[Callable[[str], str]]:
    """Makes fresh namespaces (deleted afterwards)."""
    made: list[str] = []

    def make(stem: str) -> str:
        name = f"e2e-chart-{stem}-{uuid.uuid4().hex[:5]}"
        cluster.kubectl("create", "namespace", name)
        cluster.kubectl("label", "namespace", name, "citadel.ai/e2e=true")
        made.append(name)
        return name

    yield make
    for name in made:
        cluster.helm("uninstall", RELEASE, "-n", name, check=False)
        cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def manifest_objects(cluster: KubeCluster, ns: str) -> list[dict[str, Any]]:
    text = cluster.helm("get", "manifest", RELEASE, "-n", ns)
    return [d for d in yaml.safe_load_all(text) if d]


def assert_all_exist(cluster: KubeCluster, ns: str) -> list[dict[str, Any]]:
    objs = manifest_objects(cluster, ns)
    for o in objs:
        args = [o["kind"], o["metadata"]["name"]]
        namespace = o["metadata"].get("namespace")
        if namespace:
            args += ["-n", namespace]
        cluster.kubectl("get", *args)
    return objs


def test_install_upgrade_uninstall_cluster_wide(
    cluster: KubeCluster,
    prometheus_operator_crds: list[str],
    namespaces: Callable[[str], str],
) -> None:
    ns = namespaces("wide")
    models = namespaces("models")
    cluster.helm(
        "install", RELEASE, CHART, "-n", ns, *WAIT,
        "--set", "gateway.ingress.enabled=true",
        "--set", "networkPolicy.enabled=true",
        "--set", f"networkPolicy.namespaces={{{models}}}",
        "--set", "monitoring.labels.release=kps",
    )  # fmt: skip
    objs = assert_all_exist(cluster, ns)
    kinds = {o["kind"] for o in objs}
    assert {"ServiceMonitor", "PrometheusRule", "Ingress", "NetworkPolicy"} <= kinds
    assert get(cluster, "crd", "llmmodels.citadel.ai")["spec"]["group"] == "citadel.ai"
    assert get(cluster, "networkpolicy", f"citadel-e2e-models-{ns}", "-n", models)

    # Every Deployment is Available with its pods scheduled on a fake node.
    for name in ("operator", "gateway", "redis"):
        deployment = get(cluster, "deployment", f"{RELEASE}-{name}", "-n", ns)
        want = deployment["spec"]["replicas"]
        assert deployment["status"].get("readyReplicas") == want, name
    pods = get(cluster, "pods", "-n", ns, "-l", f"app.kubernetes.io/instance={RELEASE}")
    assert all(p["spec"].get("nodeName") for p in pods["items"])
    assert len(pods["items"]) == 4  # operator, 2 gateways, redis

    # RBAC: what the operator and the gateway may do, and what they may not.
    op, gw = f"{RELEASE}-operator", f"{RELEASE}-gateway"
    assert can_i(cluster, op, ns, "create", "deployments", "-n", models)
    assert can_i(cluster, op, ns, "patch", "llmmodels.citadel.ai/status", "-n", models)
    assert can_i(cluster, op, ns, "create", "podmonitors.monitoring.coreos.com", "-A")
    assert can_i(cluster, op, ns, "watch", "services", "-A")
    assert can_i(cluster, op, ns, "patch", "configmaps", "-n", ns)
    assert not can_i(cluster, op, ns, "patch", "configmaps", "-n", models)
    assert not can_i(cluster, op, ns, "update", "deployments", "-n", models)
    assert not can_i(cluster, op, ns, "get", "secrets", "-n", ns)
    assert not can_i(cluster, op, ns, "delete", "nodes")
    assert can_i(cluster, gw, ns, "watch", "endpointslices.discovery.k8s.io", "-A")
    assert can_i(cluster, gw, ns, "list", "secrets", "-n", ns)
    assert not can_i(cluster, gw, ns, "list", "secrets", "-n", models)
    assert not can_i(cluster, gw, ns, "update", "configmaps", "-n", ns)

    # A second cluster-wide operator is refused before anything is made (Helm's
    # server-side dry run renders with the cluster's lookups, as an install does);
    # the way the message offers, a gateway of its own, is not.
    other = namespaces("other")
    with pytest.raises(KubectlError, match="already runs a cluster-wide Citadel"):
        cluster.helm("install", "citadel-other", CHART, "-n", other, "--dry-run=server")
    cluster.helm(
        "install", "citadel-other", CHART, "-n", other, "--dry-run=server",
        "--set", "operator.enabled=false", "--set", f"gateway.routesNamespace={ns}",
    )  # fmt: skip

    key, stored = admin_key(cluster, ns)
    hooks = cluster.helm("get", "hooks", RELEASE, "-n", ns)
    assert "helm.sh/hook: test" in hooks and "/v1/models" in hooks

    # Upgrade: CRDs first (docs/install.md), then changed values.
    crds = cluster.helm("show", "crds", CHART)
    cluster.kubectl(
        "apply", "--server-side", "--force-conflicts", "-f", "-", input_text=crds
    )
    cluster.helm(
        "upgrade", RELEASE, CHART, "-n", ns, *WAIT, "--reset-then-reuse-values",
        "--set", "gateway.replicas=3",
        "--set-json", "monitoring.rules.errorRatio=0.2",
    )  # fmt: skip
    gateway = get(cluster, "deployment", gw, "-n", ns)
    assert gateway["spec"]["replicas"] == 3
    assert gateway["status"].get("readyReplicas") == 3
    rule = get(cluster, "prometheusrule", RELEASE, "-n", ns)
    exprs = [r["expr"] for g in rule["spec"]["groups"] for r in g["rules"]]
    assert any(e.rstrip().endswith("> 0.2") for e in exprs)
    assert admin_key(cluster, ns) == (key, stored), "the admin key changed on upgrade"

    cluster.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "100s")
    left = cluster.kubectl(
        "get", "all,secrets,configmaps,roles,rolebindings,servicemonitors,"
        "prometheusrules,ingresses,networkpolicies",
        "-n", ns, "-l", f"app.kubernetes.io/instance={RELEASE}", "-o", "name",
    )  # fmt: skip
    assert left.strip() == ""
    cluster_wide = cluster.kubectl(
        "get", "clusterroles,clusterrolebindings,clusterkopfpeerings", "-o", "name",
        "-l", f"app.kubernetes.io/instance={RELEASE}",
    )  # fmt: skip
    assert ns not in cluster_wide
    # Helm leaves CRDs alone (docs/install.md).
    assert get(cluster, "crd", "llmmodels.citadel.ai")


def test_namespaced_install_keeps_the_admin_key_when_asked(
    cluster: KubeCluster,
    prometheus_operator_crds: list[str],
    namespaces: Callable[[str], str],
) -> None:
    ns = namespaces("narrow")
    models = namespaces("models")
    other = namespaces("other")
    cluster.helm(
        "install", RELEASE, CHART, "-n", ns, *WAIT,
        "--set", f"watchNamespaces={{{models}}}",
        "--set", "gateway.replicas=1",
        "--set", "redis.enabled=false",
        "--set", "gateway.adminKey.keepOnUninstall=true",
    )  # fmt: skip
    objs = assert_all_exist(cluster, ns)
    assert not [
        o
        for o in objs
        if o["kind"] == "Deployment" and "redis" in o["metadata"]["name"]
    ]
    assert get(cluster, "kopfpeering", f"{RELEASE}-operator-{ns}", "-n", models)

    op, gw = f"{RELEASE}-operator", f"{RELEASE}-gateway"
    assert can_i(cluster, op, ns, "list", "llmmodels.citadel.ai", "-n", models)
    assert can_i(cluster, op, ns, "watch", "services", "-n", models)
    assert not can_i(cluster, op, ns, "watch", "services", "-n", other)
    assert not can_i(cluster, op, ns, "list", "llmmodels.citadel.ai", "-n", other)
    assert not can_i(cluster, op, ns, "list", "llmmodels.citadel.ai", "-A")
    assert can_i(cluster, op, ns, "list", "nodes")
    assert can_i(
        cluster, gw, ns, "watch", "endpointslices.discovery.k8s.io", "-n", models
    )
    assert not can_i(cluster, gw, ns, "watch", "endpointslices.discovery.k8s.io", "-A")

    # A gateway of its own (its own keys) beside this release's operator: Ready
    # (--wait) only once it reads the routing ConfigMap in the other namespace.
    # Its keys in a namespace of their own: the gateway reads Secrets only there.
    team, team_keys = namespaces("team"), namespaces("team-keys")
    cluster.helm(
        "install", RELEASE, CHART, "-n", team, *WAIT,
        "--set", "operator.enabled=false",
        "--set", f"gateway.routesNamespace={ns}",
        "--set", f"gateway.keysNamespace={team_keys}",
        "--set", f"watchNamespaces={{{models}}}",
        "--set", "gateway.replicas=1",
        "--set", "redis.enabled=false",
    )  # fmt: skip
    assert can_i(cluster, gw, team, "watch", "configmaps/citadel-routes", "-n", ns)
    assert not can_i(cluster, gw, team, "get", "configmaps/other", "-n", ns)
    assert not can_i(cluster, gw, team, "list", "secrets", "-n", ns)
    assert can_i(cluster, gw, team, "watch", "secrets", "-n", team_keys)
    assert not can_i(cluster, gw, team, "get", "secrets", "-n", team)
    assert get(cluster, "secret", f"citadel-key-admin.{team}", "-n", team_keys)
    cluster.helm("uninstall", RELEASE, "-n", team, "--wait", "--timeout", "100s")

    key = admin_key(cluster, ns)
    cluster.helm("uninstall", RELEASE, "-n", ns, "--wait", "--timeout", "100s")
    assert admin_key(cluster, ns) == key
    # `helm uninstall --wait` returns once the objects are gone.
    assert not cluster.kubectl("get", "deployments", "-n", ns, "-o", "name").strip()
