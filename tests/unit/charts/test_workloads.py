"""What every rendered workload must be: labelled, pinned, non-root and read-only,
and configured with settings the operator and the gateway actually read."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest
import yaml

from citadel.gateway.settings import GatewaySettings
from citadel.operator.settings import OperatorSettings

if TYPE_CHECKING:
    from conftest import ChartKit, Obj

pytestmark = pytest.mark.unit

STANDARD_LABELS = {
    "helm.sh/chart",
    "app.kubernetes.io/name",
    "app.kubernetes.io/instance",
    "app.kubernetes.io/version",
    "app.kubernetes.io/managed-by",
    "app.kubernetes.io/part-of",
    "app.kubernetes.io/component",
}

# Every optional part on, so that every template renders.
EVERYTHING: dict[str, Any] = {
    "gateway.ingress.enabled": True,
    "gateway.autoscaling.enabled": True,
    "networkPolicy.enabled": True,
    "networkPolicy.namespaces": ["llm"],
}


def pod_specs(objs: list[Obj]) -> list[tuple[str, Obj]]:
    """(name, pod spec) of every Deployment and Pod."""
    specs = []
    for o in objs:
        if o["kind"] == "Deployment":
            specs.append((o["metadata"]["name"], o["spec"]["template"]["spec"]))
        elif o["kind"] == "Pod":
            specs.append((o["metadata"]["name"], o["spec"]))
    return specs


def test_every_object_carries_the_standard_labels(chart: ChartKit) -> None:
    objs = chart.render(EVERYTHING, monitoring=True)
    for o in objs:
        missing = STANDARD_LABELS - set(o["metadata"].get("labels", {}))
        assert not missing, f"{o['kind']}/{o['metadata']['name']} lacks {missing}"
        assert o["metadata"]["labels"]["app.kubernetes.io/instance"] == chart.release


def test_the_default_release_makes_the_expected_objects(chart: ChartKit) -> None:
    objs = chart.render()
    kinds = sorted({o["kind"] for o in objs})
    assert kinds == [
        "ClusterKopfPeering",
        "ClusterRole",
        "ClusterRoleBinding",
        "ConfigMap",
        "Deployment",
        "NetworkPolicy",
        "Pod",
        "PodDisruptionBudget",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    deployments = {d["metadata"]["name"] for d in chart.find(objs, "Deployment")}
    assert deployments == {"citadel-operator", "citadel-gateway", "citadel-redis"}
    assert all(
        o["metadata"].get("namespace") == chart.namespace
        for o in objs
        if o["kind"] not in {"ClusterRole", "ClusterRoleBinding", "ClusterKopfPeering"}
    )


def test_selectors_match_their_pods(chart: ChartKit) -> None:
    objs = chart.render(EVERYTHING, monitoring=True)
    pods = {
        d["metadata"]["name"]: d["spec"]["template"]["metadata"]["labels"]
        for d in chart.find(objs, "Deployment")
    }
    for d in chart.find(objs, "Deployment"):
        selector = d["spec"]["selector"]["matchLabels"]
        assert selector.items() <= pods[d["metadata"]["name"]].items()
    for svc in chart.find(objs, "Service"):
        matched = [
            n
            for n, labels in pods.items()
            if svc["spec"]["selector"].items() <= labels.items()
        ]
        assert len(matched) == 1, f"Service {svc['metadata']['name']} selects {matched}"


# OpenShift's restricted-v2 SCC assigns the ids from the namespace's range and
# refuses a pod that names others.
OPENSHIFT: dict[str, Any] = {
    f"{part}.podSecurityContext": {
        "runAsUser": None,
        "runAsGroup": None,
        "fsGroup": None,
    }
    for part in ("operator", "gateway")
}
# The volume types the "restricted" Pod Security Standard allows.
RESTRICTED_VOLUMES = {
    "configMap",
    "csi",
    "downwardAPI",
    "emptyDir",
    "ephemeral",
    "persistentVolumeClaim",
    "projected",
    "secret",
}


def restricted_violations(spec: Obj) -> list[str]:
    """What in a pod spec the "restricted" Pod Security Standard (its baseline
    checks included) refuses, as Pod Security Admission checks it."""
    found = []
    pod = spec.get("securityContext") or {}
    containers = [
        *spec.get("initContainers", []),
        *spec["containers"],
        *spec.get("ephemeralContainers", []),
    ]
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            found.append(field)
    for volume in spec.get("volumes", []):
        kinds = set(volume) - {"name"}
        if not kinds <= RESTRICTED_VOLUMES:
            found.append(f"volume {volume['name']}: {sorted(kinds)}")
    if pod.get("runAsUser") == 0:
        found.append("pod runAsUser 0")
    pod_seccomp = (pod.get("seccompProfile") or {}).get("type")
    if pod_seccomp not in {None, "RuntimeDefault", "Localhost"}:
        found.append(f"pod seccompProfile {pod_seccomp}")
    for c in containers:
        ctx = c.get("securityContext") or {}
        name = c["name"]
        if ctx.get("privileged"):
            found.append(f"{name}: privileged")
        if ctx.get("allowPrivilegeEscalation") is not False:
            found.append(f"{name}: allowPrivilegeEscalation not false")
        non_root = ctx.get("runAsNonRoot", pod.get("runAsNonRoot"))
        if non_root is not True:
            found.append(f"{name}: runAsNonRoot not true")
        if ctx.get("runAsUser") == 0:
            found.append(f"{name}: runAsUser 0")
        seccomp = (ctx.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in {"RuntimeDefault", "Localhost"}:
            found.append(f"{name}: seccompProfile {seccomp}")
        capabilities = ctx.get("capabilities") or {}
        if "ALL" not in capabilities.get("drop", []):
            found.append(f"{name}: capabilities do not drop ALL")
        if set(capabilities.get("add", [])) - {"NET_BIND_SERVICE"}:
            found.append(f"{name}: capabilities add {capabilities['add']}")
        if any(p.get("hostPort") for p in c.get("ports", [])):
            found.append(f"{name}: hostPort")
    return found


@pytest.mark.parametrize(
    "values",
    [{}, EVERYTHING, {**EVERYTHING, **OPENSHIFT}],
    ids=["defaults", "everything", "openshift"],
)
def test_every_pod_meets_the_restricted_pod_security_standard(
    chart: ChartKit, values: dict[str, Any]
) -> None:
    specs = pod_specs(chart.render(values))
    assert len(specs) == 4  # operator, gateway, Redis and the `helm test` Pod
    for name, spec in specs:
        assert restricted_violations(spec) == [], name


def test_security_contexts_come_from_values(chart: ChartKit) -> None:
    objs = chart.render(
        {
            **OPENSHIFT,
            "operator.podSecurityContext.supplementalGroups": [5],
            "gateway.securityContext.readOnlyRootFilesystem": False,
        }
    )
    specs = dict(pod_specs(objs))
    assigned = {"runAsUser", "runAsGroup", "fsGroup"}
    for name in ("citadel-operator", "citadel-gateway", "citadel-test-models"):
        assert not assigned & set(specs[name]["securityContext"]), name
    assert specs["citadel-operator"]["securityContext"]["supplementalGroups"] == [5]
    gateway = specs["citadel-gateway"]["containers"][0]["securityContext"]
    # The `helm test` Pod runs the gateway image, with the gateway's contexts.
    test = specs["citadel-test-models"]["containers"][0]["securityContext"]
    assert gateway["readOnlyRootFilesystem"] is test["readOnlyRootFilesystem"] is False
    operator = specs["citadel-operator"]["containers"][0]["securityContext"]
    assert operator["readOnlyRootFilesystem"] is True
    # By default every id is the images' user (images/*.Dockerfile: USER 65532).
    for name, spec in pod_specs(chart.render()):
        if name != "citadel-redis":
            assert {spec["securityContext"][k] for k in assigned} == {65532}, name


def test_security_context_fields_set_to_null_are_left_out(chart: ChartKit) -> None:
    # Helm removes a null only where values.yaml has the key (runAsUser); the
    # others, any field the schema takes, would render as `procMount: null`.
    objs = chart.render(
        {
            "operator.podSecurityContext.fsGroupChangePolicy": None,
            "operator.securityContext.procMount": None,
            "gateway.podSecurityContext.seccompProfile.localhostProfile": None,
            "gateway.securityContext.seLinuxOptions": {"level": None, "user": "u"},
        }
    )

    def nulls(node: object, path: str) -> list[str]:
        if isinstance(node, dict):
            return [p for k, v in node.items() for p in nulls(v, f"{path}.{k}")]
        return [path] if node is None else []

    for name, contexts in security_contexts(objs).items():
        for i, context in enumerate(contexts):
            assert context and nulls(context, f"{name}[{i}]") == []
    specs = dict(pod_specs(objs))
    operator = specs["citadel-operator"]
    assert "fsGroupChangePolicy" not in operator["securityContext"]
    assert "procMount" not in operator["containers"][0]["securityContext"]
    gateway = specs["citadel-gateway"]
    assert gateway["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    selinux = gateway["containers"][0]["securityContext"]["seLinuxOptions"]
    assert selinux == {"user": "u"}


def security_contexts(objs: list[Obj]) -> dict[str, list[Obj | None]]:
    """Each pod's securityContext, then each of its containers'."""
    return {
        name: [
            spec.get("securityContext"),
            *(c.get("securityContext") for c in spec["containers"]),
        ]
        for name, spec in pod_specs(objs)
    }


def test_values_without_the_security_contexts_keep_the_defaults(
    chart: ChartKit, tmp_path: Path
) -> None:
    # `helm upgrade --reuse-values` from a chart before these values renders with
    # that chart's values.yaml, which lacks them: a copy of the chart without
    # them. Rendering nothing would drop every protection.
    copy = tmp_path / "citadel"
    shutil.copytree(chart.path, copy)
    values = yaml.safe_load((copy / "values.yaml").read_text())
    keys = ("podSecurityContext", "securityContext")
    for part in ("operator", "gateway"):
        for key in keys:
            del values[part][key]
    (copy / "values.yaml").write_text(yaml.safe_dump(values))
    reused = chart.render(path=copy)
    for name, spec in pod_specs(reused):
        assert restricted_violations(spec) == [], name
    defaults = security_contexts(chart.render())
    assert security_contexts(reused) == defaults
    # Helm removes a value set to null: the same as without it.
    nulls = {f"{part}.{key}": None for part in ("operator", "gateway") for key in keys}
    assert security_contexts(chart.render(nulls)) == defaults
    # An explicit {} sets nothing (only such values keep one: Helm merges a {}
    # with the chart's values.yaml).
    empty = {f"{part}.{key}": {} for part in ("operator", "gateway") for key in keys}
    contexts = security_contexts(chart.render(empty, path=copy))
    del contexts["citadel-redis"]
    ours = ("citadel-operator", "citadel-gateway", "citadel-test-models")
    assert contexts == {name: [None, None] for name in ours}


@pytest.mark.parametrize("values", [{}, EVERYTHING], ids=["defaults", "everything"])
def test_containers_are_non_root_read_only_and_restricted(
    chart: ChartKit, values: dict[str, Any]
) -> None:
    for name, spec in pod_specs(chart.render(values)):
        pod_ctx = spec["securityContext"]
        assert pod_ctx["runAsNonRoot"] is True, name
        assert pod_ctx["runAsUser"] != 0, name
        assert pod_ctx["seccompProfile"]["type"] == "RuntimeDefault", name
        for c in spec["containers"]:
            ctx = c["securityContext"]
            assert ctx["allowPrivilegeEscalation"] is False, name
            assert ctx["readOnlyRootFilesystem"] is True, name
            assert ctx["capabilities"]["drop"] == ["ALL"], name
            assert "resources" in c and c["resources"]["limits"]["memory"], name


def test_images_are_pinned(chart: ChartKit) -> None:
    for name, spec in pod_specs(chart.render()):
        for c in spec["containers"]:
            image = c["image"]
            repo, _, tag = image.rpartition(":")
            assert repo and tag and tag != "latest", f"{name}: {image}"
    objs = chart.render({"gateway.image.digest": "sha256:" + "a" * 64})
    gateway = chart.one(objs, "Deployment", "citadel-gateway")
    assert chart.container(gateway)["image"].endswith("@sha256:" + "a" * 64)
    chart.render({"gateway.image.tag": "latest"}, expect_error="tag")


def settings_env(settings: type[Any], prefix: str) -> set[str]:
    return {prefix + name.upper() for name in settings.model_fields}


def test_operator_env_names_are_settings_the_operator_reads(chart: ChartKit) -> None:
    objs = chart.render(
        {
            "operator.defaultVllmImage": "vllm/vllm-openai:v0.1.0",
            "operator.nodesAutoscaled": True,
            "listenHost": "::",
        }
    )
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-operator"))
    )
    ours = {k for k in env if k.startswith("CITADEL_OPERATOR_")}
    assert ours <= settings_env(OperatorSettings, "CITADEL_OPERATOR_")
    assert env["CITADEL_OPERATOR_WATCH_NAMESPACES"] == ""
    assert env["CITADEL_OPERATOR_GATEWAY_NAMESPACE"] == chart.namespace
    assert env["CITADEL_OPERATOR_DEFAULT_VLLM_IMAGE"] == "vllm/vllm-openai:v0.1.0"
    autoscaled = env["CITADEL_OPERATOR_NODES_AUTOSCALED"]
    assert OperatorSettings(nodes_autoscaled=autoscaled).nodes_autoscaled is True
    assert (
        OperatorSettings(vllm_host=env["CITADEL_OPERATOR_VLLM_HOST"]).vllm_host == "::"
    )
    listen = env["CITADEL_OPERATOR_LISTEN_HOST"]
    assert OperatorSettings(listen_host=listen).listen_host == "::"
    assert OperatorSettings.model_fields["metrics_port"].default == 8080
    assert env["CITADEL_OPERATOR_METRICS_PORT"] == "8080"
    assert "POD_ID" in env  # Kopf names the replica after its pod when peering


@pytest.mark.parametrize("host", ["0.0.0.0", "::"])
def test_every_listener_follows_listen_host(chart: ChartKit, host: str) -> None:
    """On an IPv6 cluster the kubelet's probes, Prometheus and the gateway reach
    each pod's IPv6 address: one server left on 0.0.0.0 refuses them."""
    values = {"gateway.grpcPort": 50051, "gateway.metricsPort": 9090}
    if host != "0.0.0.0":
        values["listenHost"] = host
    objs = chart.render(values)
    gateway = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-gateway"))
    )
    # HTTP, gRPC and /metrics all bind GatewaySettings.host.
    assert GatewaySettings(host=gateway["CITADEL_GATEWAY_HOST"]).host == host
    assert {
        gateway["CITADEL_GATEWAY_GRPC_PORT"],
        gateway["CITADEL_GATEWAY_METRICS_PORT"],
    } == {"50051", "9090"}
    operator = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-operator"))
    )
    read = OperatorSettings(
        listen_host=operator["CITADEL_OPERATOR_LISTEN_HOST"],
        vllm_host=operator["CITADEL_OPERATOR_VLLM_HOST"],
    )
    assert (read.listen_host, read.vllm_host) == (host, host)
    # Redis without a `--bind` keeps its default, `* -::*`: IPv4 and IPv6.
    redis = chart.container(chart.one(objs, "Deployment", "citadel-redis"))
    assert not [a for a in redis["args"] if "bind" in a]


