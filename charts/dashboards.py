"""Writes the Grafana dashboards the chart ships (`make dashboards`).

The dashboards are built here, panel by panel, so that their PromQL is readable and
reviewed in one place; `charts/citadel/dashboards/*.json` is the generated output
(a unit test fails when it is stale). Metric names come from the gateway's metrics
module (`citadel_gateway_*`), the operator's (`citadel_operator_*`) and vLLM's
(`vllm:*`).

Usage: python charts/dashboards.py [OUTPUT_DIR]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).parent / "citadel" / "dashboards"
DS = {"type": "prometheus", "uid": "${datasource}"}
GW = 'namespace=~"$namespace"'
GW_MODEL = f'{GW}, model=~"$model"'
GW_KEY = f'{GW}, model=~"$model", key=~"$key"'
# Citadel's model pods only (the label each model's PodMonitor adds), as the
# alerts select: not every vLLM the Prometheus scrapes.
VLLM = 'citadel_ai_model!="", model_name=~"$model"'
RI = "$__rate_interval"

Panel = dict[str, Any]


def target(expr: str, legend: str = "", ref: str = "A") -> dict[str, Any]:
    """One Prometheus query of a panel."""
    return {"datasource": DS, "expr": expr, "legendFormat": legend, "refId": ref}


def panel(
    title: str,
    description: str,
    exprs: list[tuple[str, str]],
    *,
    unit: str = "short",
    kind: str = "timeseries",
    width: int = 12,
    height: int = 8,
) -> Panel:
    """A panel; its grid position is filled in by `layout`."""
    return {
        "type": kind,
        "title": title,
        "description": description,
        "datasource": DS,
        "targets": [
            target(expr, legend, chr(ord("A") + i))
            for i, (expr, legend) in enumerate(exprs)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {"legend": {"displayMode": "list", "placement": "bottom"}},
        "gridPos": {"w": width, "h": height, "x": 0, "y": 0},
    }


def stat(title: str, description: str, expr: str, unit: str = "short") -> Panel:
    """A single-number panel across the top row."""
    return panel(title, description, [(expr, "")], unit=unit, kind="stat", width=4)


def layout(panels: list[Panel]) -> list[Panel]:
    """Places panels left to right, wrapping at Grafana's 24 columns."""
    x = y = row_height = 0
    for i, p in enumerate(panels):
        pos = p["gridPos"]
        if x + pos["w"] > 24:
            x, y, row_height = 0, y + row_height, 0
        pos["x"], pos["y"] = x, y
        x += pos["w"]
        row_height = max(row_height, pos["h"])
        p["id"] = i + 1
    return panels


def query_var(name: str, label: str, query: str, *, multi: bool = True) -> Any:
    """A dashboard variable filled from label values."""
    return {
        "name": name,
        "label": label,
        "type": "query",
        "datasource": DS,
        "query": {"query": query, "refId": f"{name}-values"},
        "definition": query,
        "refresh": 2,
        "includeAll": multi,
        "multi": multi,
        "allValue": ".*",
        "current": {"selected": True, "text": ["All"], "value": ["$__all"]},
        "sort": 1,
    }


def dashboard(uid: str, title: str, panels: list[Panel], variables: list[Any]) -> Any:
    """A whole dashboard in Grafana's JSON model."""
    datasource = {
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
    }
    return {
        "uid": uid,
        "title": title,
        "tags": ["citadel"],
        "timezone": "browser",
        "schemaVersion": 39,
        "version": 1,
        "editable": True,
        "refresh": "30s",
        "time": {"from": "now-6h", "to": "now"},
        "templating": {"list": [datasource, *variables]},
        "annotations": {"list": []},
        "links": [],
        "panels": layout(panels),
    }


