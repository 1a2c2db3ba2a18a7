"""Settings from CITADEL_OPERATOR_* variables."""

from __future__ import annotations

import json

import pytest

from citadel.operator.settings import LogFormat, OperatorSettings, PeeringMode

pytestmark = pytest.mark.unit


def test_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("WATCH_NAMESPACES", "GATEWAY_NAMESPACE", "LOG_FORMAT"):
        monkeypatch.delenv(f"CITADEL_OPERATOR_{name}", raising=False)
    settings = OperatorSettings()
    assert settings.clusterwide
    assert settings.gateway_namespace == "citadel-system"
    assert settings.routes_configmap == "citadel-routes"
    assert settings.default_vllm_image.startswith("vllm/vllm-openai:v")
    assert (settings.metrics_port, settings.health_port) == (8080, 8081)


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