def test_listen_host_is_an_address_every_pod_has(chart: ChartKit) -> None:
    chart.render({"listenHost": "127.0.0.1"}, expect_error="listenHost")
    chart.render({"listenHost": "[::]"}, expect_error="listenHost")
    # One value for every listener now, not vLLM's alone.
    chart.render({"operator.vllmHost": "::"}, expect_error="vllmHost")


def test_monitoring_labels_reach_the_operators_pod_monitors(
    chart: ChartKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    def env(values: dict[str, Any]) -> dict[str, Any]:
        objs = chart.render(values)
        return chart.env_of(
            chart.container(chart.one(objs, "Deployment", "citadel-operator"))
        )

    assert "CITADEL_OPERATOR_POD_MONITOR_LABELS" not in env({})
    labels = {"release": "kube-prometheus-stack"}
    given = env({"monitoring.labels": labels})["CITADEL_OPERATOR_POD_MONITOR_LABELS"]
    monkeypatch.setenv("CITADEL_OPERATOR_POD_MONITOR_LABELS", given)
    assert OperatorSettings().pod_monitor_labels == labels


def test_monitoring_off_turns_the_operators_pod_monitors_off(
    chart: ChartKit, monkeypatch: pytest.MonkeyPatch
) -> None:
    def settings(values: dict[str, Any]) -> OperatorSettings:
        objs = chart.render(values, monitoring=True)
        env = chart.env_of(
            chart.container(chart.one(objs, "Deployment", "citadel-operator"))
        )
        for name, value in env.items():
            if name.startswith("CITADEL_OPERATOR_"):
                monkeypatch.setenv(name, value)
        return OperatorSettings()

    monkeypatch.delenv("CITADEL_OPERATOR_POD_MONITORS", raising=False)
    assert settings({}).pod_monitors is True
    assert settings({"monitoring.enabled": False}).pod_monitors is False


def test_gateway_env_names_are_settings_the_gateway_reads(chart: ChartKit) -> None:
    objs = chart.render()
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-gateway"))
    )
    assert set(env) <= settings_env(GatewaySettings, "CITADEL_GATEWAY_")
    assert env["CITADEL_GATEWAY_ROUTES_SOURCE"] == "kubernetes"
    assert env["CITADEL_GATEWAY_NAMESPACE"] == chart.namespace
    assert env["CITADEL_GATEWAY_AUTH"] == "required"
    assert env["CITADEL_GATEWAY_REDIS_URL"] == "redis://citadel-redis:6379/0"
    # The settings accept what the chart sets.
    values = {k.removeprefix("CITADEL_GATEWAY_").lower(): v for k, v in env.items()}
    GatewaySettings.model_validate(values)


