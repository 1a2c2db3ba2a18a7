"""Fixtures for the operator's e2e tests: the CRDs installed and the operator
running as a local process against the cluster under test."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from harness.kube import KubeCluster
from harness.wait import wait_for

ROOT = Path(__file__).resolve().parents[3]
OPERATOR = Path(sys.executable).parent / "citadel-operator"
# Where this session's operator writes the routing ConfigMap: its own, so other
# tests that run a gateway keep theirs.
ROUTES_NAMESPACE = "citadel-operator-e2e"
# The operator handles only the namespaces of these tests (see the namespace
# fixture in tests/e2e/conftest.py), never anyone else's models.
WATCHED = "e2e-*"


def llmmodel(name: str, **spec: Any) -> str:
    """An LLMModel manifest (YAML) serving a small model unless `spec` says else;
    a field given as None is left out."""
    merged = {"model": "Qwen/Qwen2.5-0.5B-Instruct", **spec}
    return yaml.safe_dump(
        {
            "apiVersion": "citadel.ai/v1alpha1",
            "kind": "LLMModel",
            "metadata": {"name": name},
            "spec": {k: v for k, v in merged.items() if v is not None},
        }
    )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class OperatorProcess:
    """`citadel-operator` as a child process; restartable."""

    kubeconfig: Path
    log_path: Path
    proc: subprocess.Popen[bytes] | None = None
    health_port: int = field(default_factory=_free_port)
    metrics_port: int = field(default_factory=_free_port)
    env: dict[str, str] = field(default_factory=dict)
    """Settings over the defaults below."""

    def start(self) -> None:
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            # Tests read the log while the operator runs: no buffering.
            "PYTHONUNBUFFERED": "1",
            "CITADEL_OPERATOR_WATCH_NAMESPACES": WATCHED,
            "CITADEL_OPERATOR_GATEWAY_NAMESPACE": ROUTES_NAMESPACE,
            "CITADEL_OPERATOR_LOG_FORMAT": "text",
            "CITADEL_OPERATOR_PEERING": "standalone",
            "CITADEL_OPERATOR_RESYNC_SECONDS": "30",
            "CITADEL_OPERATOR_HEALTH_PORT": str(self.health_port),
            "CITADEL_OPERATOR_METRICS_PORT": str(self.metrics_port),
            **self.env,
        }
        log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(OPERATOR)], env=env, stdout=log, stderr=subprocess.STDOUT
        )
        log.close()
        self.wait_healthy()

    def wait_healthy(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.health_port}/healthz"
        while time.monotonic() < deadline:
            assert self.proc is not None and self.proc.poll() is None, self.tail()
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise AssertionError(f"the operator did not turn healthy:\n{self.tail()}")

    def stop(self, *, kill: bool = False) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        if kill:
            self.proc.kill()
        else:
            self.proc.terminate()
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()

    def metrics(self) -> str:
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def tail(self, lines: int = 40) -> str:
        text = (
            self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        )
        return "\n".join(text.splitlines()[-lines:])


@pytest.fixture(scope="session")
def crds(cluster: KubeCluster) -> None:
    """The LLMModel and Kopf peering CRDs, installed and established."""
    cluster.kubectl(
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=citadel-e2e",
        "-f",
        str(ROOT / "crds"),
    )
    cluster.kubectl(
        "wait",
        "--for=condition=Established",
        "--timeout=60s",
        "crd/llmmodels.citadel.ai",
    )


@pytest.fixture(scope="session")
def operator(
    cluster: KubeCluster, crds: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[OperatorProcess]:
    """The operator, running against the cluster for the whole session."""
    workdir = tmp_path_factory.mktemp("operator")
    kubeconfig = workdir / "kubeconfig"
    # A self-contained copy with the chosen context current: the operator's login
    # reads the current context only.
    kubeconfig.write_text(cluster.kubectl("config", "view", "--minify", "--flatten"))
    cluster.kubectl("create", "namespace", ROUTES_NAMESPACE, check=False)
    process = OperatorProcess(kubeconfig=kubeconfig, log_path=workdir / "operator.log")
    process.start()
    yield process
    process.stop()
    print(f"\n--- operator log (last lines) ---\n{process.tail(25)}")


@dataclass(frozen=True)
class Kube:
    """JSON reads and waits over kubectl for one namespace."""

    cluster: KubeCluster
    namespace: str

    def apply(self, text: str) -> None:
        self.cluster.kubectl("apply", "-n", self.namespace, "-f", "-", input_text=text)

    def get(self, kind: str, name: str, namespace: str | None = None) -> Any:
        out = self.cluster.kubectl(
            "get",
            kind,
            name,
            "-n",
            namespace or self.namespace,
            "-o",
            "json",
            "--ignore-not-found",
        )
        return json.loads(out) if out.strip() else None

    def items(self, kind: str, selector: str = "") -> list[Any]:
        args = ["get", kind, "-n", self.namespace, "-o", "json"]
        if selector:
            args += ["-l", selector]
        return list(json.loads(self.cluster.kubectl(*args))["items"])

    def wait(
        self,
        what: str,
        check: Callable[[], Any],
        timeout: float = 60,
        interval: float = 0.5,
    ) -> Any:
        """Polls `check` until it returns something truthy."""
        return wait_for(what, check, timeout, interval)

    def condition(self, model: str, kind: str) -> dict[str, Any]:
        body = self.get("llmmodel", model) or {}
        for cond in body.get("status", {}).get("conditions", []):
            if cond["type"] == kind:
                return dict(cond)
        return {}

    def phase(self, model: str) -> str | None:
        body = self.get("llmmodel", model) or {}
        return body.get("status", {}).get("phase")

    def wait_phase(self, model: str, phase: str, timeout: float = 60) -> None:
        self.wait(f"{model} to be {phase}", lambda: self.phase(model) == phase, timeout)

    def routes(self) -> list[dict[str, Any]]:
        cm = self.get("configmap", "citadel-routes", ROUTES_NAMESPACE)
        if cm is None:
            return []
        doc = json.loads(cm["data"]["routes.json"])
        return [m for m in doc["models"] if m["namespace"] == self.namespace]

    def delete_model(self, name: str, timeout: float = 60) -> None:
        """Deletes a model and waits until its pods are gone (frees the GPUs)."""
        self.cluster.kubectl(
            "delete", "llmmodel", name, "-n", self.namespace, "--wait=true"
        )
        self.wait(
            f"pods of {name} to go",
            lambda: not self.items("pods", f"citadel.ai/model={name}"),
            timeout,
        )


@pytest.fixture
def kube(cluster: KubeCluster, namespace: str, operator: OperatorProcess) -> Kube:
    """kubectl helpers for this test's namespace, with the operator running."""
    return Kube(cluster, namespace)


@pytest.fixture
def cache_volume(cluster: KubeCluster, namespace: str) -> Iterator[Callable[..., str]]:
    """Makes a PersistentVolume pre-bound to a claim (the cluster has no
    provisioner); every one made is deleted after the test."""
    made: list[str] = []

    def make(claim: str, size: str = "2Ti", storage_class: str = "") -> str:
        name = f"pv-{namespace}-{claim}"[:63].rstrip("-")
        cluster.kubectl(
            "apply",
            "-f",
            "-",
            input_text=json.dumps(
                {
                    "apiVersion": "v1",
                    "kind": "PersistentVolume",
                    "metadata": {"name": name, "labels": {"citadel.ai/e2e": "true"}},
                    "spec": {
                        "capacity": {"storage": size},
                        "accessModes": ["ReadWriteOnce", "ReadWriteMany"],
                        "persistentVolumeReclaimPolicy": "Retain",
                        "storageClassName": storage_class,
                        "hostPath": {"path": f"/tmp/{name}"},
                        "claimRef": {"namespace": namespace, "name": claim},
                    },
                }
            ),
        )
        made.append(name)
        return name

    yield make
    for name in made:
        cluster.kubectl("delete", "pv", name, "--wait=false", check=False)