NAMESPACE = query_var(
    "namespace",
    "Gateway namespace",
    "label_values(citadel_gateway_requests_total, namespace)",
)
MODEL = query_var(
    "model",
    "Model",
    'label_values(citadel_gateway_requests_total{namespace=~"$namespace"}, model)',
)
KEY = query_var(
    "key",
    "API key name",
    'label_values(citadel_gateway_requests_total{namespace=~"$namespace"}, key)',
)


def quantile(q: float, metric: str, selector: str, by: str = "model") -> str:
    """The q-quantile of a histogram, per `by` (empty: over everything)."""
    labels = f"le, {by}" if by else "le"
    return (
        f"histogram_quantile({q}, sum by ({labels}) "
        f"(rate({metric}_bucket{{{selector}}}[{RI}])))"
    )


def overview() -> Any:
    """The platform at a glance: traffic, errors, latency, tokens, models."""
    req = "citadel_gateway_requests_total"
    panels = [
        stat(
            "Requests/s",
            "Requests answered by the gateway per second.",
            f"sum(rate({req}{{{GW}}}[{RI}]))",
            "reqps",
        ),
        stat(
            "Error ratio",
            "Share of answers that are server errors (5xx), or REST streams that "
            "failed after their 200 (citadel_gateway_stream_errors_total).",
            f'sum(rate({req}{{{GW}, status=~"5.."}}[{RI}]) '
            f"or rate(citadel_gateway_stream_errors_total{{{GW}}}[{RI}])) "
            f"/ sum(rate({req}{{{GW}}}[{RI}]))",
            "percentunit",
        ),
        stat(
            "p99 latency",
            "99th percentile of the time to the last byte.",
            quantile(0.99, "citadel_gateway_request_duration_seconds", GW, ""),
            "s",
        ),
        stat(
            "p99 TTFT",
            "99th percentile of the time to the first streamed token.",
            quantile(0.99, "citadel_gateway_time_to_first_token_seconds", GW, ""),
            "s",
        ),
        stat(
            "Tokens/s",
            "Prompt and completion tokens per second through the gateway.",
            f"sum(rate(citadel_gateway_tokens_total{{{GW}}}[{RI}]))",
        ),
        stat(
            "Models Ready",
            "LLMModels in phase Ready, as the operator reports.",
            # max, as the rules take: during a failover the replica that stood
            # down keeps its series a while, and a sum counted the models twice.
            'max(citadel_operator_models{phase="Ready"})',
        ),
        panel(
            "Requests/s by model",
            "Traffic per model (served name).",
            [(f"sum by (model) (rate({req}{{{GW_MODEL}}}[{RI}]))", "{{model}}")],
            unit="reqps",
        ),
        panel(
            "Requests/s by status",
            "HTTP status of the answers: 4xx are the callers', 5xx the platform's.",
            [(f"sum by (status) (rate({req}{{{GW_MODEL}}}[{RI}]))", "{{status}}")],
            unit="reqps",
        ),
        panel(
            "Request duration",
            "Median and 99th percentile of the time to the last byte, per model.",
            [
                (
                    quantile(0.5, "citadel_gateway_request_duration_seconds", GW_MODEL),
                    "p50 {{model}}",
                ),
                (
                    quantile(
                        0.99, "citadel_gateway_request_duration_seconds", GW_MODEL
                    ),
                    "p99 {{model}}",
                ),
            ],
            unit="s",
        ),
        panel(
            "Time to first token (p99)",
            "What streaming users wait for before text appears.",
            [
                (
                    quantile(
                        0.99, "citadel_gateway_time_to_first_token_seconds", GW_MODEL
                    ),
                    "{{model}}",
                )
            ],
            unit="s",
        ),
        panel(
            "Tokens/s",
            "Prompt and completion tokens per second, per model.",
            [
                (
                    "sum by (model, kind) "
                    f"(rate(citadel_gateway_tokens_total{{{GW_MODEL}}}[{RI}]))",
                    "{{model}} {{kind}}",
                )
            ],
        ),
        panel(
            "In-flight requests",
            "Requests outstanding at the model replicas, per model.",
            [
                (
                    "sum by (model) "
                    f"(citadel_gateway_in_flight_requests{{{GW_MODEL}}})",
                    "{{model}}",
                )
            ],
        ),
        panel(
            "Demand by LLMModel",
            "Requests of each LLMModel at the gateways, in flight at its replicas "
            "or waiting for one (a model at zero waking, spec.autoscaling; or "
            "every replica at spec.routing.maxRequestsPerReplica): what the "
            "operator's autoscaler sizes models by. Models with none are left "
            "out.",
            [
                (
                    "sum by (model_namespace, llmmodel, state) "
                    f"(citadel_gateway_model_requests{{{GW}}}) > 0",
                    "{{model_namespace}}/{{llmmodel}} {{state}}",
                )
            ],
        ),
        panel(
            "Queue wait (p90)",
            "How long requests waited at the gateway for a replica with room, "
            "by model and priority: a model with spec.routing."
            "maxRequestsPerReplica whose every replica had that many. Standard "
            "requests go before sheddable ones; one that waits past the "
            "gateway's queue timeout gets 503 model_overloaded. Requests "
            "served at once are not counted; a model none waited for shows none.",
            [
                (
                    quantile(
                        0.9,
                        "citadel_gateway_queue_wait_seconds",
                        GW_MODEL,
                        "model, priority",
                    ),
                    "{{model}} {{priority}}",
                )
            ],
            unit="s",
        ),
        panel(
            "Fallbacks/s",
            "Requests a model could not answer that went to one of its fallbacks "
            "(spec.routing.fallbacks), by the model asked for, the fallback tried "
            "and why the model before it could not answer: no_replica, busy "
            "(every replica said 429) or waking (at zero). Served by the "
            "fallback, a request counts under the fallback's model.",
            [
                (
                    "sum by (model, fallback, reason) "
                    f"(rate(citadel_gateway_fallbacks_total{{{GW_MODEL}}}[{RI}]))",
                    "{{model}} -> {{fallback}} ({{reason}})",
                )
            ],
            unit="reqps",
        ),
        panel(
            "Split/s",
            "Requests for a model that its split (spec.routing.split) sent to "
            "another model, by the model asked for and the target: a canary's or "
            "an A/B test's share. Sent to the target, a request counts under the "
            "target's model. A target unknown, not allowed to the key or without "
            "a ready replica takes none: the model asked for keeps them.",
            [
                (
                    "sum by (model, target) "
                    f"(rate(citadel_gateway_splits_total{{{GW_MODEL}}}[{RI}]))",
                    "{{model}} -> {{target}}",
                )
            ],
            unit="reqps",
        ),
        panel(
            "Shed/s",
            "Sheddable requests (their key's priority, or x-citadel-priority) "
            "refused with 503 model_overloaded, by model: every replica of the "
            "model was full by its own metrics (requests waiting, KV cache in "
            "use), and standard requests kept the room. Counted in Requests/s "
            "too, with status 503. A model with none shed shows none.",
            [
                (
                    "sum by (model) "
                    f"(rate(citadel_gateway_shed_total{{{GW_MODEL}}}[{RI}]))",
                    "{{model}}",
                )
            ],
            unit="reqps",
        ),
        panel(
            "Rate-limited/s",
            "Requests refused with 429, by limit (requests, tokens, quota).",
            [
                (
                    "sum by (scope) "
                    f"(rate(citadel_gateway_rate_limited_total{{{GW_MODEL}}}[{RI}]))",
                    "{{scope}}",
                )
            ],
            unit="reqps",
        ),
        panel(
            "Backend errors/s",
            "Failures talking to model replicas, by kind.",
            [
                (
                    "sum by (kind) "
                    f"(rate(citadel_gateway_backend_errors_total{{{GW_MODEL}}}[{RI}]))",
                    "{{kind}}",
                )
            ],
        ),
        panel(
            "Kubernetes watches",
            "Whether the gateway's watches are in sync, per resource (routes: the "
            "routing ConfigMap; endpointslices: the model pods' addresses; secrets: "
            "the API keys): 0 while any gateway pod's watches of it are not, its "
            "view possibly stale (the alert CitadelGatewayWatchNotSynced names the "
            "pod); and the failed lists and watches per second, per resource.",
            [
                (
                    f"min by (resource) (citadel_gateway_watch_synced{{{GW}}})",
                    "synced {{resource}}",
                ),
                (
                    "sum by (resource) "
                    f"(rate(citadel_gateway_watch_failures_total{{{GW}}}[{RI}]))",
                    "failures/s {{resource}}",
                ),
            ],
        ),
        panel(
            "Placements shared/s",
            "Prefix-aware placements the gateway replicas share through Redis: "
            "published (each gateway's own) and learned (the others', recorded); "
            "with two gateways both subscribed, learned follows published (Redis "
            "keeps nothing for a gateway while it is not). Dropped ones by "
            "reason: redis (waiting when Redis failed: the gateway's log says "
            "why), outbox (more waiting than 10,000), unknown (a model or pod a "
            "gateway does not route to, for a moment after pods change), "
            "malformed. None published while Redis is set: the sharing is off "
            "(CITADEL_GATEWAY_SHARE_PLACEMENTS) or failing.",
            [
                (
                    "sum by (direction) "
                    f"(rate(citadel_gateway_placements_shared_total{{{GW}}}[{RI}]))",
                    "{{direction}}",
                ),
                (
                    "sum by (reason) "
                    f"(rate(citadel_gateway_placements_dropped_total{{{GW}}}[{RI}]))",
                    "dropped {{reason}}",
                ),
            ],
        ),
        panel(
            "Heads refused/s",
            "Requests refused before the app saw them (so not in Requests/s), "
            "their connection closed: 431 for a request line and headers over "
            "the bound, 408 for those not complete within the head timeout. A "
            "steady rate of 431 is a client or a proxy in front adding large "
            "headers, of 408 clients on slow links; a burst, a flood (of 408: "
            "Slowloris, connections held open by heads sent a byte at a time).",
            [
                (
                    f"sum(rate(citadel_gateway_headers_too_large_total{{{GW}}}[{RI}]))",
                    "431 too large",
                ),
                (
                    f"sum(rate(citadel_gateway_head_timeouts_total{{{GW}}}[{RI}]))",
                    "408 too slow",
                ),
            ],
            unit="reqps",
        ),
        panel(
            "Models by phase",
            "LLMModels per phase (Pending, Progressing, Ready, Degraded, Failed).",
            [("max by (phase) (citadel_operator_models)", "{{phase}}")],
        ),
        panel(
            "Models not Ready",
            "Each LLMModel in a phase other than Ready, named (namespace/name).",
            [
                (
                    "max by (model_namespace, model, phase) "
                    '(citadel_operator_model_phase{phase!="Ready"})',
                    "{{model_namespace}}/{{model}} {{phase}}",
                )
            ],
        ),
        panel(
            "Operator reconciles/s",
            "Reconciles by result, and failed ones by error class.",
            [
                (
                    f"sum by (result) (rate(citadel_operator_reconciles_total[{RI}]))",
                    "{{result}}",
                ),
                (
                    "sum by (error) "
                    f"(rate(citadel_operator_reconcile_errors_total[{RI}]))",
                    "error {{error}}",
                ),
            ],
        ),
    ]
    return dashboard(
        "citadel-overview", "Citadel / Overview", panels, [NAMESPACE, MODEL]
    )


