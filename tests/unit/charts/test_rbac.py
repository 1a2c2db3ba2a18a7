"""Least-privilege RBAC, cluster-wide and namespaced."""

from __future__ import annotations

from typing import TYPE_CHECKING

import pytest

from citadel.operator.settings import PeeringMode

if TYPE_CHECKING:
    from conftest import ChartKit, FakeApiServer, Obj

pytestmark = pytest.mark.unit

WRITE = {"create", "update", "patch", "delete"}


def grants(rules: list[Obj]) -> set[tuple[str, str, str]]:
    """(apiGroup, resource, verb) of every rule."""
    return {
        (group, resource, verb)
        for rule in rules
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def bound_to(objs: list[Obj], subject: str) -> set[tuple[str, str, str, str]]:
    """(namespace or '*', apiGroup, resource, verb) granted to a ServiceAccount."""
    roles = {
        (o["kind"], o["metadata"].get("namespace"), o["metadata"]["name"]): o
        for o in objs
        if o["kind"] in {"Role", "ClusterRole"}
    }
    result = set()
    for binding in objs:
        if binding["kind"] not in {"RoleBinding", "ClusterRoleBinding"}:
            continue
        if not any(s["name"] == subject for s in binding["subjects"]):
            continue
        ns = binding["metadata"].get("namespace")
        ref = binding["roleRef"]
        role = roles[(ref["kind"], ns if ref["kind"] == "Role" else None, ref["name"])]
        scope = ns or "*"
        result |= {(scope, *g) for g in grants(role["rules"])}
    return result


def test_operator_cluster_wide(chart: ChartKit) -> None:
    granted = bound_to(chart.render(), "citadel-operator")
    # What it manages, everywhere, with the verbs it sends (it applies: patch;
    # it never updates) and watches where Kopf indexes them, or reacts to their
    # deletion.
    applied = {"get", "create", "patch", "delete"}
    for resource, group, verbs in [
        ("deployments", "apps", applied | {"list", "watch"}),
        ("services", "", applied | {"list", "watch"}),
        ("persistentvolumeclaims", "", applied),
        ("poddisruptionbudgets", "policy", applied),
        ("podmonitors", "monitoring.coreos.com", applied),
    ]:
        found = {v for s, g, r, v in granted if (s, g, r) == ("*", group, resource)}
        assert found == verbs, resource
    updates = {r for _, _, r, v in granted if v == "update"}
    assert updates == {"llmmodels/finalizers"}  # for blockOwnerDeletion
    assert ("*", "citadel.ai", "llmmodels/status", "patch") in granted
    assert ("*", "kopf.dev", "clusterkopfpeerings", "patch") in granted
    # Reads only.
    for group, resource in [
        ("", "pods"),
        ("apps", "replicasets"),
        ("", "nodes"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
    ]:
        assert not {v for s, g, r, v in granted if (g, r) == (group, resource)} & WRITE
    # The routing ConfigMap only in the gateway's namespace; never Secrets.
    configmaps = {(s, v) for s, g, r, v in granted if r == "configmaps"}
    assert configmaps and {s for s, _ in configmaps} == {chart.namespace}
    assert not [g for g in granted if g[2] == "secrets"]
    assert not [g for g in granted if "*" in g[1:]]


def test_operator_namespaced(chart: ChartKit) -> None:
    objs = chart.render({"watchNamespaces": ["llm-a", "llm-b"]})
    granted = bound_to(objs, "citadel-operator")
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-operator"))
    )
    assert env["CITADEL_OPERATOR_WATCH_NAMESPACES"] == "llm-a,llm-b"
    scopes = {s for s, g, r, v in granted if r == "deployments"}
    assert scopes == {"llm-a", "llm-b"}
    # Its Services watched where its models are, nowhere else.
    for verb in ("list", "watch"):
        assert {s for s, g, r, v in granted if (r, v) == ("services", verb)} == scopes
    cluster = {(g, r) for s, g, r, v in granted if s == "*"}
    assert cluster == {
        ("", "nodes"),
        ("", "namespaces"),
        ("apiextensions.k8s.io", "customresourcedefinitions"),
    }
    peerings = chart.find(objs, "KopfPeering")
    assert {p["metadata"]["namespace"] for p in peerings} == {"llm-a", "llm-b"}
    assert not chart.find(objs, "ClusterKopfPeering")


def test_peering_object_is_the_one_the_operator_uses(chart: ChartKit) -> None:
    objs = chart.render()
    peering = chart.one(objs, "ClusterKopfPeering")
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-operator"))
    )
    assert env["CITADEL_OPERATOR_PEERING_NAME"] == peering["metadata"]["name"]


