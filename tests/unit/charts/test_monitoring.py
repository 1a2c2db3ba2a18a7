"""ServiceMonitors, alert rules (promtool) and Grafana dashboards: their PromQL
parses, and every metric it names is one the gateway, the operator or vLLM exports."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any

import pytest
import yaml
from prometheus_client import CollectorRegistry
from prometheus_client.metrics import MetricWrapperBase

from citadel.gateway.metrics import GatewayMetrics
from citadel.operator import names
from citadel.operator.metrics import Metrics as OperatorMetrics
from citadel.operator.status import LLMModelStatus, Phase, ReplicaCounts

if TYPE_CHECKING:
    from conftest import ChartKit, Obj

pytestmark = pytest.mark.unit

HERE = Path(__file__).parent
# vLLM's own metrics that the rules and dashboards use (vLLM's V1 engine names).
VLLM_METRICS = {
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
    "vllm:time_to_first_token_seconds_bucket",
    "vllm:prompt_tokens_total",
    "vllm:generation_tokens_total",
}
# The labels Prometheus and the Prometheus Operator put on every series of a target
# scraped through a ServiceMonitor or PodMonitor (`endpoint`: the port's name). A
# metric's own label of one of these names is renamed `exported_<name>`
# (honor_labels is off), so queries on it find nothing.
TARGET_LABELS = {
    "job",
    "instance",
    "namespace",
    "pod",
    "service",
    "endpoint",
    "container",
}
# Grafana's variables, replaced by what they stand for when the PromQL is checked.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "1h",
    "$namespace": ".*",
    "$model": ".*",
    "$key": ".*",
}


def exported_by_family(registry: CollectorRegistry) -> dict[str, set[str]]:
    """Each metric family of a registry -> the series names it is exported as."""
    suffixes = {
        "counter": ["_total"],
        "histogram": ["_bucket", "_sum", "_count"],
        "gauge": [""],
    }
    return {
        family.name: {family.name + suffix for suffix in suffixes[family.type]}
        for family in registry.collect()
    }


def exported_names(registry: CollectorRegistry) -> set[str]:
    """The series names a registry's metrics are exported as."""
    return set().union(*exported_by_family(registry).values())


def label_names(owner: object, registry: CollectorRegistry) -> dict[str, set[str]]:
    """Metric family -> every label it is declared or exported with: the labels of
    the instruments `owner` holds (children or not) and of each sample its registry
    collects (custom collectors)."""
    found: dict[str, set[str]] = {}
    for family in registry.collect():
        found.setdefault(family.name, set()).update(
            name for sample in family.samples for name in sample.labels
        )
    for metric in vars(owner).values():
        if isinstance(metric, MetricWrapperBase):
            found.setdefault(metric._name, set()).update(metric._labelnames)
    return found


def known_metrics() -> set[str]:
    gateway = GatewayMetrics(CollectorRegistry())
    operator = OperatorMetrics(CollectorRegistry())
    return (
        exported_names(gateway.registry)
        | exported_names(operator.registry)
        | VLLM_METRICS
        | {"up"}
    )


def rules(chart: ChartKit, values: dict[str, Any] | None = None) -> Obj:
    objs = chart.render(values, monitoring=True)
    return chart.one(objs, "PrometheusRule")["spec"]  # type: ignore[no-any-return]


def rule_exprs(spec: Obj) -> list[str]:
    return [r["expr"] for g in spec["groups"] for r in g["rules"]]


