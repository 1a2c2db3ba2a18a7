"""Every PromQL expression of the chart's alerts and dashboards runs without error on
a real Prometheus (Debian's package) that scraped a real gateway process in front of
real vLLM (the CPU build serving SmolLM2, `make vllm`) and the operator's real
metrics registry; the core panels, vLLM's own included, return data.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import start_http_server

from citadel.operator.metrics import Metrics
from citadel.operator.status import LLMModelStatus, Phase, ReplicaCounts

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support" / "vllm"))
import vllm_server  # type: ignore[import-not-found]
from harness import prometheus
from harness.procs import stop_child

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[3]
BIN = Path(sys.executable).parent
NAMESPACE = "citadel-system"
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__range": "5m",
    "$namespace": ".*",
    "$model": ".*",
    "$key": ".*",
}
# Panels that must show data after a few requests through the gateway.
CORE = [
    "Requests/s by model",
    "Requests/s by status",
    "Tokens/s",
    "Time to first token (p99)",
    "Requests/s by key",
    "Tokens in the time range",
    "Queue depth",
    "KV cache use",
    "Models by phase",
    "Models not Ready",
    "Replicas",
    # vLLM's own metrics, scraped from the real server.
    "Time to first token",
    "Generated tokens/s",
    "Prompt tokens/s",
]


def http(url: str, body: dict[str, Any] | None = None, key: str = "") -> Any:
    data = json.dumps(body).encode() if body is not None else None
    request = urllib.request.Request(url, data=data)
    request.add_header("Content-Type", "application/json")
    if key:
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.read()
    except urllib.error.HTTPError as err:
        return err.read()


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{proc.args} exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    pytest.fail(f"{url} did not answer:\n{log.read_text()[-2000:]}")


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[subprocess.Popen[bytes]]]:
    started: list[subprocess.Popen[bytes]] = []
    yield started
    for proc in started:
        stop_child(proc)


def start(
    started: list[subprocess.Popen[bytes]], args: list[str], log: Path, **env: str
) -> subprocess.Popen[bytes]:
    with log.open("wb") as out:
        proc = subprocess.Popen(
            args,
            stdout=out,
            stderr=subprocess.STDOUT,
            env={**os.environ, "PYTHONSAFEPATH": "1", **env},
            cwd=log.parent,
        )
    started.append(proc)
    return proc


def expressions() -> list[tuple[str, str]]:
    """(name, PromQL) of every alert and dashboard panel query."""
    spec = prometheus.chart_rules(NAMESPACE)
    result = [(r["alert"], r["expr"]) for g in spec["groups"] for r in g["rules"]]
    for path in sorted((ROOT / "charts/citadel/dashboards").glob("*.json")):
        for panel in json.loads(path.read_text())["panels"]:
            for target in panel["targets"]:
                expr = target["expr"]
                for var, value in GRAFANA_VARIABLES.items():
                    expr = expr.replace(var, value)
                result.append((f"{path.stem}: {panel['title']}", expr))
    return result


def test_every_expression_runs_on_prometheus(
    tmp_path: Path, processes: list[subprocess.Popen[bytes]]
) -> None:
    with contextlib.ExitStack() as stack:
        check_every_expression(tmp_path, processes, stack)


def check_every_expression(
    tmp_path: Path,
    processes: list[subprocess.Popen[bytes]],
    stack: contextlib.ExitStack,
) -> None:
    if prometheus.binary() is None:
        pytest.skip(
            "no prometheus: install Debian's `prometheus` package (.ci/run does)"
        )
    reason = vllm_server.missing_reason()
    if reason:
        pytest.skip(f"the CPU vLLM is not installed (`make vllm`): {reason}")
    # Real vLLM, the real gateway in front of it, with a key from the real CLI.
    backend_port = prometheus.free_port()
    backend = stack.enter_context(
        vllm_server.run_vllm(
            vllm_server.model_path("smollm2-135m-instruct"),
            port=backend_port,
            served_names=["m"],
            log_path=tmp_path / "vllm.log",
        )
    )
    backend_url = backend.base_url
    keys = tmp_path / "keys.json"
    key = (
        subprocess.run(
            [str(BIN / "citadel"), "keys", "--file", str(keys), "create", "team-a"],
            capture_output=True,
            text=True,
            check=True,
            env={**os.environ, "PYTHONSAFEPATH": "1"},
        )
        .stdout.strip()
        .splitlines()[-1]
    )
    routes = tmp_path / "routes.json"
    model = {
        "name": "m",
        "namespace": "llm",
        "servedName": "m",
        "service": "m",
        "endpoints": [backend_url],
        "ready": True,
        "pricing": {"promptPerMillion": 1.0, "completionPerMillion": 2.0},
    }
    routes.write_text(json.dumps({"schemaVersion": 1, "models": [model]}))
    gateway_port = prometheus.free_port()
    gateway_log = tmp_path / "gateway.log"
    gateway = start(
        processes,
        [str(BIN / "citadel-gateway")],
        gateway_log,
        CITADEL_GATEWAY_HOST="127.0.0.1",
        CITADEL_GATEWAY_PORT=str(gateway_port),
        CITADEL_GATEWAY_ROUTES_SOURCE="file",
        CITADEL_GATEWAY_ROUTES_FILE=str(routes),
        CITADEL_GATEWAY_KEYS_FILE=str(keys),
    )
    gateway_url = f"http://127.0.0.1:{gateway_port}"
    wait_http(gateway_url + "/readyz", gateway, gateway_log)

    # The operator's real metrics registry, with models in two phases.
    operator = Metrics()
    operator.set_model(
        "llm",
        "m",
        LLMModelStatus(
            phase=Phase.READY,
            replicas=ReplicaCounts(desired=2, current=2, updated=2, ready=1),
            served_name="m",
        ),
    )
    operator.set_model(
        "llm", "other", LLMModelStatus(phase=Phase.PENDING, replicas=ReplicaCounts())
    )
    operator_port = prometheus.free_port()
    start_http_server(operator_port, addr="127.0.0.1", registry=operator.registry)

    scrape_configs = [
        {
            "job_name": "citadel-gateway",
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{gateway_port}"],
                    "labels": {"namespace": NAMESPACE, "pod": "gateway-1"},
                }
            ],
        },
        {
            "job_name": "citadel-operator-metrics",
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{operator_port}"],
                    "labels": {"namespace": NAMESPACE, "pod": "operator-1"},
                }
            ],
        },
        {
            "job_name": "llm/m",
            "static_configs": [
                {
                    "targets": [f"127.0.0.1:{backend_port}"],
                    # What the operator's PodMonitor gives a model pod's series.
                    "labels": {
                        "namespace": "llm",
                        "pod": "m-1",
                        "container": "vllm",
                        "citadel_ai_model": "m",
                    },
                }
            ],
        },
    ]
    prom_url = stack.enter_context(prometheus.running(tmp_path, scrape_configs))

    # Traffic over several scrapes: plain and streamed chats, a refused key.
    for _ in range(8):
        chat = {
            "model": "m",
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 8,
        }
        http(gateway_url + "/v1/chat/completions", chat, key)
        http(gateway_url + "/v1/chat/completions", {**chat, "stream": True}, key)
        http(gateway_url + "/v1/chat/completions", chat, "ctd-wrong")
        time.sleep(1)
    time.sleep(2)

    failures, empty = [], []
    for name, expr in expressions():
        query = urllib.parse.urlencode({"query": expr})
        answer = json.loads(http(f"{prom_url}/api/v1/query?{query}"))
        if answer.get("status") != "success":
            failures.append(f"{name}: {answer.get('error')}\n  {expr}")
        elif not answer["data"]["result"]:
            empty.append(name)
    assert not failures, "\n".join(failures)
    core_empty = [n for n in empty if n.split(": ", 1)[-1] in CORE]
    assert not core_empty, f"core panels without data: {core_empty}"
    print(f"\nexpressions without data here: {empty}")
