"""Operator scale: many LLMModels on many fake GPU nodes (kwok) of the local
cluster (`make cluster-up`), with the operator as a local process.

The bench adds its own fake nodes (`bench-gpu-NNN`) and namespace, and removes
both at the end. Models are created by a few `kubectl apply` processes at once;
apply-to-Deployment latency runs from the moment a watch on LLMModels reports a
model to the moment a watch on Deployments reports its Deployment.
"""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from citadel_bench.procs import REPO, Proc, free_port, start, stop, wait_http

NAMESPACE = "bench-scale"
ROUTES_NAMESPACE = "citadel-bench"
CONTEXT = "citadel-local"
APPLY_STREAMS = 4


def kubectl_path() -> Path:
    base = os.environ.get("CITADEL_CACHE") or str(Path.home() / ".cache" / "citadel")
    return Path(base) / "bin" / "kubectl"


@dataclass
class ScaleRun:
    models: int
    nodes: int
    apply_s: float = 0.0
    """From the first apply until every model was created."""
    all_deployments_s: float | None = None
    all_ready_s: float | None = None
    latencies_s: list[float] = field(default_factory=list)
    curve: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds since the first apply, Deployments seen, models Ready)."""
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    cpu_s: float = 0.0
    problem: str | None = None


class Kubectl:
    def __init__(self, kubeconfig: Path) -> None:
        self.base = [str(kubectl_path()), "--kubeconfig", str(kubeconfig)]

    def __call__(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        done = subprocess.run(
            [*self.base, *args],
            input=stdin,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if check and done.returncode != 0:
            raise RuntimeError(f"kubectl {' '.join(args[:3])}: {done.stderr[-500:]}")
        return done.stdout


def node(i: int, gpus: int) -> dict[str, object]:
    name = f"bench-gpu-{i:03d}"
    capacity = {
        "cpu": "96",
        "memory": "1007Gi",
        "pods": "110",
        "nvidia.com/gpu": str(gpus),
    }
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "labels": {
                "citadel.ai/fake-node": "true",
                "citadel.ai/bench": "true",
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "nvidia.com/gpu.present": "true",
                "nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3",
            },
        },
        "spec": {
            "taints": [
                {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
            ]
        },
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def model(i: int) -> dict[str, object]:
    return {
        "apiVersion": "citadel.ai/v1alpha1",
        "kind": "LLMModel",
        "metadata": {"name": f"m{i:04d}", "namespace": NAMESPACE},
        "spec": {"model": "Qwen/Qwen2.5-0.5B-Instruct"},
    }


def as_list(items: list[dict[str, object]]) -> str:
    return json.dumps({"apiVersion": "v1", "kind": "List", "items": items})


def cluster_kubeconfig(log_dir: Path) -> Path | None:
    """A flattened kubeconfig of the local cluster's context, or None."""
    done = subprocess.run(
        [
            str(kubectl_path()),
            "--context",
            CONTEXT,
            "config",
            "view",
            "--minify",
            "--flatten",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    if done.returncode != 0 or not done.stdout.strip():
        return None
    path = log_dir / "kubeconfig"
    path.write_text(done.stdout)
    return path


def watch(
    kube: Kubectl, kind: str, seen: dict[str, float], stop_flag: threading.Event
) -> subprocess.Popen[str]:
    """Notes when a watch first reports each object of `kind`."""
    proc = subprocess.Popen(
        [
            *kube.base,
            "get",
            kind,
            "-n",
            NAMESPACE,
            "--watch",
            "-o",
            "jsonpath={.metadata.name}{'\\n'}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            name = line.strip()
            if name and name not in seen:
                seen[name] = time.monotonic()
            if stop_flag.is_set():
                break

    threading.Thread(target=read, daemon=True).start()
    return proc


def apply_stream(
    kube: Kubectl, items: list[dict[str, object]], applied: dict[str, float]
) -> None:
    """`kubectl apply` of `items`, noting when each one is reported created."""
    proc = subprocess.Popen(
        [*kube.base, "apply", "-f", "-"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(as_list(items))
    proc.stdin.close()
    for line in proc.stdout:
        # "llmmodel.citadel.ai/m0001 created"
        name = line.split(" ", 1)[0].rpartition("/")[2]
        if name:
            applied[name] = time.monotonic()
    proc.wait(timeout=600)


def run_scale(log_dir: Path, models: int, nodes: int, timeout_s: float) -> ScaleRun:
    """The whole measurement; a problem is recorded in the result, not raised."""
    result = ScaleRun(models, nodes)
    kubeconfig = cluster_kubeconfig(log_dir)
    if kubeconfig is None:
        result.problem = f"no kubectl context {CONTEXT} (run `make cluster-up`)"
        return result
    kube = Kubectl(kubeconfig)
    operator: Proc | None = None
    watchers: list[subprocess.Popen[str]] = []
    stop_flag = threading.Event()
    try:
        # A namespace left terminating by an earlier run must be gone first.
        kube("delete", "namespace", NAMESPACE, "--ignore-not-found", "--timeout=300s")
        gpus = -(-models // nodes) + 2
        kube("apply", "-f", "-", stdin=as_list([node(i, gpus) for i in range(nodes)]))
        kube("apply", "--server-side", "--force-conflicts", "-f", str(REPO / "crds"))
        for ns in (NAMESPACE, ROUTES_NAMESPACE):
            kube("create", "namespace", ns, check=False)
        kube(
            "wait",
            "--for=condition=Ready",
            "--timeout=120s",
            "node",
            "-l",
            "citadel.ai/bench=true",
        )
        health = free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(kubeconfig),
            "PYTHONSAFEPATH": "1",
            "CITADEL_OPERATOR_WATCH_NAMESPACES": NAMESPACE,
            "CITADEL_OPERATOR_GATEWAY_NAMESPACE": ROUTES_NAMESPACE,
            "CITADEL_OPERATOR_LOG_FORMAT": "text",
            "CITADEL_OPERATOR_PEERING": "standalone",
            "CITADEL_OPERATOR_HEALTH_PORT": str(health),
            "CITADEL_OPERATOR_METRICS_PORT": str(free_port()),
        }
        binary = Path(sys.executable).with_name("citadel-operator")
        operator = start("operator", [str(binary)], log_dir, env=env)
        wait_http(operator, f"http://127.0.0.1:{health}/healthz")
        cpu0 = operator.cpu_seconds()
        seen: dict[str, float] = {}
        created: dict[str, float] = {}
        watchers.append(watch(kube, "llmmodels", created, stop_flag))
        watchers.append(watch(kube, "deployments", seen, stop_flag))
        time.sleep(1.0)
        applied: dict[str, float] = {}
        began = time.monotonic()
        streams = [
            [model(i) for i in range(k, models, APPLY_STREAMS)]
            for k in range(APPLY_STREAMS)
        ]
        threads = [
            threading.Thread(target=apply_stream, args=(kube, items, applied))
            for items in streams
        ]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=timeout_s)
        result.apply_s = time.monotonic() - began
        deadline = began + timeout_s
        while time.monotonic() < deadline:
            out = kube(
                "get",
                "llmmodels",
                "-n",
                NAMESPACE,
                "-o",
                "jsonpath={range .items[*]}{.status.phase}{'\\n'}{end}",
            )
            ready = sum(1 for line in out.split() if line == "Ready")
            now = time.monotonic() - began
            result.curve.append((now, len(seen), ready))
            result.rss_peak_mb = max(result.rss_peak_mb, operator.rss_bytes() / 2**20)
            print(f"scale t={now:6.1f}s deployments={len(seen)} ready={ready}")
            if len(seen) >= models and result.all_deployments_s is None:
                result.all_deployments_s = max(seen.values()) - began
            if ready >= models:
                result.all_ready_s = now
                break
            time.sleep(2.0)
        # Both watches see events with the same delay, so their difference is the
        # operator's reaction time; kubectl's own timing is not involved.
        result.latencies_s = [seen[n] - created[n] for n in created if n in seen]
        result.rss_end_mb = operator.rss_bytes() / 2**20
        result.cpu_s = operator.cpu_seconds() - cpu0
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        result.problem = str(err)[-500:]
    finally:
        stop_flag.set()
        for watcher in watchers:
            watcher.terminate()
            with contextlib.suppress(subprocess.TimeoutExpired):
                watcher.wait(timeout=10)
        if operator is not None:
            stop(operator)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            kube("delete", "namespace", NAMESPACE, "--timeout=300s", check=False)
            kube("delete", "node", "-l", "citadel.ai/bench=true", "--wait=false")
    return result
