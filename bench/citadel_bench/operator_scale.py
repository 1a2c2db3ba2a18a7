"""Operator scale: many LLMModels on many fake GPU nodes (kwok) of the local
cluster (`make cluster-up`), with the operator as a local process.

The bench adds its own fake nodes (`bench-gpu-NNN`) and namespace, and removes
both at the end. Models are created by a few `kubectl create` processes at once;
apply-to-Deployment latency runs from the moment a watch on LLMModels reports a
model to the moment a watch on Deployments reports its Deployment, and the same
LLMModel watch reports when each model turns Ready (no polling, which would load
the API server it measures). Once all are Ready, a few more models are created one
at a time: the latency a single new model sees on a cluster holding the thousand.

For scale, the same cluster then runs the floor: the very Deployments and Services
the operator builds for those models, created straight with `kubectl create` and
no operator, timed until every Deployment is Available. CPU time is read per
control-plane process from /proc during both runs.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from citadel_bench.goprofile import ApiServerProfile, ApiServerProfiler
from citadel_bench.procs import REPO, TICKS, Proc, free_port, start, stop, wait_http
from citadel_bench.pyspy import start_sampling, stop_sampling, top_functions

NAMESPACE = "bench-scale"
ROUTES_NAMESPACE = "citadel-bench"
CONTEXT = "citadel-local"
APPLY_STREAMS = 4
PROFILE = "operator-profile.txt"
STEADY_MODELS = 20
MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
STEADY_GAP_S = 0.5
# The operator's resync period, set explicitly (its default): the span at rest
# covers one, in which every model's periodic pass runs once.
RESYNC_S = 120.0
CONTROL_PLANE = (
    "kube-apiserver",
    "etcd",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
)


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
    steady_latencies_s: list[float] = field(default_factory=list)
    """Apply-to-Deployment of models created one at a time after the burst."""
    ready_latencies_s: list[float] = field(default_factory=list)
    """Apply-to-Ready of the models of the burst."""
    cpu_by_process: dict[str, float] = field(default_factory=dict)
    """CPU seconds of each control-plane process from the first apply to all Ready."""
    wall_s: float = 0.0
    """The span `cpu_by_process` covers."""
    floor_ready_s: float | None = None
    """The same Deployments and Services without the operator: all Available."""
    floor_cpu_by_process: dict[str, float] = field(default_factory=dict)
    floor_problem: str | None = None
    curve: list[tuple[float, int, int]] = field(default_factory=list)
    """(seconds since the first apply, Deployments seen, models Ready)."""
    rss_peak_mb: float = 0.0
    rss_end_mb: float = 0.0
    cpu_s: float = 0.0
    """Operator CPU seconds over the burst and the one-at-a-time models."""
    requests: dict[str, float] = field(default_factory=dict)
    """API requests during the run with the operator, by "VERB resource"."""
    floor_requests: dict[str, float] = field(default_factory=dict)
    """The same during the floor."""
    profile: list[str] = field(default_factory=list)
    """py-spy's hottest frames of the operator during the burst."""
    apiserver: ApiServerProfile = field(default_factory=ApiServerProfile)
    """The API server's CPU by category, first apply to all Ready."""
    floor_apiserver: ApiServerProfile = field(default_factory=ApiServerProfile)
    """The same during the floor."""
    rest_requests: dict[str, float] = field(default_factory=dict)
    """API requests by "VERB resource" over one resync period at rest (every
    model Ready, nothing changing)."""
    rest_cpu_by_process: dict[str, float] = field(default_factory=dict)
    """CPU seconds of each process, the operator's too, over that span."""
    rest_s: float = 0.0
    """The span at rest, 0 when not measured."""
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


def control_plane_cpu() -> dict[str, float]:
    """CPU seconds so far of each control-plane process, by command name."""
    found: dict[str, float] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, IndexError, ValueError):
            text = stat.read_text()
            comm = text[text.index("(") + 1 : text.rindex(")")]
            # The kernel keeps 15 characters of a command's name.
            name = next((n for n in CONTROL_PLANE if n[:15] == comm), None)
            if name is not None:
                fields = text.rsplit(")", 1)[1].split()
                used = (int(fields[11]) + int(fields[12])) / TICKS
                found[name] = found.get(name, 0.0) + used
    return found


