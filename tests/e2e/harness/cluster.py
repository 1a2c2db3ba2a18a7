"""Bringing the local cluster up and down.

`up()` is idempotent: every component that already runs and answers its health
check is left alone, and only what is missing is built or started.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import os
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import pki, procs
from .config import CLUSTER_DIR, CONTEXT_NAME, HARNESS_DIR, Layout, Ports
from .kube import KubeCluster

# The order matters: each component needs the ones before it.
COMPONENTS = (
    "etcd",
    "kube-apiserver",
    "kube-controller-manager",
    "kube-scheduler",
    "kwok",
    "pod-runtime",
)
SERVICE_CIDR = "10.96.0.0/16"
# The controller-manager's and scheduler's own client rate limits (20 and 50
# requests/s by default) would make them, not the code under test, the bottleneck
# when hundreds of fake pods start at once; kwokctl lifts them the same way
# (`disableQPSLimits`) for its simulated clusters.
UNLIMITED_CLIENT = ("--kube-api-qps=5000", "--kube-api-burst=10000")
FAKE_NODES = ("hx-llm-server-01", "hx-llm-server-02", "hx-cpu-01")


class ClusterError(RuntimeError):
    """The local cluster could not be brought up or down."""


def say(message: str) -> None:
    """Progress for the person running `make cluster-up`."""
    print(
        f"[cluster {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True
    )


@dataclass
class Cluster:
    """The local cluster's files, ports and daemons."""

    layout: Layout = field(default_factory=Layout.from_env)
    ports: Ports = field(default_factory=Ports)
    pod_runtime: bool = True
    """Run the pod runtime (needs root for network namespaces; one per machine)."""

    @property
    def components(self) -> tuple[str, ...]:
        """The daemons this cluster runs, in start order."""
        runtime = self.pod_runtime and os.geteuid() == 0
        return COMPONENTS if runtime else COMPONENTS[:-1]

    def admin(self) -> KubeCluster:
        """kubectl and helm against this cluster, as its admin."""
        return KubeCluster(
            kubeconfig=self.layout.admin_kubeconfig,
            context=None,
            kubectl_path=str(self.layout.binary("kubectl")),
            helm_path=str(self.layout.binary("helm")),
            local=True,
        )

    @property
    def server(self) -> str:
        return f"https://127.0.0.1:{self.ports.apiserver}"

    # -- kubeconfigs ---------------------------------------------------------------

    def _kubeconfig(self, user: str) -> Path:
        """Writes (once) a kubeconfig that authenticates with `user`'s client cert."""
        path = self.layout.state / f"{user}.kubeconfig"
        pki_dir = self.layout.pki
        doc = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [
                {
                    "name": CONTEXT_NAME,
                    "cluster": {
                        "server": self.server,
                        "certificate-authority": str(pki_dir / "ca.crt"),
                    },
                }
            ],
            "users": [
                {
                    "name": f"{CONTEXT_NAME}-{user}",
                    "user": {
                        "client-certificate": str(pki_dir / f"{user}.crt"),
                        "client-key": str(pki_dir / f"{user}.key"),
                    },
                }
            ],
            "contexts": [
                {
                    "name": CONTEXT_NAME,
                    "context": {
                        "cluster": CONTEXT_NAME,
                        "user": f"{CONTEXT_NAME}-{user}",
                    },
                }
            ],
            "current-context": CONTEXT_NAME,
        }
        path.write_text(yaml.safe_dump(doc))
        path.chmod(0o600)
        return path

    # -- component command lines -----------------------------------------------------

    def _argv(self, name: str) -> list[str]:
        lay, p, pk = self.layout, self.ports, self.layout.pki
        exe = str(lay.binary(name))
        if name == "etcd":
            peer = f"http://127.0.0.1:{p.etcd_peer}"
            client = f"http://127.0.0.1:{p.etcd_client}"
            return [
                exe,
                "--name=citadel",
                f"--data-dir={lay.etcd_data}",
                f"--listen-client-urls={client}",
                f"--advertise-client-urls={client}",
                f"--listen-peer-urls={peer}",
                f"--initial-advertise-peer-urls={peer}",
                f"--initial-cluster=citadel={peer}",
                # A throw-away test cluster: durability is not worth the disk waits.
                "--unsafe-no-fsync=true",
                "--log-level=warn",
            ]
        if name == "kube-apiserver":
            return [
                exe,
                f"--etcd-servers=http://127.0.0.1:{p.etcd_client}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.apiserver}",
                "--advertise-address=127.0.0.1",
                # No kube-proxy and a loopback address: the `kubernetes` Endpoints
                # would be refused, so the apiserver does not try to keep them.
                "--endpoint-reconciler-type=none",
                f"--cert-dir={lay.state / 'apiserver-certs'}",
                f"--tls-cert-file={pk / 'apiserver.crt'}",
                f"--tls-private-key-file={pk / 'apiserver.key'}",
                f"--client-ca-file={pk / 'ca.crt'}",
                # Aggregated APIs (metrics-server and the like) trust this CA for
                # front-proxy requests; without it the apiserver logs errors.
                f"--requestheader-client-ca-file={pk / 'ca.crt'}",
                "--requestheader-allowed-names=front-proxy-client",
                "--requestheader-username-headers=X-Remote-User",
                "--requestheader-group-headers=X-Remote-Group",
                "--requestheader-extra-headers-prefix=X-Remote-Extra-",
                f"--kubelet-client-certificate={pk / 'apiserver-kubelet-client.crt'}",
                f"--kubelet-client-key={pk / 'apiserver-kubelet-client.key'}",
                f"--service-account-key-file={pk / 'sa.pub'}",
                f"--service-account-signing-key-file={pk / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
                "--authorization-mode=Node,RBAC",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                "--allow-privileged=true",
                # kube-apiserver's default: `make bench` reads its CPU profile
                # (/debug/pprof, for admin users only) during the scale run.
                "--profiling=true",
                "--v=1",
            ]
        if name == "kube-controller-manager":
            kc = self._kubeconfig("controller-manager")
            return [
                exe,
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.controller_manager}",
                "--leader-elect=false",
                "--use-service-account-credentials=true",
                f"--service-account-private-key-file={pk / 'sa.key'}",
                f"--root-ca-file={pk / 'ca.crt'}",
                f"--cluster-signing-cert-file={pk / 'ca.crt'}",
                f"--cluster-signing-key-file={pk / 'ca.key'}",
                f"--service-cluster-ip-range={SERVICE_CIDR}",
                f"--cert-dir={lay.state / 'controller-manager-certs'}",
                *UNLIMITED_CLIENT,
                "--v=1",
            ]
        if name == "kube-scheduler":
            kc = self._kubeconfig("scheduler")
            return [
                exe,
                f"--kubeconfig={kc}",
                f"--authentication-kubeconfig={kc}",
                f"--authorization-kubeconfig={kc}",
                "--bind-address=127.0.0.1",
                f"--secure-port={p.scheduler}",
                "--leader-elect=false",
                *UNLIMITED_CLIENT,
                "--v=1",
            ]
        if name == "kwok":
            return [
                exe,
                f"--kubeconfig={self._kubeconfig('kwok')}",
                f"--config={CLUSTER_DIR / 'kwok.yaml'}",
                "--node-ip=10.255.0.1",
                # kwok's own server: only its /healthz is used here.
                f"--server-address=127.0.0.1:{p.kwok_server}",
            ]
        if name == "pod-runtime":
            return [sys.executable, "-m", "harness.podruntime"]
        raise ClusterError(f"unknown component {name}")

    # -- health ------------------------------------------------------------------

    def _get(self, url: str, *, client_cert: str | None = None) -> bool:
        ctx: ssl.SSLContext | None = None
        if url.startswith("https"):
            ctx = ssl.create_default_context(cafile=str(self.layout.pki / "ca.crt"))
            if client_cert:
                ctx.load_cert_chain(
                    str(self.layout.pki / f"{client_cert}.crt"),
                    str(self.layout.pki / f"{client_cert}.key"),
                )
            else:
                # Controller-manager and scheduler serve self-signed certificates.
                ctx.check_hostname = False
                ctx.verify_mode = ssl.CERT_NONE
        try:
            with urllib.request.urlopen(url, timeout=2, context=ctx) as resp:
                return int(resp.status) == 200
        except (urllib.error.URLError, OSError):
            return False

    def healthy(self, name: str) -> bool:
        """Whether component `name` runs and answers its health endpoint."""
        if procs.pid_of(self.layout.run, name) is None:
            return False
        p = self.ports
        checks: dict[str, Callable[[], bool]] = {
            "etcd": lambda: self._get(f"http://127.0.0.1:{p.etcd_client}/health"),
            "kube-apiserver": lambda: self._get(
                f"{self.server}/readyz", client_cert="admin"
            ),
            "kube-controller-manager": lambda: self._get(
                f"https://127.0.0.1:{p.controller_manager}/healthz"
            ),
            "kube-scheduler": lambda: self._get(
                f"https://127.0.0.1:{p.scheduler}/healthz"
            ),
            "kwok": lambda: self._get(f"http://127.0.0.1:{p.kwok_server}/healthz"),
            "pod-runtime": lambda: self._get(
                f"http://127.0.0.1:{p.pod_runtime}/healthz"
            ),
        }
        return checks[name]()

    def _wait(self, what: str, check: Callable[[], bool], timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if check():
                return
            time.sleep(0.25)
        raise ClusterError(
            f"{what} not healthy after {timeout:.0f}s; see {self.layout.logs}"
        )

    # -- kubectl -------------------------------------------------------------------

    def kubectl(self, *args: str, input_text: str | None = None) -> str:
        """Runs the harness's kubectl as the cluster admin and returns its output."""
        cmd = [
            str(self.layout.binary("kubectl")),
            f"--kubeconfig={self.layout.admin_kubeconfig}",
        ]
        result = subprocess.run(
            [*cmd, *args], input=input_text, capture_output=True, text=True, check=False
        )
        if result.returncode != 0:
            raise ClusterError(f"kubectl {' '.join(args)}: {result.stderr.strip()}")
        return result.stdout

    # -- up / down -------------------------------------------------------------------

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        """Serialises `up` and `down` across processes (make, pytest sessions)."""
        self.layout.state.mkdir(parents=True, exist_ok=True)
        with (self.layout.state / "lock").open("w") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            yield

    def build(self) -> None:
        """Builds (or finds cached) every binary from its pinned Go module."""
        subprocess.run(["bash", str(CLUSTER_DIR / "build.sh")], check=True)

    def up(self, *, merge_kubeconfig: bool = True) -> None:
        """Starts whatever is not running yet, then creates the fake nodes.

        Args:
            merge_kubeconfig: add the `citadel-local` context to the user's
                kubeconfig and make it current (what `make cluster-up` does).
        """
        with self._exclusive():
            self._up(merge_kubeconfig)

    def _up(self, merge_kubeconfig: bool) -> None:
        began = time.monotonic()
        self.build()
        self.layout.state.mkdir(parents=True, exist_ok=True)
        if not pki.pki_current(self.layout.pki) and any(
            self.healthy(name) for name in self.components
        ):
            say("certificates changed: restarting the cluster with new ones")
            self._down()
        pki.ensure_pki(self.layout.pki)
        self.layout.admin_kubeconfig.write_text(self._kubeconfig("admin").read_text())
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBE")}
        # The pod runtime is this harness's own Python module.
        env.update(PYTHONPATH=str(HARNESS_DIR.parent), PYTHONSAFEPATH="1")
        for name in self.components:
            if self.healthy(name):
                say(f"{name}: already running")
                continue
            procs.stop(self.layout.run, name)
            self._check_port_free(name)
            started = time.monotonic()
            say(f"{name}: starting")
            procs.start(self.layout.run, self.layout.logs, name, self._argv(name), env)
            self._wait(name, functools.partial(self.healthy, name), timeout=90)
            say(f"{name}: healthy in {time.monotonic() - started:.1f}s")
        self._create_nodes()
        if merge_kubeconfig:
            self._merge_user_kubeconfig()
        say(
            f"cluster ready in {time.monotonic() - began:.1f}s (context {CONTEXT_NAME})"
        )

    def _port_of(self, name: str) -> int:
        field_name = {
            "etcd": "etcd_client",
            "kube-apiserver": "apiserver",
            "kube-controller-manager": "controller_manager",
            "kube-scheduler": "scheduler",
            "kwok": "kwok_server",
            "pod-runtime": "pod_runtime",
        }[name]
        port: int = getattr(self.ports, field_name)
        return port

    def _check_port_free(self, name: str) -> None:
        """Fails at once, naming the culprit, when another process holds the port."""
        port = self._port_of(name)
        if procs.listening_ports([port]):
            raise ClusterError(
                f"{name} cannot start: port {port} is already in use (another "
                "cluster? `make cluster-down`, or look with `ss -ltnp`)"
            )

    def _create_nodes(self) -> None:
        self.kubectl(
            "apply",
            "--server-side",
            "--force-conflicts",
            "-f",
            str(CLUSTER_DIR / "nodes.yaml"),
        )

        def all_ready() -> bool:
            out = self.kubectl(
                "get",
                "nodes",
                "-o",
                "jsonpath={range .items[*]}{.metadata.name}="
                '{.status.conditions[?(@.type=="Ready")].status}{"\\n"}{end}',
            )
            ready = {
                line.split("=")[0] for line in out.split() if line.endswith("=True")
            }
            return set(FAKE_NODES) <= ready

        self._wait("fake nodes", all_ready, timeout=60)
        say(f"nodes Ready: {', '.join(FAKE_NODES)}")

    def user_kubeconfig_path(self) -> Path:
        """The kubeconfig file kubectl would write to (first of $KUBECONFIG)."""
        env = os.environ.get("KUBECONFIG", "")
        first = next((p for p in env.split(os.pathsep) if p), "")
        return Path(first) if first else Path.home() / ".kube" / "config"

    def _merge_user_kubeconfig(self) -> None:
        """Adds the `citadel-local` context to the user's kubeconfig, as kind does."""
        target = self.user_kubeconfig_path()
        target.parent.mkdir(parents=True, exist_ok=True)
        pk = self.layout.pki
        kubectl = [
            str(self.layout.binary("kubectl")),
            f"--kubeconfig={target}",
            "config",
        ]
        steps = [
            [
                "set-cluster",
                CONTEXT_NAME,
                f"--server={self.server}",
                f"--certificate-authority={pk / 'ca.crt'}",
                "--embed-certs=true",
            ],
            [
                "set-credentials",
                CONTEXT_NAME,
                f"--client-certificate={pk / 'admin.crt'}",
                f"--client-key={pk / 'admin.key'}",
                "--embed-certs=true",
            ],
            [
                "set-context",
                CONTEXT_NAME,
                f"--cluster={CONTEXT_NAME}",
                f"--user={CONTEXT_NAME}",
            ],
            ["use-context", CONTEXT_NAME],
        ]
        for step in steps:
            subprocess.run([*kubectl, *step], check=True, capture_output=True)
        say(f"kubeconfig: context {CONTEXT_NAME} merged into {target} and made current")

    def down(self) -> None:
        """Stops every daemon the harness started and checks that no port is left."""
        with self._exclusive():
            self._down()

    def _down(self) -> None:
        for name in reversed(COMPONENTS):
            # Stopped gracefully, the pod runtime stops its pods' programs.
            if procs.stop(
                self.layout.run, name, grace=30 if name == "pod-runtime" else 10
            ):
                say(f"{name}: stopped")
        # Daemons whose pid file was lost (a killed run) are found by their state
        # directory, which every one of them names on its command line.
        strays = procs.processes_mentioning(str(self.layout.state) + "/")
        if strays:
            say(f"stopping {len(strays)} harness process(es) without a pid file")
            procs.kill_all(strays)
        left = procs.listening_ports(
            [getattr(self.ports, f) for f in self.ports.__dataclass_fields__]
        )
        if left:
            raise ClusterError(f"ports still listening after cluster-down: {left}")
        say("cluster down; data kept in " + str(self.layout.state))

    def status(self) -> dict[str, bool]:
        """Whether each component runs and is healthy."""
        return {name: self.healthy(name) for name in self.components}