def model_serving() -> Any:
    """One model's serving: latency, throughput, queues and KV cache."""
    panels = [
        panel(
            "Time to first token",
            "p50 and p99 as clients see it (gateway) and as vLLM measures it.",
            [
                (
                    quantile(
                        0.5, "citadel_gateway_time_to_first_token_seconds", GW_MODEL
                    ),
                    "gateway p50 {{model}}",
                ),
                (
                    quantile(
                        0.99, "citadel_gateway_time_to_first_token_seconds", GW_MODEL
                    ),
                    "gateway p99 {{model}}",
                ),
                (
                    quantile(
                        0.99, "vllm:time_to_first_token_seconds", VLLM, "model_name"
                    ),
                    "vLLM p99 {{model_name}}",
                ),
            ],
            unit="s",
        ),
        panel(
            "Generated tokens/s",
            "Completion tokens produced per second, per replica.",
            [
                (
                    "sum by (model_name, pod) "
                    f"(rate(vllm:generation_tokens_total{{{VLLM}}}[{RI}]))",
                    "{{pod}}",
                )
            ],
        ),
        panel(
            "Prompt tokens/s",
            "Prompt tokens processed per second, per replica.",
            [
                (
                    "sum by (model_name, pod) "
                    f"(rate(vllm:prompt_tokens_total{{{VLLM}}}[{RI}]))",
                    "{{pod}}",
                )
            ],
        ),
        panel(
            "Queue depth",
            "Requests running and waiting in each replica's engine.",
            [
                (
                    f"sum by (pod) (vllm:num_requests_running{{{VLLM}}})",
                    "running {{pod}}",
                ),
                (
                    f"sum by (pod) (vllm:num_requests_waiting{{{VLLM}}})",
                    "waiting {{pod}}",
                ),
            ],
        ),
        panel(
            "KV cache use",
            "Share of each replica's KV cache in use; near 1 with a queue means "
            "saturation.",
            [(f"max by (pod) (vllm:kv_cache_usage_perc{{{VLLM}}})", "{{pod}}")],
            unit="percentunit",
        ),
        panel(
            "Errors/s by status",
            "Answers other than 2xx for this model, by HTTP status.",
            [
                (
                    "sum by (status) (rate(citadel_gateway_requests_total"
                    f'{{{GW_MODEL}, status!~"2.."}}[{RI}]))',
                    "{{status}}",
                )
            ],
            unit="reqps",
        ),
        panel(
            "Request duration (p99)",
            "99th percentile of the time to the last byte, per API (chat, "
            "completions, ...).",
            [
                (
                    quantile(
                        0.99,
                        "citadel_gateway_request_duration_seconds",
                        GW_MODEL,
                        "api",
                    ),
                    "{{api}}",
                )
            ],
            unit="s",
        ),
        panel(
            "Replicas",
            "Each model's replicas as the operator reports them: desired, and ready "
            "(answering their readiness probe).",
            [
                (
                    "max by (model_namespace, model, state) (citadel_operator_model_"
                    'replicas{served_name=~"$model", state=~"desired|ready"})',
                    "{{model_namespace}}/{{model}} {{state}}",
                )
            ],
        ),
        panel(
            "In-flight per replica",
            "Requests the gateway has outstanding at each replica.",
            [
                (
                    "sum by (replica) "
                    f"(citadel_gateway_in_flight_requests{{{GW_MODEL}}})",
                    "{{replica}}",
                )
            ],
        ),
        panel(
            "Routing decisions/s",
            "How the gateway chose replicas (strategy and reason).",
            [
                (
                    "sum by (strategy, kind) (rate("
                    f"citadel_gateway_routing_decisions_total{{{GW_MODEL}}}[{RI}]))",
                    "{{strategy}} {{kind}}",
                )
            ],
        ),
        panel(
            "Replica ejections",
            "Replicas taken out of rotation after failures.",
            [
                (
                    "sum by (replica) (increase("
                    f"citadel_gateway_replica_ejections_total{{{GW_MODEL}}}[{RI}]))",
                    "{{replica}}",
                )
            ],
        ),
    ]
    return dashboard(
        "citadel-model-serving", "Citadel / Model serving", panels, [NAMESPACE, MODEL]
    )