PEERING_API = "kopf.dev/v1/ClusterKopfPeering"


def peering(name: str, release: str, namespace: str | None) -> Obj:
    """A release's ClusterKopfPeering as the cluster holds it: Helm's annotations
    name its release, unless it was applied without Helm (`namespace` None)."""
    labels = {
        "app.kubernetes.io/part-of": "citadel",
        "app.kubernetes.io/component": "operator",
        "app.kubernetes.io/instance": release,
    }
    metadata: Obj = {"name": name, "labels": labels}
    if namespace is not None:
        metadata["annotations"] = {
            "meta.helm.sh/release-name": release,
            "meta.helm.sh/release-namespace": namespace,
        }
    return {
        "apiVersion": "kopf.dev/v1",
        "kind": "ClusterKopfPeering",
        "metadata": metadata,
    }


def test_a_first_install_without_kopfs_api_renders(
    chart: ChartKit, fake_api: FakeApiServer
) -> None:
    # `helm install --dry-run=server` before Kopf's CRDs exist (Helm installs
    # crds/ only for a real install): a lookup of an API group not served fails,
    # and no other release's operator can be there.
    objs = chart.render(api=fake_api)
    chart.one(objs, "ClusterKopfPeering")
    # Offline, with the API served or not, the check has nothing to look up.
    for versions in [(), (PEERING_API,)]:
        chart.one(chart.render(api_versions=versions), "ClusterKopfPeering")


@pytest.mark.parametrize(
    ("found", "error"),
    [
        # This release's own, at an upgrade.
        (
            [peering("citadel-operator-citadel-system", "citadel", "citadel-system")],
            None,
        ),
        (
            [peering("team-citadel-operator-team", "team", "team")],
            "release team/team already runs a cluster-wide Citadel operator "
            "(ClusterKopfPeering team-citadel-operator-team): two would both act "
            "on every model. Install this release with operator.enabled=false and "
            "gateway.routesNamespace=team ",
        ),
        # Applied without Helm (`helm template | kubectl apply`, Argo CD): its
        # labels name the release, nothing names the namespace.
        (
            [peering("prod-citadel-operator-prod", "prod", None)],
            "release prod (namespace unknown) already runs a cluster-wide Citadel "
            "operator (ClusterKopfPeering prod-citadel-operator-prod): two would "
            "both act on every model. Install this release with "
            "operator.enabled=false and gateway.routesNamespace=<the operator's "
            "release namespace> ",
        ),
    ],
    ids=["own", "other", "without-helm"],
)
def test_a_second_cluster_wide_operator_is_refused(
    chart: ChartKit, fake_api: FakeApiServer, found: list[Obj], error: str | None
) -> None:
    fake_api.peerings = found
    chart.render(api=fake_api, api_versions=[PEERING_API], expect_error=error)
    # The way out the message gives renders.
    way_out = {"operator.enabled": False, "gateway.routesNamespace": "team"}
    chart.render(way_out, api=fake_api, api_versions=[PEERING_API])