def dashboard_exprs() -> list[str]:
    exprs = []
    for path in sorted((HERE.parents[2] / "charts/citadel/dashboards").glob("*.json")):
        board = json.loads(path.read_text())
        for panel in board["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for var, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(var, value)
                exprs.append(expr)
    return exprs


def metric_names(expr: str) -> set[str]:
    """Metric names in a PromQL expression (identifiers before a selector or range)."""
    tokens = re.findall(r"([a-zA-Z_:][a-zA-Z0-9_:]*)\s*[{\[]", expr)
    return {t for t in tokens if t.startswith(("citadel_", "vllm:")) or t == "up"}


@pytest.fixture(scope="session")
def promtool() -> str:
    found = shutil.which("promtool")
    if not found:
        pytest.skip("no promtool: install Debian's `prometheus` package (.ci/run does)")
    return found


def test_no_metric_label_is_a_target_label() -> None:
    gateway = GatewayMetrics(CollectorRegistry())
    # Its series exist only for the models routed.
    gateway.model_requests.follow(lambda: [(("llm", "m"), False)])
    operator = OperatorMetrics(CollectorRegistry())
    # The per-model series exist only once a model is reported.
    counts = ReplicaCounts(desired=2, current=2, updated=2, ready=1)
    operator.set_model(
        "llm", "m", LLMModelStatus(phase=Phase.READY, replicas=counts, served_name="m")
    )
    labels = {
        **label_names(gateway, gateway.registry),
        **label_names(operator, operator.registry),
    }
    assert "citadel_gateway_requests" in labels
    assert labels["citadel_gateway_watch_synced"] == {"resource"}
    assert "citadel_operator_model_replicas" in labels
    clashes = {
        name: sorted(names & TARGET_LABELS)
        for name, names in labels.items()
        if names & TARGET_LABELS
    }
    assert clashes == {}


def test_monitoring_objects_only_where_the_api_is_served(chart: ChartKit) -> None:
    assert not chart.find(chart.render(), "ServiceMonitor")
    assert not chart.find(chart.render(), "PrometheusRule")
    objs = chart.render({"monitoring.labels": {"release": "kps"}}, monitoring=True)
    monitors = chart.find(objs, "ServiceMonitor")
    assert {m["metadata"]["name"] for m in monitors} == {
        "citadel-gateway",
        "citadel-operator",
    }
    for o in [*monitors, chart.one(objs, "PrometheusRule")]:
        assert o["metadata"]["labels"]["release"] == "kps"
    # One owner for vLLM's PodMonitors: the operator, per model.
    assert not chart.find(objs, "PodMonitor")
    assert not chart.find(
        chart.render({"monitoring.enabled": False}, monitoring=True), "ServiceMonitor"
    )


def test_service_monitors_select_the_metrics_ports(chart: ChartKit) -> None:
    objs = chart.render(monitoring=True)
    for monitor in chart.find(objs, "ServiceMonitor"):
        selector = monitor["spec"]["selector"]["matchLabels"]
        services = [
            s
            for s in chart.find(objs, "Service")
            if selector.items() <= s["metadata"]["labels"].items()
        ]
        assert len(services) == 1, monitor["metadata"]["name"]
        ports = {p["name"] for p in services[0]["spec"]["ports"]}
        endpoint = monitor["spec"]["endpoints"][0]
        assert endpoint["port"] in ports
        assert endpoint["path"] == "/metrics"


def test_rules_pass_promtool_check_and_unit_tests(
    chart: ChartKit, promtool: str, tmp_path: Path
) -> None:
    (tmp_path / "rules.yaml").write_text(yaml.safe_dump(rules(chart)))
    shutil.copy(HERE / "rules_test.yaml", tmp_path / "rules_test.yaml")
    for args in (
        ["check", "rules", "rules.yaml"],
        ["test", "rules", "rules_test.yaml"],
    ):
        result = subprocess.run(
            [promtool, *args], cwd=tmp_path, capture_output=True, text=True, check=False
        )
        assert result.returncode == 0, result.stdout + result.stderr


def test_rule_thresholds_come_from_values(chart: ChartKit) -> None:
    spec = rules(
        chart,
        {
            "monitoring.rules.errorRatio": 0.2,
            "monitoring.rules.alertLabels": {"team": "ml-platform"},
        },
    )
    by_name = {r["alert"]: r for g in spec["groups"] for r in g["rules"]}
    assert by_name["CitadelGatewayErrorRatioHigh"]["expr"].rstrip().endswith("> 0.2")
    assert all(r["labels"]["team"] == "ml-platform" for r in by_name.values())
    names = {
        r["alert"]
        for g in rules(chart, {"gateway.enabled": False})["groups"]
        for r in g["rules"]
    }
    assert not {n for n in names if "Gateway" in n}


GATEWAY_THRESHOLDS = [
    "errorRatio",
    "p99LatencySeconds",
    "p99TimeToFirstTokenSeconds",
    "rateLimitedRatio",
]
OPERATOR_THRESHOLDS = ["kvCacheUsage", "modelNotReadyFor", "replicasUnavailableFor"]


@pytest.mark.parametrize("key", GATEWAY_THRESHOLDS + OPERATOR_THRESHOLDS)
def test_a_threshold_missing_from_reused_values_fails_the_render(
    chart: ChartKit, key: str
) -> None:
    # Rendered without it, the alert's expression ends in a bare `>` (or its `for`
    # is empty) and Prometheus refuses the whole rule file.
    path = f"monitoring.rules.{key}"
    chart.render(
        {path: None},
        monitoring=True,
        expect_error=f"{path} is not set: with `helm upgrade --reuse-values`",
    )


@pytest.mark.parametrize(
    ("without", "key"),
    [("operator", k) for k in OPERATOR_THRESHOLDS]
    + [("gateway", k) for k in GATEWAY_THRESHOLDS],
)
def test_a_threshold_of_rules_not_rendered_is_not_required(
    chart: ChartKit, without: str, key: str
) -> None:
    # A gateway-only release (docs/install.md, "A gateway of its own") renders no
    # model or operator rule, an operator-only one no gateway rule.
    alone = {
        "operator": {"operator.enabled": False, "gateway.routesNamespace": "llm"},
        "gateway": {"gateway.enabled": False},
    }[without]
    spec = rules(chart, {**alone, f"monitoring.rules.{key}": None})
    assert spec["groups"]


def test_model_alerts_only_where_the_release_runs_the_operator(
    chart: ChartKit,
) -> None:
    """A team's gateway-only release (docs/install.md) has no model pods of its
    own: the models' alerts come once, from the operator's release."""
    team = {
        "operator.enabled": False,
        "gateway.routesNamespace": "citadel-system",
        "monitoring.rules.alertLabels": {"team": "research"},
    }
    assert [g["name"] for g in rules(chart, team)["groups"]] == ["citadel.gateway"]
    assert [g["name"] for g in rules(chart)["groups"]] == [
        "citadel.gateway",
        "citadel.models",
        "citadel.operator",
    ]
    neither = {"operator.enabled": False, "gateway.enabled": False}
    assert not chart.find(chart.render(neither, monitoring=True), "PrometheusRule")


@pytest.mark.parametrize(
    ("values", "scope"),
    [
        ({}, f'{names.MODEL_TARGET_LABEL}!=""'),
        (
            {"watchNamespaces": ["llm", "llm-research"]},
            f'{names.MODEL_TARGET_LABEL}!="", namespace=~"llm|llm-research"',
        ),
    ],
)
def test_model_alerts_read_only_citadels_model_pods(
    chart: ChartKit, values: dict[str, Any], scope: str
) -> None:
    """Every selector of the model alerts asks for the label the operator's
    PodMonitor puts on its pods' series (and the watched namespaces): another
    vLLM that the same Prometheus scrapes is not Citadel's."""
    (models,) = [
        g for g in rules(chart, values)["groups"] if g["name"] == "citadel.models"
    ]
    for rule in models["rules"]:
        selectors = re.findall(r"\{([^{}]*)\}", rule["expr"])
        assert selectors, rule["alert"]
        for selector in selectors:
            assert scope in selector, (rule["alert"], selector)


def test_vllm_panels_read_only_citadels_model_pods() -> None:
    """As the alerts: a vLLM that the same Prometheus scrapes outside Citadel
    stays off the dashboards."""
    scoped = [e for e in dashboard_exprs() if "vllm:" in e]
    assert scoped
    for expr in scoped:
        selectors = re.findall(r"vllm:\w+\{([^{}]*)\}", expr)
        assert selectors, expr
        for selector in selectors:
            assert f'{names.MODEL_TARGET_LABEL}!=""' in selector, expr


# A sum straight over the operator's model series: every operator replica exports
# them, and one that stood down for a peer keeps its series a while.
_SUMMED_OVER_REPLICAS = re.compile(
    r"\bsum\s*(by\s*\([^)]*\)\s*)?\(\s*citadel_operator_model"
)


def test_operator_model_series_are_never_summed_over_replicas(
    chart: ChartKit,
) -> None:
    exprs = rule_exprs(rules(chart)) + dashboard_exprs()
    assert [e for e in exprs if "citadel_operator_model" in e]
    assert [e for e in exprs if _SUMMED_OVER_REPLICAS.search(e)] == []


def test_every_promql_expression_parses(
    promtool: str, tmp_path: Path, chart: ChartKit
) -> None:
    exprs = rule_exprs(rules(chart)) + dashboard_exprs()
    records = [{"record": f"citadel:check_{i}", "expr": e} for i, e in enumerate(exprs)]
    (tmp_path / "all.yaml").write_text(
        yaml.safe_dump({"groups": [{"name": "all", "rules": records}]})
    )
    result = subprocess.run(
        [promtool, "check", "rules", "all.yaml"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=False,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"{len(exprs)} rules found" in result.stdout


def test_every_metric_named_is_exported(chart: ChartKit) -> None:
    known = known_metrics()
    used: set[str] = set()
    for expr in rule_exprs(rules(chart)) + dashboard_exprs():
        used |= metric_names(expr)
    assert used - known == set()
    # And the core ones are used at all.
    for name in (
        "citadel_gateway_requests_total",
        "citadel_gateway_time_to_first_token_seconds_bucket",
        "citadel_gateway_tokens_total",
        "citadel_gateway_rate_limited_total",
        "citadel_gateway_request_cost_sum",
        "citadel_gateway_headers_too_large_total",
        "citadel_gateway_head_timeouts_total",
        "citadel_gateway_watch_synced",
        "citadel_gateway_watch_failures_total",
        "citadel_operator_models",
        *VLLM_METRICS,
    ):
        assert name in used, name


# Gateway metrics that no panel reads, each with the reason.
OFF_THE_DASHBOARDS = {
    # A routing document is offered once per change: the alert
    # CitadelGatewayRoutesNotApplied reads the gauge, and the log says why.
    "citadel_gateway_config_reloads",
    "citadel_gateway_config_last_reload_successful",
}


def test_every_gateway_metric_is_on_a_dashboard() -> None:
    """A metric added to the gateway gets a panel, or a reason above: the
    watches' and the 431 refusals' were exported for a while with none."""
    gateway = GatewayMetrics(CollectorRegistry())
    used: set[str] = set()
    for expr in dashboard_exprs():
        used |= metric_names(expr)
    unread = {
        family
        for family, series in exported_by_family(gateway.registry).items()
        if not series & used
    }
    assert unread == OFF_THE_DASHBOARDS


def test_dashboards_are_fresh_and_shipped(
    chart: ChartKit, script: Callable[[str], ModuleType]
) -> None:
    dashboards = script("dashboards")
    rendered = dashboards.render()
    folder = chart.path / "dashboards"
    assert {p.name for p in folder.glob("*.json")} == set(rendered)
    for name, text in rendered.items():
        assert (folder / name).read_text() == text, (
            f"{name} is stale: run `make dashboards`"
        )
    objs = chart.render()
    maps = {
        m["metadata"]["name"]: m
        for m in chart.find(objs, "ConfigMap")
        if m["metadata"]["labels"].get("grafana_dashboard") == "1"
    }
    assert set(maps) == {f"citadel-dashboard-{Path(n).stem}" for n in rendered}
    for name, text in rendered.items():
        data = maps[f"citadel-dashboard-{Path(name).stem}"]["data"]
        assert json.loads(data[f"citadel-{name}"]) == json.loads(text)
    titles = {json.loads(t)["title"] for t in rendered.values()}
    assert titles == {
        "Citadel / Overview",
        "Citadel / Model serving",
        "Citadel / Usage and cost by key",
    }