def key_usage() -> Any:
    """Use and cost per API key name."""
    panels = [
        panel(
            "Requests/s by key",
            "Requests per API key name (keys beyond the label cap show as other).",
            [
                (
                    f"sum by (key) (rate(citadel_gateway_requests_total{{{GW_KEY}}}"
                    f"[{RI}]))",
                    "{{key}}",
                )
            ],
            unit="reqps",
        ),
        panel(
            "Tokens/s by key",
            "Prompt and completion tokens per second, per key name.",
            [
                (
                    "sum by (key, kind) "
                    f"(rate(citadel_gateway_tokens_total{{{GW_KEY}}}[{RI}]))",
                    "{{key}} {{kind}}",
                )
            ],
        ),
        panel(
            "Tokens in the time range",
            "Tokens used per key name over the dashboard's time range.",
            [
                (
                    "sum by (key) "
                    f"(increase(citadel_gateway_tokens_total{{{GW_KEY}}}[$__range]))",
                    "{{key}}",
                )
            ],
            kind="bargauge",
        ),
        panel(
            "Cost in the time range",
            "Cost per key name over the time range, in the routing document's "
            "currency (models with a price only).",
            [
                (
                    "sum by (key) (increase("
                    f"citadel_gateway_request_cost_sum{{{GW_KEY}}}[$__range]))",
                    "{{key}}",
                )
            ],
            kind="bargauge",
        ),
        panel(
            "Cost per hour",
            "Spending rate per key name and model.",
            [
                (
                    "3600 * sum by (key, model) (rate("
                    f"citadel_gateway_request_cost_sum{{{GW_KEY}}}[{RI}]))",
                    "{{key}} {{model}}",
                )
            ],
        ),
        panel(
            "Rate-limited/s by key",
            "Requests refused per key name and limit.",
            [
                (
                    "sum by (key, scope) (rate("
                    f"citadel_gateway_rate_limited_total{{{GW_KEY}}}[{RI}]))",
                    "{{key}} {{scope}}",
                )
            ],
            unit="reqps",
        ),
        panel(
            "Shed/s by key",
            "Sheddable requests refused (503 model_overloaded) per key name and "
            "model, while every replica of the model was full.",
            [
                (
                    "sum by (key, model) (rate("
                    f"citadel_gateway_shed_total{{{GW_KEY}}}[{RI}]))",
                    "{{key}} {{model}}",
                )
            ],
            unit="reqps",
        ),
        panel(
            "Errors/s by key",
            "Answers other than 2xx per key name and status (401/403 are the "
            "caller's, 429 limits, 5xx the platform's).",
            [
                (
                    "sum by (key, status) (rate(citadel_gateway_requests_total"
                    f'{{{GW_KEY}, status!~"2.."}}[{RI}]))',
                    "{{key}} {{status}}",
                )
            ],
            unit="reqps",
        ),
    ]
    return dashboard(
        "citadel-key-usage", "Citadel / Usage and cost by key", panels,
        [NAMESPACE, MODEL, KEY],
    )  # fmt: skip


DASHBOARDS = {
    "overview.json": overview,
    "model-serving.json": model_serving,
    "key-usage.json": key_usage,
}


def render() -> dict[str, str]:
    """Each dashboard file's name and its JSON text."""
    return {
        name: json.dumps(build(), indent=2, sort_keys=True) + "\n"
        for name, build in DASHBOARDS.items()
    }


def main(argv: list[str]) -> int:
    """Writes the dashboards into OUTPUT_DIR (default: the chart's)."""
    out = Path(argv[0]) if argv else OUT
    out.mkdir(parents=True, exist_ok=True)
    for name, text in render().items():
        (out / name).write_text(text)
        print(f"wrote {out / name}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