def test_gateway_probes_and_spread(chart: ChartKit) -> None:
    gateway = chart.one(chart.render(), "Deployment", "citadel-gateway")
    spec = gateway["spec"]["template"]["spec"]
    c = spec["containers"][0]
    assert c["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert c["livenessProbe"]["httpGet"]["path"] == "/healthz"
    keys = {t["topologyKey"] for t in spec["topologySpreadConstraints"]}
    assert keys == {"kubernetes.io/hostname", "topology.kubernetes.io/zone"}
    assert gateway["spec"]["replicas"] == 2
    own = [{"maxSkew": 2, "topologyKey": "zone", "whenUnsatisfiable": "DoNotSchedule"}]
    gateway = chart.one(
        chart.render({"gateway.topologySpreadConstraints": own}),
        "Deployment",
        "citadel-gateway",
    )
    assert gateway["spec"]["template"]["spec"]["topologySpreadConstraints"] == own


def test_components_can_be_turned_off(chart: ChartKit) -> None:
    objs = chart.render({"operator.enabled": False})
    assert not [
        o
        for o in objs
        if o["metadata"]["labels"]["app.kubernetes.io/component"] == "operator"
    ]
    objs = chart.render({"gateway.enabled": False})
    components = {o["metadata"]["labels"]["app.kubernetes.io/component"] for o in objs}
    assert components == {"operator", "monitoring"}


def test_names_follow_the_release(chart: ChartKit) -> None:
    objs = chart.render({"fullnameOverride": "llm"})
    assert {d["metadata"]["name"] for d in chart.find(objs, "Deployment")} == {
        "llm-operator",
        "llm-gateway",
        "llm-redis",
    }


def test_names_stay_legal_at_the_longest_prefix(chart: ChartKit) -> None:
    for operator in (True, False):
        values = {"fullnameOverride": "x" * 47, "operator.enabled": operator}
        for o in chart.render(values):
            name = o["metadata"]["name"]
            # A Service's name is a DNS label; every other name here a subdomain.
            limit = 63 if o["kind"] == "Service" else 253
            assert len(name) <= limit, f"{o['kind']} {name}"
    # Without the operator the prefix is what it was before (47 characters).
    objs = chart.render({"fullnameOverride": "x" * 47, "operator.enabled": False})
    assert chart.find(objs, "Deployment", "x" * 47 + "-gateway")


def test_gateway_shutdown_grace_follows_the_pods(chart: ChartKit) -> None:
    def grace(values: dict[str, Any]) -> tuple[int, str]:
        deployment = chart.one(chart.render(values), "Deployment", "citadel-gateway")
        env = chart.env_of(chart.container(deployment))
        pod = deployment["spec"]["template"]["spec"]
        return pod["terminationGracePeriodSeconds"], env[
            "CITADEL_GATEWAY_SHUTDOWN_GRACE_S"
        ]

    # The preStop sleep (5 s) and a margin come out of the pod's period.
    assert grace({}) == (60, "50")
    assert grace({"gateway.terminationGracePeriodSeconds": 3600}) == (3600, "3590")
    # A short period still leaves the streams most of what the sleep leaves.
    assert grace({"gateway.terminationGracePeriodSeconds": 15}) == (15, "5")
    assert grace({"gateway.terminationGracePeriodSeconds": 10}) == (10, "3")
    assert grace({"gateway.terminationGracePeriodSeconds": 8}) == (8, "2")
    assert grace({"gateway.terminationGracePeriodSeconds": 4}) == (4, "0")


def test_names_in_shared_namespaces_carry_the_release_namespace(
    chart: ChartKit,
) -> None:
    # Two releases of one name (a second gateway in a team's namespace) put Roles
    # and NetworkPolicies into the same model namespaces: they must not clash.
    values = {"watchNamespaces": ["llm"], "networkPolicy.enabled": True}
    objs = chart.render(values)
    team = chart.render({**values, "operator.enabled": False}, namespace="team-b")

    def shared(rendered: list[Obj]) -> set[tuple[str, str]]:
        return {
            (o["kind"], o["metadata"]["name"])
            for o in rendered
            if o["metadata"].get("namespace") == "llm"
        }

    assert shared(objs) and shared(team)
    assert not shared(objs) & shared(team)


@pytest.mark.parametrize("layout", [None, 1, 2])
def test_values_of_another_layout_fail_the_render(chart: ChartKit, layout: Any) -> None:
    # `helm upgrade --reuse-values` from an older chart: its values lack every key
    # added since, some of which would render silently wrong (a security context
    # holding only the one field set beside it).
    said = "not set" if layout is None else str(layout)
    chart.render(
        {"valuesLayout": layout},
        expect_error=f"valuesLayout is {said} where this chart's is 3: with "
        "`helm upgrade --reuse-values`",
    )


def test_an_older_charts_values_fail_on_their_layout_first(
    chart: ChartKit, tmp_path: Path
) -> None:
    # As `helm upgrade --reuse-values` renders: an older chart's values.yaml,
    # without the layout and without keys added since (here a whole section).
    # The check ran in a file Helm renders after the templates in folders,
    # which failed first on the missing keys (a nil pointer, no advice).
    copy = tmp_path / "citadel"
    shutil.copytree(chart.path, copy)
    values = yaml.safe_load((copy / "values.yaml").read_text())
    del values["valuesLayout"], values["operator"]["metrics"]
    (copy / "values.yaml").write_text(yaml.safe_dump(values))
    chart.render(
        path=copy,
        expect_error="valuesLayout is not set where this chart's is 3: with "
        "`helm upgrade --reuse-values`",
    )


@pytest.mark.parametrize(
    "path",
    [
        "gateway.port",
        "gateway.grpcPort",
        "gateway.metricsPort",
        "operator.metrics.port",
        "operator.health.port",
    ],
)
def test_a_port_missing_from_reused_values_fails_the_render(
    chart: ChartKit, path: str
) -> None:
    # `helm upgrade --reuse-values` renders with the old chart's defaults: a key
    # added since is missing, and an empty port variable crashes the pods.
    chart.render(
        {path: None},
        expect_error=f"{path} is not set: with `helm upgrade --reuse-values`",
    )


def test_the_upgrade_guide_takes_the_new_charts_defaults(chart: ChartKit) -> None:
    guide = (chart.root / "docs" / "install.md").read_text()
    upgrades = [line for line in guide.splitlines() if "helm upgrade citadel" in line]
    assert upgrades
    for line in upgrades:
        assert "--reuse-values" not in line, line
    assert "--reset-then-reuse-values" in upgrades[0]


@pytest.mark.parametrize(
    ("values", "error"),
    [
        (
            {"operator.health.port": 8080},
            "operator.metrics.port and operator.health.port are both 8080",
        ),
        (
            {"gateway.metricsPort": 8000},
            "gateway.metricsPort 8000 is also the HTTP (gateway.port) or gRPC",
        ),
        (
            {"gateway.grpcPort": 9090},
            "gateway.metricsPort 9090 is also the HTTP (gateway.port) or gRPC",
        ),
        (
            {"gateway.grpcPort": 8000, "gateway.metricsPort": 0},
            "gateway.grpcPort 8000 is also gateway.port",
        ),
    ],
)
def test_ports_the_programs_refuse_fail_the_render(
    chart: ChartKit, values: dict[str, Any], error: str
) -> None:
    # The operator and the gateway refuse these at start-up: say so at install.
    chart.render(values, expect_error=error)


def test_ports_the_programs_accept_render(chart: ChartKit) -> None:
    # 0 turns the gRPC port off and serves /metrics on the HTTP port.
    objs = chart.render({"gateway.grpcPort": 0, "gateway.metricsPort": 0})
    env = chart.env_of(
        chart.container(chart.one(objs, "Deployment", "citadel-gateway"))
    )
    settings = GatewaySettings.model_validate(
        {
            "port": env["CITADEL_GATEWAY_PORT"],
            "grpc_port": env["CITADEL_GATEWAY_GRPC_PORT"],
            "metrics_port": env["CITADEL_GATEWAY_METRICS_PORT"],
        }
    )
    assert (settings.grpc_port, settings.metrics_port) == (0, 0)
    chart.render({"gateway.grpcPort": 50051, "gateway.metricsPort": 9090})


@pytest.mark.parametrize(
    ("value", "variable", "default"),
    [
        (
            "scaleFromZeroTimeoutSeconds",
            "CITADEL_GATEWAY_SCALE_FROM_ZERO_TIMEOUT_S",
            300,
        ),
        ("queueTimeoutSeconds", "CITADEL_GATEWAY_QUEUE_TIMEOUT_S", 60),
    ],
)
def test_gateway_wait_timeout_is_a_value(
    chart: ChartKit, tmp_path: Path, value: str, variable: str, default: int
) -> None:
    def timeout(objs: list[dict[str, Any]]) -> str:
        deployment = chart.one(objs, "Deployment", "citadel-gateway")
        return str(chart.env_of(chart.container(deployment))[variable])

    assert timeout(chart.render({})) == str(default)
    assert timeout(chart.render({f"gateway.{value}": 0})) == "0"
    assert timeout(chart.render({f"gateway.{value}": 900})) == "900"
    chart.render({f"gateway.{value}": -1}, expect_error="minimum")
    chart.render({f"gateway.{value}": 86401}, expect_error="maximum")
    # Reused values of a chart before the value: the gateway's own default, not
    # an empty variable that would stop it at start-up.
    copy = tmp_path / "citadel"
    shutil.copytree(chart.path, copy)
    values = yaml.safe_load((copy / "values.yaml").read_text())
    del values["gateway"][value]
    (copy / "values.yaml").write_text(yaml.safe_dump(values))
    assert timeout(chart.render(path=copy)) == str(default)
    # The chart's default is the gateway's.
    field = GatewaySettings.model_fields[
        variable.removeprefix("CITADEL_GATEWAY_").lower()
    ]
    assert field.default == default