@pytest.mark.parametrize("namespaces", [[], ["llm-a", "llm-b"]])
@pytest.mark.parametrize("replicas", [1, 3])
def test_several_operator_replicas_need_their_peering_object(
    chart: ChartKit, replicas: int, namespaces: list[str]
) -> None:
    objs = chart.render({"operator.replicas": replicas, "watchNamespaces": namespaces})
    operator = chart.one(objs, "Deployment", "citadel-operator")
    assert operator["spec"]["replicas"] == replicas
    env = chart.env_of(chart.container(operator))
    # In `auto`, replicas that find no peering object each work alone: with
    # several, they must wait for it instead. One replica keeps `auto`.
    mode = env.get("CITADEL_OPERATOR_PEERING", "auto")
    assert PeeringMode(mode) is (
        PeeringMode.MANDATORY if replicas > 1 else PeeringMode.AUTO
    )
    # The object that mode waits for, and the rights to announce in it.
    name = env["CITADEL_OPERATOR_PEERING_NAME"]
    if namespaces:
        peerings = chart.find(objs, "KopfPeering", name)
        assert {p["metadata"]["namespace"] for p in peerings} == set(namespaces)
        scopes, plural = set(namespaces), "kopfpeerings"
    else:
        chart.one(objs, "ClusterKopfPeering", name)
        scopes, plural = {"*"}, "clusterkopfpeerings"
    granted = bound_to(objs, "citadel-operator")
    for scope in scopes:
        for verb in ("get", "list", "watch", "patch"):
            assert (scope, "kopf.dev", plural, verb) in granted


@pytest.mark.parametrize(
    ("variable", "value"),
    [("CITADEL_OPERATOR_PEERING_PRIORITY", "7"), ("CITADEL_OPERATOR_PEERING", "auto")],
)
def test_several_operator_replicas_refuse_peering_settings_of_their_own(
    chart: ChartKit, variable: str, value: str
) -> None:
    # One priority for every replica: Kopf pauses them all. Another mode: not
    # mandatory, so without the peering object they would all work.
    extra = [{"name": variable, "value": value}]
    chart.render(
        {"operator.replicas": 2, "operator.extraEnv": extra},
        expect_error=f"operator.extraEnv may not set {variable} with "
        "operator.replicas > 1",
    )
    objs = chart.render({"operator.replicas": 1, "operator.extraEnv": extra})
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-operator"))
    )
    assert env[variable] == value


def test_gateway_reads_only(chart: ChartKit) -> None:
    granted = bound_to(chart.render(), "citadel-gateway")
    assert {v for _, _, _, v in granted} == {"get", "list", "watch"}
    assert {(s, r) for s, _, r, _ in granted} == {
        (chart.namespace, "configmaps"),
        (chart.namespace, "secrets"),
        ("*", "endpointslices"),
    }
    granted = bound_to(chart.render({"watchNamespaces": ["llm"]}), "citadel-gateway")
    assert ("llm", "discovery.k8s.io", "endpointslices", "watch") in granted
    assert not [g for g in granted if g[0] == "*"]


