"""The gateway's optional parts: Ingress, autoscaling, disruption budget, Redis,
the bootstrap admin key and the model NetworkPolicy."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from citadel.gateway.services.auth import Role, hash_key
from citadel.gateway.sources.kubernetes import KEY_LABEL, key_from_secret

if TYPE_CHECKING:
    from conftest import ChartKit, Obj

pytestmark = pytest.mark.unit


def test_ingress_with_class_hosts_and_tls(chart: ChartKit) -> None:
    objs = chart.render(
        {
            "gateway.ingress.enabled": True,
            "gateway.ingress.className": "nginx",
            "gateway.ingress.hosts": [
                {"host": "llm.corp", "paths": [{"path": "/v1", "pathType": "Prefix"}]}
            ],
            "gateway.ingress.tls": [{"secretName": "llm-tls", "hosts": ["llm.corp"]}],
        }
    )
    ingress = chart.one(objs, "Ingress")
    assert ingress["spec"]["ingressClassName"] == "nginx"
    assert ingress["spec"]["tls"] == [{"secretName": "llm-tls", "hosts": ["llm.corp"]}]
    rule = ingress["spec"]["rules"][0]
    assert rule["host"] == "llm.corp"
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend == {"name": "citadel-gateway", "port": {"name": "http"}}
    assert not chart.find(chart.render(), "Ingress")


def test_grpc_port_is_off_by_default_and_exposed_when_set(chart: ChartKit) -> None:
    def ports(objs: list[dict[str, object]]) -> tuple[object, object, object]:
        deployment = chart.one(objs, "Deployment", "citadel-gateway")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        service = chart.one(objs, "Service", "citadel-gateway")
        return (
            env["CITADEL_GATEWAY_GRPC_PORT"],
            [p["name"] for p in container["ports"]],
            [(p["name"], p["port"]) for p in service["spec"]["ports"]],
        )

    assert ports(chart.render()) == ("0", ["http", "metrics"], [("http", 80)])
    assert ports(chart.render({"gateway.grpcPort": 50051})) == (
        "50051",
        ["http", "grpc", "metrics"],
        [("http", 80), ("grpc", 50051)],
    )


def test_metrics_are_served_apart_from_what_the_ingress_exposes(
    chart: ChartKit,
) -> None:
    def seen(values: dict[str, object]) -> tuple[object, ...]:
        objs = chart.render(
            {"gateway.ingress.enabled": True, **values}, monitoring=True
        )
        deployment = chart.one(objs, "Deployment", "citadel-gateway")
        container = deployment["spec"]["template"]["spec"]["containers"][0]
        env = {e["name"]: e.get("value") for e in container["env"]}
        ingress = chart.one(objs, "Ingress", "citadel-gateway")
        backends = {
            p["backend"]["service"]["port"]["name"]
            for rule in ingress["spec"]["rules"]
            for p in rule["http"]["paths"]
        }
        monitor = chart.one(objs, "ServiceMonitor", "citadel-gateway")
        (scraped,) = [
            s
            for s in chart.find(objs, "Service")
            if monitor["spec"]["selector"]["matchLabels"].items()
            <= s["metadata"]["labels"].items()
        ]
        return (
            env["CITADEL_GATEWAY_METRICS_PORT"],
            backends,
            scraped["metadata"]["name"],
            scraped["spec"]["type"],
            [(p["name"], p["port"]) for p in scraped["spec"]["ports"]],
            monitor["spec"]["endpoints"][0]["port"],
            scraped["metadata"]["labels"].get(monitor["spec"].get("jobLabel")),
        )

    # By default on a port of its own, behind a ClusterIP Service the Ingress does
    # not route to, whatever type the API's Service is; the job keeps the
    # gateway's name (the alert rules select it).
    assert seen({"gateway.service.type": "LoadBalancer"}) == (
        "9090",
        {"http"},
        "citadel-gateway-metrics",
        "ClusterIP",
        [("metrics", 9090)],
        "metrics",
        "citadel-gateway",
    )
    # 0: on the API port, as before.
    assert seen({"gateway.metricsPort": 0}) == (
        "0",
        {"http"},
        "citadel-gateway",
        "ClusterIP",
        [("http", 80)],
        "http",
        None,
    )


def test_autoscaling_replaces_fixed_replicas(chart: ChartKit) -> None:
    objs = chart.render({"gateway.autoscaling.enabled": True})
    hpa = chart.one(objs, "HorizontalPodAutoscaler")
    assert hpa["spec"]["scaleTargetRef"]["name"] == "citadel-gateway"
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (2, 10)
    assert "replicas" not in chart.one(objs, "Deployment", "citadel-gateway")["spec"]


def test_disruption_budget(chart: ChartKit) -> None:
    pdb = chart.one(chart.render(), "PodDisruptionBudget")
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "gateway"
    )
    off = chart.render({"gateway.podDisruptionBudget.enabled": False})
    assert not chart.find(off, "PodDisruptionBudget")


def redis_url(chart: ChartKit, values: dict[str, object]) -> object:
    objs = chart.render(values)
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-gateway"))
    )
    return env["CITADEL_GATEWAY_REDIS_URL"]


def test_redis_bundled_external_or_none(chart: ChartKit) -> None:
    objs = chart.render()
    assert (
        chart.one(objs, "Service", "citadel-redis")["spec"]["ports"][0]["port"] == 6379
    )
    redis = chart.one(objs, "Deployment", "citadel-redis")
    assert chart.container(redis)["image"] == "docker.io/library/redis:7.4.6-alpine"
    assert chart.one(objs, "NetworkPolicy", "citadel-redis")

    external = {"redis.externalUrl": "rediss://redis.corp:6380/2"}
    assert redis_url(chart, external) == "rediss://redis.corp:6380/2"
    assert not chart.find(chart.render(external), "Deployment", "citadel-redis")

    secret = {"redis.externalUrlSecret": {"name": "redis-url", "key": "url"}}
    assert redis_url(chart, secret) == {
        "secretKeyRef": {"name": "redis-url", "key": "url"}
    }
    assert redis_url(chart, {"redis.enabled": False, "gateway.replicas": 1}) == ""


def test_admin_key_record_is_what_the_gateway_reads(chart: ChartKit) -> None:
    objs = chart.render()
    plain = chart.one(objs, "Secret", "citadel-admin-key")
    key = base64.b64decode(plain["data"]["key"]).decode()
    assert key.startswith("ctd-") and len(key) == 4 + 43
    record_secret = chart.one(objs, "Secret", "citadel-key-admin")
    assert record_secret["metadata"]["labels"][KEY_LABEL] == "true"
    assert KEY_LABEL not in plain["metadata"]["labels"]
    record = key_from_secret(record_secret)
    assert record is not None
    assert record.role is Role.ADMIN
    assert record.hash == hash_key(key)
    assert record.hash == "sha256:" + hashlib.sha256(key.encode()).hexdigest()
    # A second render (no cluster to look up) makes a new key: the same key across
    # upgrades comes from the lookup, tested on a cluster (tests/e2e/chart).
    again = chart.one(chart.render(), "Secret", "citadel-admin-key")
    assert again["data"]["key"] != plain["data"]["key"]


def test_admin_key_kept_on_uninstall_when_asked(chart: ChartKit) -> None:
    objs = chart.render({"gateway.adminKey.keepOnUninstall": True})
    for name in ("citadel-admin-key", "citadel-key-admin"):
        annotations = chart.one(objs, "Secret", name)["metadata"]["annotations"]
        assert annotations["helm.sh/resource-policy"] == "keep"
    objs = chart.render({"gateway.adminKey.create": False})
    assert not chart.find(objs, "Secret")


def test_helm_test_pod_calls_models_with_the_admin_key(chart: ChartKit) -> None:
    pod = chart.one(chart.render(), "Pod")
    assert pod["metadata"]["annotations"]["helm.sh/hook"] == "test"
    c = pod["spec"]["containers"][0]
    env = chart.env_of(c)
    assert env["CITADEL_URL"] == "http://citadel-gateway.citadel-system.svc:80"
    assert env["CITADEL_API_KEY"] == {
        "secretKeyRef": {"name": "citadel-admin-key", "key": "key"}
    }
    assert "/v1/models" in c["command"][-1]
    pod = chart.one(chart.render({"gateway.auth": "disabled"}), "Pod")
    assert "CITADEL_API_KEY" not in chart.env_of(pod["spec"]["containers"][0])
    # No key to test with: the gateway's 401 is the answer to expect.
    pod = chart.one(chart.render({"gateway.adminKey.create": False}), "Pod")
    env = chart.env_of(pod["spec"]["containers"][0])
    assert "CITADEL_API_KEY" not in env and env["CITADEL_EXPECT"] == "401"
    pulled = chart.render({"imagePullSecrets": [{"name": "regcred"}]})
    assert chart.one(pulled, "Pod")["spec"]["imagePullSecrets"] == [{"name": "regcred"}]


# The admin key a GitOps user makes and keeps in a Secret of their own.
OWN_KEY = "ctd-" + "k" * 43
OWN_KEY_VALUES = {
    "gateway.adminKey.existingSecret": "my-admin",
    "gateway.adminKey.existingSecretKey": "api.key",
    "gateway.adminKey.sha256": hashlib.sha256(OWN_KEY.encode()).hexdigest(),
}


def test_admin_key_from_an_existing_secret_renders_the_same_every_time(
    chart: ChartKit,
) -> None:
    objs = chart.render(OWN_KEY_VALUES)
    # No generated key: the record is the only Secret, made from the given hash.
    (record_secret,) = chart.find(objs, "Secret")
    assert record_secret["metadata"]["name"] == "citadel-key-admin"
    record = key_from_secret(record_secret)
    assert record is not None
    assert record.role is Role.ADMIN
    assert record.hash == hash_key(OWN_KEY)
    # helm test calls the gateway with the user's key, so a wrong hash fails it.
    pod = chart.one(objs, "Pod")
    assert chart.env_of(pod["spec"]["containers"][0])["CITADEL_API_KEY"] == {
        "secretKeyRef": {"name": "my-admin", "key": "api.key"}
    }
    # Nothing random left: `helm template` and Argo CD see no change to sync.
    assert chart.render(OWN_KEY_VALUES) == objs
    # The Secret's key defaults to `key`, as in the generated Secret.
    default_key = {**OWN_KEY_VALUES}
    del default_key["gateway.adminKey.existingSecretKey"]
    pod = chart.one(chart.render(default_key), "Pod")
    assert chart.env_of(pod["spec"]["containers"][0])["CITADEL_API_KEY"] == {
        "secretKeyRef": {"name": "my-admin", "key": "key"}
    }


def test_admin_key_record_follows_the_keys_namespace_with_an_existing_secret(
    chart: ChartKit,
) -> None:
    objs = chart.render(
        {
            **OWN_KEY_VALUES,
            "gateway.keysNamespace": "llm-keys",
            "gateway.adminKey.keepOnUninstall": True,
        }
    )
    (record_secret,) = chart.find(objs, "Secret")
    assert record_secret["metadata"]["namespace"] == "llm-keys"
    annotations = record_secret["metadata"]["annotations"]
    assert annotations["helm.sh/resource-policy"] == "keep"


def test_admin_key_records_of_releases_sharing_a_keys_namespace_differ(
    chart: ChartKit,
) -> None:
    # Two releases whose gateways keep their keys in one namespace: each renders
    # its own record there, as a further Secret of the key `admin` (the dotted
    # form of `citadel keys rotate`, never the Secret `create` makes for a key).
    values = {"gateway.keysNamespace": "llm-keys"}

    def record(namespace: str) -> Obj:
        objs = chart.render(values, namespace=namespace)
        (found,) = [
            o
            for o in chart.find(objs, "Secret")
            if o["metadata"]["namespace"] == "llm-keys"
        ]
        return found

    a, b = record("team-a"), record("team-b")
    assert a["metadata"]["name"] == "citadel-key-admin.team-a"
    assert b["metadata"]["name"] == "citadel-key-admin.team-b"
    for secret in (a, b):
        labels = secret["metadata"]["labels"]
        assert labels[KEY_LABEL] == "true"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        stored = key_from_secret(secret)
        assert stored is not None and stored.name == "admin"
    # In the release namespace the record keeps the name `create` gives it.
    for keys in ({}, {"gateway.keysNamespace": chart.namespace}):
        assert chart.find(chart.render(keys), "Secret", "citadel-key-admin")


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (
            {"gateway.adminKey.existingSecret": "my-admin"},
            "gateway.adminKey.existingSecret needs gateway.adminKey.sha256, the "
            "SHA-256 of the key in Secret my-admin (key key), as 64 lowercase hex "
            'digits: printf %s "$KEY" | sha256sum',
        ),
        (
            {"gateway.adminKey.sha256": OWN_KEY_VALUES["gateway.adminKey.sha256"]},
            "gateway.adminKey.sha256 is set without gateway.adminKey.existingSecret",
        ),
        (
            {**OWN_KEY_VALUES, "gateway.adminKey.create": False},
            "gateway.adminKey.existingSecret is set but gateway.adminKey.create is "
            "false",
        ),
    ],
)
def test_admin_key_values_that_do_not_go_together_fail(
    chart: ChartKit, values: dict[str, object], error: str
) -> None:
    chart.render(values, expect_error=error)


def test_notes_read_the_admin_key_where_it_is(chart: ChartKit, tmp_path: Path) -> None:
    generated = chart.notes({}, tmp_path / "generated")
    assert (
        "get secret citadel-admin-key -o jsonpath='{.data.key}' | base64 -d"
        in generated
    )
    own = chart.notes(OWN_KEY_VALUES, tmp_path / "own")
    assert "from your Secret" in own
    # kubectl's JSONPath reads a dot in a key name as a path step unless escaped.
    assert r"get secret my-admin -o jsonpath='{.data.api\.key}' | base64 -d" in own
    assert "citadel-admin-key" not in own


def test_model_network_policy(chart: ChartKit) -> None:
    chart.render({"networkPolicy.enabled": True}, expect_error="networkPolicy")
    objs = chart.render(
        {
            "networkPolicy.enabled": True,
            "watchNamespaces": ["llm-a", "llm-b"],
            "networkPolicy.extraFrom": [
                {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
            ],
        }
    )
    policies = chart.find(objs, "NetworkPolicy", "citadel-models-citadel-system")
    assert {p["metadata"]["namespace"] for p in policies} == {"llm-a", "llm-b"}
    spec = policies[0]["spec"]
    assert spec["podSelector"]["matchLabels"] == {
        "app.kubernetes.io/managed-by": "citadel-operator"
    }
    peers = spec["ingress"][0]["from"]
    assert peers[0]["namespaceSelector"]["matchLabels"] == {
        "kubernetes.io/metadata.name": chart.namespace
    }
    assert peers[0]["podSelector"]["matchLabels"]["app.kubernetes.io/component"] == (
        "gateway"
    )
    assert peers[1] == {"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}
    assert spec["ingress"][0]["ports"] == [{"protocol": "TCP", "port": 8000}]


def test_model_pod_labels_are_the_operators(chart: ChartKit) -> None:
    from citadel.operator import names

    objs = chart.render(
        {"networkPolicy.enabled": True, "networkPolicy.namespaces": ["x"]}
    )
    policy = chart.one(objs, "NetworkPolicy", "citadel-models-citadel-system")
    selector = policy["spec"]["podSelector"]["matchLabels"]
    assert selector == {names.LABEL_MANAGED_BY: names.MANAGER_NAME}
    assert policy["spec"]["ingress"][0]["ports"][0]["port"] == names.HTTP_PORT


def test_a_gateway_beside_another_releases_operator(chart: ChartKit) -> None:
    objs = chart.render(
        {"operator.enabled": False, "gateway.routesNamespace": "citadel-system"},
        namespace="team-b",
    )
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-gateway"))
    )
    assert env["CITADEL_GATEWAY_ROUTES_NAMESPACE"] == "citadel-system"
    assert env["CITADEL_GATEWAY_NAMESPACE"] == "team-b"  # its own keys
    role = chart.one(objs, "Role", "citadel-gateway-routes-team-b")
    assert role["metadata"]["namespace"] == "citadel-system"
    assert role["rules"] == [
        {
            "apiGroups": [""],
            "resources": ["configmaps"],
            "resourceNames": ["citadel-routes"],
            "verbs": ["get", "list", "watch"],
        }
    ]
    binding = chart.one(objs, "RoleBinding", "citadel-gateway-routes-team-b")
    assert binding["subjects"][0]["namespace"] == "team-b"
    # The release's own namespace, or the default: nothing extra.
    same = chart.render({"gateway.routesNamespace": chart.namespace})
    gateway = chart.container(chart.one(same, "Deployment", "citadel-gateway"))
    assert "CITADEL_GATEWAY_ROUTES_NAMESPACE" not in chart.env_of(gateway)
    chart.render(
        {"gateway.routesNamespace": "elsewhere"},
        expect_error="gateway.routesNamespace is for operator.enabled=false",
    )


def test_notes_create_keys_where_the_gateway_reads_them(
    chart: ChartKit, tmp_path: Path
) -> None:
    # Without the chart's admin key the notes say how to make one: in the keys'
    # namespace, the only one the gateway reads keys from.
    values = {"gateway.adminKey.create": False}
    assert f"citadel keys -n {chart.namespace} create NAME" in chart.notes(
        values, tmp_path / "release"
    )
    notes = chart.notes(
        {**values, "gateway.keysNamespace": "llm-keys"}, tmp_path / "keys"
    )
    assert "citadel keys -n llm-keys create NAME" in notes


def test_notes_serve_the_model_where_the_operator_watches(
    chart: ChartKit, tmp_path: Path
) -> None:
    clusterwide = chart.notes({}, tmp_path / "all")
    assert "kubectl create namespace llm\n" in clusterwide
    assert "kubectl -n llm apply -f docs/examples/minimal.yaml" in clusterwide
    # With namespaces listed the operator ignores every other one (`llm` too).
    notes = chart.notes({"watchNamespaces": ["team-a", "team-b"]}, tmp_path / "ns")
    assert "kubectl -n team-a apply -f docs/examples/minimal.yaml" in notes
    assert "kubectl -n team-a get llmmodels -w" in notes
    assert "namespace llm" not in notes and "-n llm " not in notes
