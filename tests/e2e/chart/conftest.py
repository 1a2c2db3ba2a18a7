"""The Prometheus Operator's CRDs, from the files its Go module ships, applied once
per session so that the chart's ServiceMonitors and PrometheusRule meet the real
schemas."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
from harness.kube import KubeCluster

ROOT = Path(__file__).resolve().parents[3]
MODULE = "github.com/prometheus-operator/prometheus-operator"


def pinned_version() -> str:
    """PROMETHEUS_OPERATOR_VERSION from tests/e2e/cluster/versions.env."""
    for line in (ROOT / "tests/e2e/cluster/versions.env").read_text().splitlines():
        if line.startswith("PROMETHEUS_OPERATOR_VERSION="):
            return line.split("=", 1)[1].strip()
    raise RuntimeError("versions.env lacks PROMETHEUS_OPERATOR_VERSION")


def download(version: str) -> dict[str, str]:
    """`go mod download -json` of the module: its Dir, or its Error."""
    result = subprocess.run(
        ["go", "mod", "download", "-json", f"{MODULE}@{version}"],
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
        cwd="/",
    )
    info: dict[str, str] = json.loads(result.stdout or "{}")
    if not info:
        info["Error"] = result.stderr.strip()
    return info


def crd_folder() -> Path:
    # Pinned in versions.env (v0.95.x is refused by the Go module proxy).
    info = download(pinned_version())
    if "Error" in info:
        pytest.fail(f"cannot download {MODULE}: {info['Error']}")
    return Path(info["Dir"]) / "example" / "prometheus-operator-crd"


@pytest.fixture(scope="session")
def prometheus_operator_crds(cluster: KubeCluster) -> list[str]:
    """The monitoring.coreos.com CRDs, applied and established; their names."""
    folder = crd_folder()
    files = sorted(folder.glob("monitoring.coreos.com_*.yaml"))
    assert files, f"no CRD files in {folder}"
    for path in files:
        # Server-side: these CRDs are too large for client-side apply's annotation.
        cluster.kubectl(
            "apply", "--server-side", "--force-conflicts", "-f", "-",
            input_text=path.read_text(),
        )  # fmt: skip
    names = [p.name.removesuffix(".yaml").split("_", 1)[1] for p in files]
    crds = [f"crd/{n}.monitoring.coreos.com" for n in names]
    cluster.kubectl("wait", "--for=condition=Established", "--timeout=60s", *crds)
    return crds
