"""A real Prometheus (Debian's `prometheus` package, which .ci/run installs) for the
tests: the chart's alert rules rendered by Helm, static scrape targets, and its HTTP
API."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import yaml

from .config import HARNESS_DIR, Layout
from .procs import stop_child

CHART = HARNESS_DIR.parents[2] / "charts" / "citadel"
RULES_TEMPLATE = "templates/monitoring/prometheusrule.yaml"


def binary() -> str | None:
    """The prometheus executable, or None when it is not installed."""
    return shutil.which("prometheus")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def chart_rules(namespace: str, values: Mapping[str, str] | None = None) -> Any:
    """The `spec` of the chart's PrometheusRule for release `citadel` in
    `namespace`, rendered by Helm with `values` given as `--set` pairs."""
    sets = [f"--set={key}={value}" for key, value in (values or {}).items()]
    out = subprocess.run(
        [
            str(Layout.from_env().bin / "helm"),
            "template",
            "citadel",
            str(CHART),
            "-n",
            namespace,
            "--api-versions",
            "monitoring.coreos.com/v1",
            "--show-only",
            RULES_TEMPLATE,
            *sets,
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "KUBECONFIG": "/dev/null"},
    ).stdout
    return yaml.safe_load(out)["spec"]


@contextlib.contextmanager
def running(
    workdir: Path,
    scrape_configs: list[dict[str, Any]],
    rule_groups: list[dict[str, Any]] | None = None,
) -> Iterator[str]:
    """Runs Prometheus (scrapes and rule evaluation every second) until the block
    ends; yields its base URL. Its log is `workdir/prometheus.log`."""
    executable = binary()
    if executable is None:
        raise FileNotFoundError("prometheus is not installed")
    config: dict[str, Any] = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "scrape_configs": scrape_configs,
    }
    if rule_groups is not None:
        (workdir / "rules.yml").write_text(yaml.safe_dump({"groups": rule_groups}))
        config["rule_files"] = [str(workdir / "rules.yml")]
    (workdir / "prometheus.yml").write_text(yaml.safe_dump(config))
    port = free_port()
    log = workdir / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                executable,
                f"--config.file={workdir / 'prometheus.yml'}",
                f"--storage.tsdb.path={workdir / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    url = f"http://127.0.0.1:{port}"
    try:
        _wait_ready(url, proc, log)
        yield url
    finally:
        stop_child(proc)


def _wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"prometheus exited:\n{log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(url + "/-/ready", timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise TimeoutError(f"prometheus did not get ready:\n{log.read_text()[-2000:]}")


def api(url: str, path: str, **params: str) -> Any:
    """The `data` of a Prometheus API answer (raises on an error status)."""
    query = f"?{urllib.parse.urlencode(params)}" if params else ""
    with urllib.request.urlopen(f"{url}/api/v1/{path}{query}", timeout=30) as reply:
        answer = json.loads(reply.read())
    if answer.get("status") != "success":
        raise RuntimeError(f"{path}: {answer.get('error')}")
    return answer["data"]