def api_requests(kube: Kubectl) -> dict[str, float]:
    """The API server's request counter so far, summed by "VERB resource[/sub]"
    (every client together: the server does not count by client)."""
    found: dict[str, float] = {}
    pattern = re.compile(r'(\w+)="([^"]*)"')
    for line in kube("get", "--raw", "/metrics").splitlines():
        if not line.startswith("apiserver_request_total{"):
            continue
        labels = dict(pattern.findall(line))
        sub = labels.get("subresource", "")
        key = f"{labels.get('verb')} {labels.get('resource')}" + (
            f"/{sub}" if sub else ""
        )
        found[key] = found.get(key, 0.0) + float(line.rsplit(" ", 1)[1])
    return found


def requests_since(kube: Kubectl, before: dict[str, float]) -> dict[str, float]:
    now = api_requests(kube)
    grown = {k: v - before.get(k, 0.0) for k, v in now.items()}
    return {k: v for k, v in grown.items() if v > 0}


def start_profile(py_spy: Path | None, pid: int, log_dir: Path) -> Proc | None:
    """py-spy sampling the operator (`pid`) until `stop_profile`."""
    return start_sampling(py_spy, pid, log_dir / PROFILE, log_dir)


def stop_profile(spy: Proc | None, log_dir: Path) -> list[str]:
    """Stops py-spy; the hottest frames."""
    return top_functions(stop_sampling(spy, log_dir / PROFILE))


class Window:
    """What the cluster did over one span of a run: control-plane CPU, API
    requests and the API server's profile, read at `start` and at `stop`.

    Args:
        kube: kubectl on the cluster.
        log_dir: where the API server's profiles go.
        name: a prefix for their file names.
        profiled: False for no profile (its requests would be in the counts).
    """

    def __init__(
        self, kube: Kubectl, log_dir: Path, name: str, *, profiled: bool = True
    ) -> None:
        self._kube = kube
        self._requests = api_requests(kube)
        self._profiler = (
            ApiServerProfiler(kube.base, log_dir, name).start() if profiled else None
        )
        self._cpu = control_plane_cpu()
        self.began = time.monotonic()

    def stop(self) -> tuple[dict[str, float], dict[str, float], ApiServerProfile]:
        """CPU seconds by process, requests by "VERB resource" and the API
        server's CPU by category (empty when not profiled), since the start."""
        cpu = cpu_since(self._cpu)
        requests = requests_since(self._kube, self._requests)
        profile = self._profiler.stop() if self._profiler else ApiServerProfile()
        return cpu, requests, profile

    def halt(self) -> None:
        """Ends the profiling on a path that reads nothing (a failure)."""
        if self._profiler is not None:
            self._profiler.halt()


def cpu_since(before: dict[str, float]) -> dict[str, float]:
    now = control_plane_cpu()
    return {name: now[name] - before.get(name, 0.0) for name in now}


def model_name(i: int) -> str:
    return f"m{i:04d}"


