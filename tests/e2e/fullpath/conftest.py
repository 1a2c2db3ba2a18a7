"""The whole platform on the local cluster: the chart installed with Helm, the
operator and the gateway as pods of the harness pod runtime, and SmolLM2 served by
the CPU vLLM as the pods of a real LLMModel."""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from harness import demo
from harness.kube import KubeCluster

RELEASE = "fullpath"
SYSTEM_NS = "fullpath-system"
MODEL_NS = "fullpath-models"
sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "support" / "vllm"))

# Skips without the CPU vLLM, or installs it when CI is set.
from vllm_fixtures import vllm_installed  # noqa: E402

__all__ = ["vllm_installed"]


@dataclass(frozen=True)
class Platform:
    """The installed platform and how to reach it."""

    cluster: KubeCluster
    key: str

    def gateway_url(self) -> str:
        """A ready gateway endpoint now (it moves when the gateway pod is replaced)."""
        return demo.gateway_url(self.cluster, RELEASE, SYSTEM_NS)


@pytest.fixture(scope="module")
def platform(cluster: KubeCluster, vllm_installed: None) -> Iterator[Platform]:
    if not cluster.local or os.geteuid() != 0:
        pytest.skip("needs the local harness's pod runtime (root, network namespaces)")
    # The chart's namespaced RBAC needs the watched namespace to exist.
    cluster.kubectl("create", "namespace", MODEL_NS, check=False)
    try:
        demo.install_chart(
            cluster,
            RELEASE,
            SYSTEM_NS,
            ("--set-json", f'watchNamespaces=["{MODEL_NS}"]'),
        )
        cluster.kubectl(
            "apply", "-n", MODEL_NS, "-f", str(demo.DEMO_DIR / "smollm2.yaml")
        )
        demo.watch_until_ready(cluster, timeout=600, namespace=MODEL_NS)
        yield Platform(cluster, demo.create_key(cluster, SYSTEM_NS, "fullpath"))
    finally:
        cluster.kubectl(
            "delete",
            "namespace",
            MODEL_NS,
            "--wait=true",
            "--timeout=180s",
            check=False,
            timeout=200,
        )
        cluster.helm("uninstall", RELEASE, "-n", SYSTEM_NS, "--wait", check=False)
        cluster.kubectl("delete", "namespace", SYSTEM_NS, "--wait=false", check=False)