def test_gateway_keys_in_a_namespace_of_their_own(chart: ChartKit) -> None:
    objs = chart.render({"gateway.keysNamespace": "llm-keys"})
    granted = bound_to(objs, "citadel-gateway")
    # Secrets only where the keys are; in the release namespace, the routing
    # ConfigMap by name, so its other Secrets and ConfigMaps are out of reach.
    assert {(s, r) for s, _, r, _ in granted} == {
        (chart.namespace, "configmaps"),
        ("llm-keys", "secrets"),
        ("*", "endpointslices"),
    }
    (release_role,) = [
        o
        for o in chart.find(objs, "Role")
        if o["metadata"]["namespace"] == chart.namespace
        and o["metadata"]["name"] == "citadel-gateway"
    ]
    assert release_role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["citadel-routes"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    container = chart.one(objs, "Deployment", "citadel-gateway")["spec"]["template"][
        "spec"
    ]["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["CITADEL_GATEWAY_NAMESPACE"] == "llm-keys"
    assert env["CITADEL_GATEWAY_ROUTES_NAMESPACE"] == chart.namespace
    # The admin key's record goes where the gateway reads keys; its plain copy,
    # for people, stays in the release namespace.
    record = chart.one(objs, "Secret", f"citadel-key-admin.{chart.namespace}")
    assert record["metadata"]["namespace"] == "llm-keys"
    plain = chart.one(objs, "Secret", "citadel-admin-key")
    assert plain["metadata"]["namespace"] == chart.namespace
    # By default nothing moves.
    env = {
        e["name"]: e.get("value")
        for e in chart.one(chart.render(), "Deployment", "citadel-gateway")["spec"][
            "template"
        ]["spec"]["containers"][0]["env"]
    }
    assert env["CITADEL_GATEWAY_NAMESPACE"] == chart.namespace
    assert "CITADEL_GATEWAY_ROUTES_NAMESPACE" not in env


def test_rbac_can_be_left_to_the_platform_team(chart: ChartKit) -> None:
    objs = chart.render(
        {
            "operator.rbac.create": False,
            "gateway.rbac.create": False,
            "operator.serviceAccount.create": False,
            "operator.serviceAccount.name": "ops",
        }
    )
    kinds = {o["kind"] for o in objs}
    assert not kinds & {"Role", "ClusterRole", "RoleBinding", "ClusterRoleBinding"}
    operator = chart.one(objs, "Deployment", "citadel-operator")
    assert operator["spec"]["template"]["spec"]["serviceAccountName"] == "ops"
    assert [s["metadata"]["name"] for s in chart.find(objs, "ServiceAccount")] == [
        "citadel-gateway"
    ]


@pytest.mark.parametrize("values", [{}, {"watchNamespaces": ["llm-a"]}])
def test_operator_autoscaler_reads_gateways_and_scales_models(
    chart: ChartKit, values: dict[str, object]
) -> None:
    objs = chart.render(values)
    granted = bound_to(objs, "citadel-operator")
    scopes = {s for s, g, r, v in granted if r == "deployments"}
    # Through the scale subresource, as an HPA sizes its target: never a PUT.
    scale = {
        (s, v) for s, g, r, v in granted if (g, r) == ("citadel.ai", "llmmodels/scale")
    }
    assert scale == {(s, v) for s in scopes for v in ("get", "patch")}
    # HPAs that size a model too, listed where the models are: nothing more.
    hpas = {
        (s, v)
        for s, g, r, v in granted
        if (g, r) == ("autoscaling", "horizontalpodautoscalers")
    }
    assert hpas == {(s, "list") for s in scopes}
    # The gateway pods' addresses, read only, in the release namespace only
    # (and its Service's ports: everywhere when cluster-wide, for the models').
    slices = {(s, v) for s, g, r, v in granted if r == "endpointslices"}
    assert slices == {(chart.namespace, "list")}
    assert (chart.namespace, "", "services", "get") in granted
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-operator"))
    )
    service = env["CITADEL_OPERATOR_GATEWAY_METRICS_SERVICE"]
    assert service == f"{chart.namespace}/citadel-gateway-metrics"
    assert chart.one(objs, "Service", "citadel-gateway-metrics")


def test_operator_autoscaler_follows_where_the_gateway_serves_metrics(
    chart: ChartKit,
) -> None:
    objs = chart.render({"gateway.metricsPort": 0})
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-operator"))
    )
    # /metrics on the API port then: the gateway's own Service.
    assert env["CITADEL_OPERATOR_GATEWAY_METRICS_SERVICE"] == (
        f"{chart.namespace}/citadel-gateway"
    )
    objs = chart.render({"gateway.enabled": False})
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-operator"))
    )
    assert "CITADEL_OPERATOR_GATEWAY_METRICS_SERVICE" not in env
    granted = bound_to(objs, "citadel-operator")
    assert not {g for g in granted if g[2] == "endpointslices"}
