"""Where the kube-apiserver spends its CPU: its own profiler, read during a run.

The operator-scale run is bound by the 2 cores the whole control plane shares, and
the API server uses the most of them; py-spy shows the operator's side only. The
API server serves Go's CPU profile at /debug/pprof/profile (for admin users; the
local cluster runs it with `--profiling=true`, kube-apiserver's default). A thread
takes consecutive profiles of `CHUNK_S` seconds while the run lasts; `go tool
pprof -traces` prints their stacks, and each stack is put in the first category
whose markers it contains (`CATEGORIES`, request kinds before request plumbing, so
a stack inside a handler counts for the handler).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

CHUNK_S = 5
"""Seconds per profile: the last one runs at most this long past the span."""

CATEGORIES: tuple[tuple[str, tuple[str, ...]], ...] = (
    (
        "garbage collection (background)",
        ("runtime.gcBgMarkWorker", "runtime.bgsweep", "runtime.bgscavenge"),
    ),
    ("LLMModel status writes", ("customresource.(*StatusREST)",)),
    # applyPatcher is on the stack only while the patch is merged; storing the
    # result, under patchResource, comes next.
    ("server-side apply: merging (Deployments, Services, ...)", ("applyPatcher",)),
    ("PATCH and apply: storing, and kwok's pod status", ("patchResource",)),
    (
        "updates (PUT: Deployment and ReplicaSet status, leases)",
        ("UpdateResource",),
    ),
    ("creates (POST)", ("createHandler",)),
    ("deletes", ("DeleteResource", "DeleteCollection")),
    ("reads (GET, LIST)", ("GetResource", "ListResource", "getResourceHandler")),
    (
        "watches: encoding and sending events",
        ("WatchServer", "handleWatch", "cacheWatcher", "watchEncoder"),
    ),
    ("watch cache: taking in etcd's changes", ("etcd3.(*watchChan)", "cacher.")),
    ("etcd client", ("go.etcd.io", "google.golang.org/grpc")),
    (
        "request plumbing (TLS, HTTP/2, authn, authz, flow control)",
        (
            "net/http",
            "http2",
            "endpoints/filters",
            "server/filters",
            "crypto/tls",
            "otelhttp",
        ),
    ),
)
OTHER = "other"

_UNITS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "": 1.0}
_VALUE = re.compile(r"^([\d.]+)(ns|us|µs|ms|s)?$")


@dataclass
class ApiServerProfile:
    """CPU seconds of the API server's samples per category.

    Attributes:
        seconds: category -> CPU seconds sampled.
        problem: why there is no profile, when there is none.
    """

    seconds: dict[str, float] = field(default_factory=dict)
    problem: str | None = None

    @property
    def total(self) -> float:
        return sum(self.seconds.values())

    def share(self, category: str) -> float:
        """The category's part of all samples (0..1)."""
        return self.seconds.get(category, 0.0) / self.total if self.total else 0.0


def categorise(traces: str) -> dict[str, float]:
    """CPU seconds per category from `go tool pprof -traces` output.

    Each trace is a block after a `-----------+---` line: the first line holds the
    sample value and the leaf frame, the following lines the callers.
    """
    found: dict[str, float] = {}
    for block in traces.split("-----------+")[1:]:
        lines = [line.strip() for line in block.splitlines()[1:] if line.strip()]
        if not lines:
            continue
        value, _, leaf = lines[0].partition(" ")
        match = _VALUE.match(value)
        if match is None:
            continue
        seconds = float(match.group(1)) * _UNITS[match.group(2) or ""]
        stack = " ".join([leaf, *lines[1:]])
        name = next(
            (n for n, markers in CATEGORIES if any(m in stack for m in markers)),
            OTHER,
        )
        found[name] = found.get(name, 0.0) + seconds
    return found


class ApiServerProfiler:
    """Takes consecutive CPU profiles of the API server from `start` to `stop`.

    Args:
        kubectl: kubectl and its --kubeconfig, as an argv prefix.
        out: the folder for the profiles.
        name: a prefix for their file names.
    """

    def __init__(self, kubectl: Sequence[str], out: Path, name: str) -> None:
        self._kubectl = list(kubectl)
        self._out = out
        self._name = name
        self._stop = threading.Event()
        self._files: list[Path] = []
        self._problem: str | None = None
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> ApiServerProfiler:
        self._thread.start()
        return self

    def _run(self) -> None:
        path = f"/debug/pprof/profile?seconds={CHUNK_S}"
        while not self._stop.is_set():
            done = subprocess.run(
                [*self._kubectl, "get", "--raw", path],
                capture_output=True,
                timeout=CHUNK_S + 60,
                check=False,
            )
            if done.returncode != 0:
                self._problem = (
                    "the API server's profile could not be read: "
                    + done.stderr.decode(errors="replace")[-300:]
                )
                return
            file = self._out / f"{self._name}-{len(self._files):03d}.pprof"
            file.write_bytes(done.stdout)
            self._files.append(file)

    def halt(self) -> None:
        """Lets the thread end after the profile under way (for clean-up paths;
        `stop` also reads the profiles)."""
        self._stop.set()

    def stop(self) -> ApiServerProfile:
        """Waits for the profile under way and sorts every sample into a
        category."""
        self._stop.set()
        self._thread.join(timeout=CHUNK_S + 90)
        if self._problem or not self._files:
            return ApiServerProfile(problem=self._problem or "no profile was taken")
        # The `go` on PATH, as tests/e2e/cluster/build.sh builds the cluster with.
        go = shutil.which("go")
        if go is None:
            return ApiServerProfile(problem="no Go toolchain for `go tool pprof`")
        done = subprocess.run(
            [go, "tool", "pprof", "-traces", *map(str, self._files)],
            capture_output=True,
            text=True,
            timeout=300,
            check=False,
        )
        if done.returncode != 0:
            return ApiServerProfile(problem=f"go tool pprof: {done.stderr[-300:]}")
        return ApiServerProfile(categorise(done.stdout))
