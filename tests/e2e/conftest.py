"""Fixtures for tests that need a Kubernetes cluster.

By default the tests use the local harness (`make cluster-up`; started here if it is
not running). Set `CITADEL_E2E_KUBECONFIG` (and optionally `CITADEL_E2E_CONTEXT`) to
run the same tests against any other cluster, such as kind on a laptop with Docker.
"""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.cluster import Cluster
from harness.config import Layout
from harness.kube import KubeCluster

FAILED_KEY = pytest.StashKey[bool]()


def _tool(layout: Layout, name: str) -> str:
    built = layout.binary(name)
    if built.exists():
        return str(built)
    found = shutil.which(name)
    if not found:
        raise RuntimeError(f"{name} not found: run `make binaries` or put it on PATH")
    return found


@pytest.fixture(scope="session")
def cluster() -> KubeCluster:
    """The cluster under test: the local harness unless CITADEL_E2E_KUBECONFIG."""
    layout = Layout.from_env()
    external = os.environ.get("CITADEL_E2E_KUBECONFIG")
    if external:
        return KubeCluster(
            kubeconfig=Path(external),
            context=os.environ.get("CITADEL_E2E_CONTEXT") or None,
            kubectl_path=_tool(layout, "kubectl"),
            helm_path=_tool(layout, "helm"),
            local=False,
        )
    harness = Cluster(layout=layout)
    harness.up(merge_kubeconfig=False)
    return harness.admin()


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Iterator[None]:
    report: pytest.TestReport = yield
    if report.failed:
        item.stash[FAILED_KEY] = True
    return report  # type: ignore[return-value]


def _dump(cluster: KubeCluster, namespace: str) -> str:
    """What a person debugging a failed test wants to see from its namespace."""
    parts = []
    for args in (
        ("get", "all,pvc,configmaps,events", "-o", "wide", "-n", namespace),
        ("describe", "pods", "-n", namespace),
        (
            "logs",
            "-n",
            namespace,
            "--all-containers",
            "--prefix",
            "-l",
            "app.kubernetes.io/name",
            "--tail=50",
        ),
    ):
        out = cluster.kubectl(*args, check=False)
        parts.append(f"$ kubectl {' '.join(args)}\n{out}")
    if cluster.local:
        for log in sorted(Layout.from_env().logs.glob("*.log")):
            tail = log.read_text(errors="replace").splitlines()[-15:]
            parts.append(f"--- {log} (last lines)\n" + "\n".join(tail))
    return "\n".join(parts)


@pytest.fixture
def namespace(request: pytest.FixtureRequest, cluster: KubeCluster) -> Iterator[str]:
    """A fresh namespace for one test, removed afterwards (dumped on failure)."""
    stem = request.node.name.lower().replace("_", "-")
    stem = "".join(c for c in stem if c.isalnum() or c == "-")[:40].strip("-")
    name = f"e2e-{stem}-{uuid.uuid4().hex[:5]}"
    cluster.kubectl("create", "namespace", name)
    cluster.kubectl("label", "namespace", name, "citadel.ai/e2e=true")
    yield name
    if request.node.stash.get(FAILED_KEY, False):
        print(f"\n===== namespace {name} after failure =====\n{_dump(cluster, name)}")
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)
