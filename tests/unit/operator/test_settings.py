"""Settings from CITADEL_OPERATOR_* variables."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from citadel.operator.settings import (
    LogFormat,
    OperatorSettings,
    PeeringMode,
    explain,
)

pytestmark = pytest.mark.unit


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in (
        "WATCH_NAMESPACES",
        "GATEWAY_NAMESPACE",
        "LOG_FORMAT",
        "POD_MONITORS",
        "VLLM_HOST",
        "LISTEN_HOST",
    ):
        monkeypatch.delenv(f"CITADEL_OPERATOR_{name}", raising=False)
    settings = OperatorSettings()
    assert settings.clusterwide
    assert settings.gateway_namespace == "citadel-system"
    assert settings.routes_configmap == "citadel-routes"
    assert settings.default_vllm_image.startswith("vllm/vllm-openai:v")
    assert (settings.metrics_port, settings.health_port) == (8080, 8081)
    assert settings.pod_monitors is True
    # As before the setting existed: no model's Deployment changes on upgrade.
    assert settings.vllm_host == "0.0.0.0"
    assert settings.listen_host == "0.0.0.0"


def test_pod_monitors_turned_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITADEL_OPERATOR_POD_MONITORS", "false")
    assert OperatorSettings().pod_monitors is False


def test_from_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITADEL_OPERATOR_WATCH_NAMESPACES", "llm, team-a,")
    monkeypatch.setenv("CITADEL_OPERATOR_LOG_FORMAT", "text")
    monkeypatch.setenv("CITADEL_OPERATOR_PEERING", "standalone")
    settings = OperatorSettings()
    assert settings.watch_namespaces == ("llm", "team-a")
    assert not settings.clusterwide
    assert settings.log_format is LogFormat.TEXT
    assert settings.peering is PeeringMode.STANDALONE


def test_bad_values_are_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITADEL_OPERATOR_LOG_FORMAT", "xml")
    with pytest.raises(ValueError, match="log_format"):
        OperatorSettings()


def test_pod_monitor_labels_from_json(monkeypatch: pytest.MonkeyPatch) -> None:
    given = {
        "release": "kube-prometheus-stack",
        "example.com/team": "ml",
        "a-1.b2.example/Team_Name.x": "",
    }
    monkeypatch.setenv("CITADEL_OPERATOR_POD_MONITOR_LABELS", json.dumps(given))
    assert OperatorSettings().pod_monitor_labels == given


@pytest.mark.parametrize(
    ("labels", "problem"),
    [
        ('{"bad key": "x"}', "not a label key"),
        ('{"a..b/x": "y"}', "not a label key"),
        ('{"a.-b/x": "y"}', "not a label key"),
        ('{"' + "a" * 254 + '/x": "y"}', "not a label key"),
        ('{"release": "not a value"}', "not a label value"),
        ('{"release": "' + "x" * 64 + '"}', "not a label value"),
        ('{"app.kubernetes.io/managed-by": "helm"}', "operator's own labels"),
        ('["release"]', "pod_monitor_labels"),
    ],
)
def test_bad_pod_monitor_labels_are_refused(
    monkeypatch: pytest.MonkeyPatch, labels: str, problem: str
) -> None:
    monkeypatch.setenv("CITADEL_OPERATOR_POD_MONITOR_LABELS", labels)
    with pytest.raises(ValueError, match=problem):
        OperatorSettings()


def test_namespace_globs_list_everything_and_filter() -> None:
    settings = OperatorSettings(watch_namespaces=("e2e-*", "llm"))
    assert settings.list_scopes() == (None,)
    assert settings.watches("e2e-abc") and settings.watches("llm")
    assert not settings.watches("other")
    plain = OperatorSettings(watch_namespaces=("llm",))
    assert plain.list_scopes() == ("llm",)


def test_namespaces_are_deduplicated_and_globs_kept(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "CITADEL_OPERATOR_WATCH_NAMESPACES", " llm , team-*,llm-?, x-[ab],y-[!c-e],llm"
    )
    assert OperatorSettings().watch_namespaces == (
        "llm",
        "team-*",
        "llm-?",
        "x-[ab]",
        "y-[!c-e]",
    )
    monkeypatch.setenv("CITADEL_OPERATOR_WATCH_NAMESPACES", "")
    assert OperatorSettings().clusterwide


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        # A JSON or YAML list: its parts would be globs matching nothing, and
        # the operator would list the whole cluster for them.
        ('["llm","research"]', "a JSON or YAML list"),
        ("[llm]", "a JSON or YAML list"),
        ("[llm, research]", "a JSON or YAML list"),
        # Naming none would silently watch the whole cluster.
        (",,,", "names no namespace"),
        (" , ", "names no namespace"),
        ("LLM", "neither a namespace name"),
        ("bad_ns!", "neither a namespace name"),
        ("a b", "neither a namespace name"),
        ("llm,-llm", "neither a namespace name"),
        ("llm," + "a" * 64, "neither a namespace name"),
        ("!kube-*", "neither a namespace name"),
        ("Team-*", "neither a namespace name"),
        ("team-[]", "neither a namespace name"),
        ("team]", "neither a namespace name"),
    ],
)
def test_bad_namespaces_are_refused(
    monkeypatch: pytest.MonkeyPatch, value: str, problem: str
) -> None:
    monkeypatch.setenv("CITADEL_OPERATOR_WATCH_NAMESPACES", value)
    with pytest.raises(ValidationError, match=problem) as refused:
        OperatorSettings()
    assert "CITADEL_OPERATOR_WATCH_NAMESPACES=" in explain(refused.value)


@pytest.mark.parametrize(
    ("variable", "value", "problem"),
    [
        ("GATEWAY_NAMESPACE", "", "not a namespace name"),
        ("GATEWAY_NAMESPACE", "Citadel System", "not a namespace name"),
        ("GATEWAY_NAMESPACE", "-x", "not a namespace name"),
        ("GATEWAY_NAMESPACE", "a.b", "not a namespace name"),
        ("ROUTES_CONFIGMAP", "", "not an object name"),
        ("ROUTES_CONFIGMAP", "Bad Name", "not an object name"),
        ("ROUTES_CONFIGMAP", "a" * 254, "not an object name"),
        ("PEERING_NAME", "", "not an object name"),
        ("PEERING_NAME", "Bad Name", "not an object name"),
        ("PEERING_NAME", "a..b", "not an object name"),
        ("DEFAULT_VLLM_IMAGE", "", "not an image reference"),
        ("DEFAULT_VLLM_IMAGE", "not an image", "not an image reference"),
        ("RESYNC_SECONDS", "inf", "finite"),
        ("RESYNC_SECONDS", "nan", "finite"),
        ("RESYNC_SECONDS", "1e-9", "too short"),
        ("RESYNC_SECONDS", "9.9", "too short"),
        ("RESYNC_SECONDS", "86401", "less than or equal to 86400"),
        ("ROUTE_PUBLISH_DELAY", "inf", "finite"),
        ("ROUTE_PUBLISH_DELAY", "61", "less than or equal to 60"),
        ("ROUTE_PUBLISH_INTERVAL", "inf", "finite"),
        ("ROUTE_PUBLISH_INTERVAL", "601", "less than or equal to 600"),
        ("PEERING_LIFETIME_SECONDS", "14", "greater than or equal to 15"),
        ("PEERING_LIFETIME_SECONDS", "601", "less than or equal to 600"),
        ("HEALTH_PORT", "8080", "METRICS_PORT and CITADEL_OPERATOR_HEALTH_PORT"),
        ("VLLM_HOST", "", "not an IP address"),
        ("VLLM_HOST", "localhost", "not an IP address"),
        ("VLLM_HOST", "[::]", "not an IP address"),
        ("VLLM_HOST", "0.0.0.0:8000", "not an IP address"),
        ("VLLM_HOST", "0.0.0.0; rm -rf /", "not an IP address"),
        # A pod's own address is not known beforehand; the probes and the gateway
        # do not reach the loopback.
        ("VLLM_HOST", "127.0.0.1", "not a wildcard address"),
        ("VLLM_HOST", "::1", "not a wildcard address"),
        ("VLLM_HOST", "10.244.0.5", "not a wildcard address"),
        ("VLLM_HOST", "::%eth0", "not a wildcard address"),
        # The operator's own endpoints: the kubelet and Prometheus reach the
        # pod's address, as for vLLM.
        ("LISTEN_HOST", "[::]", "not an IP address"),
        ("LISTEN_HOST", "localhost", "not an IP address"),
        ("LISTEN_HOST", "127.0.0.1", "not a wildcard address"),
        ("LISTEN_HOST", "::1", "not a wildcard address"),
    ],
)
def test_bad_values_name_their_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, problem: str
) -> None:
    monkeypatch.setenv(f"CITADEL_OPERATOR_{variable}", value)
    with pytest.raises(ValidationError, match=problem) as refused:
        OperatorSettings()
    assert f"CITADEL_OPERATOR_{variable}" in explain(refused.value)


def test_explain_writes_one_line_per_problem(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITADEL_OPERATOR_RESYNC_SECONDS", "inf")
    monkeypatch.setenv("CITADEL_OPERATOR_GATEWAY_NAMESPACE", "Bad")
    with pytest.raises(ValidationError) as refused:
        OperatorSettings()
    assert explain(refused.value).splitlines() == [
        "CITADEL_OPERATOR_GATEWAY_NAMESPACE='Bad': not a namespace name (lowercase "
        "letters, digits and '-', beginning and ending with a letter or digit, at "
        "most 63 characters)",
        "CITADEL_OPERATOR_RESYNC_SECONDS='inf': Input should be a finite number",
    ]
    # A problem inside a value says where.
    monkeypatch.setenv("CITADEL_OPERATOR_POD_MONITOR_LABELS", '{"release": 5}')
    monkeypatch.delenv("CITADEL_OPERATOR_RESYNC_SECONDS")
    monkeypatch.delenv("CITADEL_OPERATOR_GATEWAY_NAMESPACE")
    with pytest.raises(ValidationError) as refused:
        OperatorSettings()
    assert explain(refused.value) == (
        "CITADEL_OPERATOR_POD_MONITOR_LABELS at release=5: Input should be a valid "
        "string"
    )


@pytest.mark.parametrize(
    ("variable", "value", "field", "read"),
    [
        ("RESYNC_SECONDS", "0", "resync_seconds", 0.0),
        ("RESYNC_SECONDS", "10", "resync_seconds", 10.0),
        ("RESYNC_SECONDS", "86400", "resync_seconds", 86400.0),
        ("ROUTE_PUBLISH_DELAY", "0", "route_publish_delay", 0.0),
        ("ROUTE_PUBLISH_INTERVAL", "600", "route_publish_interval", 600.0),
        ("PEERING_LIFETIME_SECONDS", "15", "peering_lifetime_seconds", 15),
        ("ROUTES_CONFIGMAP", "routes.v1", "routes_configmap", "routes.v1"),
        ("HEALTH_PORT", "0", "health_port", 0),
        ("VLLM_HOST", "0.0.0.0", "vllm_host", "0.0.0.0"),
        ("VLLM_HOST", "::", "vllm_host", "::"),
        ("VLLM_HOST", "0:0:0:0:0:0:0:0", "vllm_host", "::"),
        ("LISTEN_HOST", "0.0.0.0", "listen_host", "0.0.0.0"),
        ("LISTEN_HOST", "::", "listen_host", "::"),
        ("LISTEN_HOST", "0::0", "listen_host", "::"),
    ],
)
def test_values_at_the_bounds_are_taken(
    monkeypatch: pytest.MonkeyPatch,
    variable: str,
    value: str,
    field: str,
    read: object,
) -> None:
    monkeypatch.setenv(f"CITADEL_OPERATOR_{variable}", value)
    assert getattr(OperatorSettings(), field) == read


def test_both_ports_may_be_off(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CITADEL_OPERATOR_METRICS_PORT", "0")
    monkeypatch.setenv("CITADEL_OPERATOR_HEALTH_PORT", "0")
    assert (OperatorSettings().metrics_port, OperatorSettings().health_port) == (0, 0)


def test_peering_lifetime_defaults_to_kopfs() -> None:
    # A longer one would not tolerate more clock skew (Kopf renews 5 to 10 s
    # before the end whatever the lifetime), only slow the takeover.
    assert OperatorSettings.model_fields["peering_lifetime_seconds"].default == 60


def test_autoscaler_settings_from_the_environment(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv(
        "CITADEL_OPERATOR_GATEWAY_METRICS_URLS",
        "http://127.0.0.1:8080/metrics, http://[::1]:9090/metrics",
    )
    monkeypatch.setenv(
        "CITADEL_OPERATOR_GATEWAY_METRICS_SERVICE", "citadel-system/gw-metrics"
    )
    settings = OperatorSettings()
    assert settings.gateway_metrics_urls == (
        "http://127.0.0.1:8080/metrics",
        "http://[::1]:9090/metrics",
    )
    assert settings.gateway_metrics_service == "citadel-system/gw-metrics"
    assert settings.autoscale_interval_seconds == 2.0
    assert settings.autoscale_window_seconds == 30.0
    monkeypatch.setenv("CITADEL_OPERATOR_GATEWAY_METRICS_URLS", '["http://gw/metrics"]')
    assert OperatorSettings().gateway_metrics_urls == ("http://gw/metrics",)


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("GATEWAY_METRICS_URLS", "gw:8080/metrics", "not an http(s) URL"),
        ("GATEWAY_METRICS_URLS", "[not json", "not a JSON list"),
        ("GATEWAY_METRICS_SERVICE", "gw-metrics", "not namespace/name"),
        ("GATEWAY_METRICS_SERVICE", "a/b/c", "not namespace/name"),
        ("AUTOSCALE_INTERVAL_SECONDS", "0.1", "greater than or equal to 0.2"),
        ("AUTOSCALE_WINDOW_SECONDS", "3601", "less than or equal to 3600"),
    ],
)
def test_bad_autoscaler_settings_are_refused(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, message: str
) -> None:
    monkeypatch.setenv(f"CITADEL_OPERATOR_{variable}", value)
    with pytest.raises(ValidationError) as err:
        OperatorSettings()
    assert message in explain(err.value)