def model(i: int) -> dict[str, object]:
    return {
        "apiVersion": "citadel.ai/v1alpha1",
        "kind": "LLMModel",
        "metadata": {"name": model_name(i), "namespace": NAMESPACE},
        "spec": {"model": MODEL},
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
    kube: Kubectl,
    kind: str,
    field: str,
    seen: dict[str, float],
    stop_flag: threading.Event,
    done: dict[str, float] | None = None,
    is_done: Callable[[str], bool] = bool,
) -> subprocess.Popen[str]:
    """Notes when a watch on `kind` first reports each object, and, with `done`,
    when it first reports `field` (a jsonpath) with a value `is_done` accepts."""
    proc = subprocess.Popen(
        [
            *kube.base,
            "get",
            kind,
            "-n",
            NAMESPACE,
            "--watch",
            "-o",
            f"jsonpath={{.metadata.name}} {field}{{'\\n'}}",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            name, _, value = line.strip().partition(" ")
            now = time.monotonic()
            if name and name not in seen:
                seen[name] = now
            if done is not None and name not in done and is_done(value):
                done[name] = now
            if stop_flag.is_set():
                break

    threading.Thread(target=read, daemon=True).start()
    return proc


def stop_watches(watchers: list[subprocess.Popen[str]]) -> None:
    for watcher in watchers:
        watcher.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            watcher.wait(timeout=10)


def create_in_streams(
    kube: Kubectl,
    objects: Callable[[int], list[dict[str, object]]],
    count: int,
    timeout_s: float,
) -> None:
    """`objects(i)` for i below `count`, created by `APPLY_STREAMS` kubectl
    processes at once."""
    streams = [
        [o for i in range(k, count, APPLY_STREAMS) for o in objects(i)]
        for k in range(APPLY_STREAMS)
    ]
    threads = [
        threading.Thread(target=create_stream, args=(kube, items)) for items in streams
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=timeout_s)


def create_stream(kube: Kubectl, items: list[dict[str, object]]) -> None:
    """`kubectl create` of `items` (the watches note when each appears)."""
    kube("create", "-f", "-", stdin=as_list(items))


def one_at_a_time(
    kube: Kubectl, first: int, created: dict[str, float], seen: dict[str, float]
) -> list[float]:
    """Creates `STEADY_MODELS` more models, each after the last has its Deployment
    (or 10 s), and returns their apply-to-Deployment latencies."""
    latencies = []
    for i in range(first, first + STEADY_MODELS):
        name = model_name(i)
        kube("create", "-f", "-", stdin=json.dumps(model(i)))
        limit = time.monotonic() + 10.0
        while time.monotonic() < limit and not (name in created and name in seen):
            time.sleep(0.02)
        if name in created and name in seen:
            latencies.append(seen[name] - created[name])
        time.sleep(STEADY_GAP_S)
    return latencies


def run_scale(
    log_dir: Path,
    models: int,
    nodes: int,
    timeout_s: float,
    py_spy: Path | None = None,
) -> ScaleRun:
    """The whole measurement; a problem is recorded in the result, not raised.

    Args:
        py_spy: when given, the operator is profiled during the burst.
    """
    result = ScaleRun(models, nodes)
    kubeconfig = cluster_kubeconfig(log_dir)
    if kubeconfig is None:
        result.problem = f"no kubectl context {CONTEXT} (run `make cluster-up`)"
        return result
    kube = Kubectl(kubeconfig)
    operator: Proc | None = None
    watchers: list[subprocess.Popen[str]] = []
    spy: Proc | None = None
    window: Window | None = None
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
            "CITADEL_OPERATOR_RESYNC_SECONDS": str(RESYNC_S),
        }
        binary = Path(sys.executable).with_name("citadel-operator")
        operator = start("operator", [str(binary)], log_dir, env=env)
        wait_http(operator, f"http://127.0.0.1:{health}/healthz")
        cpu0 = operator.cpu_seconds()
        seen: dict[str, float] = {}
        created: dict[str, float] = {}
        ready_at: dict[str, float] = {}
        watchers.append(
            watch(
                kube,
                "llmmodels",
                "{.status.phase}",
                created,
                stop_flag,
                ready_at,
                lambda phase: phase == "Ready",
            )
        )
        watchers.append(watch(kube, "deployments", "", seen, stop_flag))
        time.sleep(1.0)
        spy = start_profile(py_spy, operator.pid, log_dir)
        window = Window(kube, log_dir, "apiserver")
        began = time.monotonic()
        create_in_streams(kube, lambda i: [model(i)], models, timeout_s)
        result.apply_s = time.monotonic() - began
        deadline = began + timeout_s
        while time.monotonic() < deadline:
            ready = len(ready_at)
            now = time.monotonic() - began
            result.curve.append((now, len(seen), ready))
            result.rss_peak_mb = max(result.rss_peak_mb, operator.rss_bytes() / 2**20)
            print(f"scale t={now:6.1f}s deployments={len(seen)} ready={ready}")
            if len(seen) >= models and result.all_deployments_s is None:
                result.all_deployments_s = max(seen.values()) - began
            if ready >= models:
                result.all_ready_s = max(ready_at.values()) - began
                break
            time.sleep(1.0)
        result.wall_s = time.monotonic() - began
        result.cpu_by_process, result.requests, result.apiserver = window.stop()
        result.cpu_by_process["citadel-operator"] = operator.cpu_seconds() - cpu0
        result.profile = stop_profile(spy, log_dir)
        spy = None
        # Both watches see events with the same delay, so their difference is the
        # operator's reaction time; kubectl's own timing is not involved.
        result.latencies_s = [seen[n] - created[n] for n in created if n in seen]
        result.ready_latencies_s = [
            ready_at[n] - created[n] for n in created if n in ready_at
        ]
        if result.all_ready_s is not None:
            result.steady_latencies_s = one_at_a_time(kube, models, created, seen)
        result.rss_end_mb = operator.rss_bytes() / 2**20
        result.cpu_s = operator.cpu_seconds() - cpu0
        if result.all_ready_s is not None:
            at_rest(kube, operator, result, log_dir)
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        result.problem = str(err)[-500:]
    finally:
        stop_flag.set()
        stop_watches(watchers)
        stop_profile(spy, log_dir)
        if window is not None:
            window.halt()
        if operator is not None:
            stop(operator)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            kube("delete", "namespace", NAMESPACE, "--timeout=300s", check=False)
    if result.problem is None:
        run_floor(kube, result, timeout_s, log_dir)
    with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
        kube("delete", "node", "-l", "citadel.ai/bench=true", "--wait=false")
    return result


def at_rest(kube: Kubectl, operator: Proc, result: ScaleRun, log_dir: Path) -> None:
    """API requests and CPU over one resync period with every model Ready: what
    the operator costs the cluster while nothing changes."""
    operator0 = operator.cpu_seconds()
    window = Window(kube, log_dir, "rest", profiled=False)
    time.sleep(RESYNC_S)
    result.rest_cpu_by_process, result.rest_requests, _ = window.stop()
    result.rest_cpu_by_process["citadel-operator"] = operator.cpu_seconds() - operator0
    result.rest_s = time.monotonic() - window.began


def floor_objects(i: int) -> list[dict[str, object]]:
    """The Deployment and Service the operator builds for model `i`, unowned (an
    owner that does not exist would have them garbage-collected)."""
    # Imported here: the benchmark's other parts need no operator code.
    from citadel.operator.builders.deployment import build_deployment
    from citadel.operator.builders.objects import build_service
    from citadel.operator.model import LLMModel
    from citadel.operator.settings import OperatorSettings

    body = {
        "metadata": {"name": model_name(i), "namespace": NAMESPACE, "uid": "floor"},
        "spec": {"model": MODEL},
    }
    parsed = LLMModel.from_body(body)
    objects = [build_deployment(parsed, OperatorSettings()), build_service(parsed)]
    for obj in objects:
        obj["metadata"].pop("ownerReferences", None)
    return objects


def run_floor(kube: Kubectl, result: ScaleRun, timeout_s: float, log_dir: Path) -> None:
    """Times the same Deployments and Services without the operator."""
    available: dict[str, float] = {}
    stop_flag = threading.Event()
    watchers: list[subprocess.Popen[str]] = []
    window: Window | None = None
    try:
        kube("create", "namespace", NAMESPACE)
        watchers.append(
            watch(
                kube,
                "deployments",
                "{.status.availableReplicas}",
                {},
                stop_flag,
                available,
                lambda count: count not in ("", "0"),
            )
        )
        time.sleep(1.0)
        window = Window(kube, log_dir, "floor-apiserver")
        began = time.monotonic()
        create_in_streams(kube, floor_objects, result.models, timeout_s)
        deadline = began + timeout_s
        while time.monotonic() < deadline and len(available) < result.models:
            time.sleep(1.0)
        if len(available) >= result.models:
            result.floor_ready_s = max(available.values()) - began
        (
            result.floor_cpu_by_process,
            result.floor_requests,
            result.floor_apiserver,
        ) = window.stop()
    except (RuntimeError, subprocess.TimeoutExpired) as err:
        result.floor_problem = str(err)[-300:]
    finally:
        if window is not None:
            window.halt()
        stop_flag.set()
        stop_watches(watchers)
        with contextlib.suppress(RuntimeError, subprocess.TimeoutExpired):
            kube("delete", "namespace", NAMESPACE, "--timeout=300s", check=False)
