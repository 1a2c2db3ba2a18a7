"""The cluster for the gateway's Kubernetes tests: the local harness (started if it
is not running), or any cluster named by CITADEL_E2E_KUBECONFIG."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from harness.cluster import Cluster
from harness.config import Layout
from harness.kube import KubeCluster


@pytest.fixture(scope="session")
def kube() -> KubeCluster:
    layout = Layout.from_env()
    external = os.environ.get("CITADEL_E2E_KUBECONFIG")
    kubectl = str(layout.binary("kubectl"))
    if external:
        context = os.environ.get("CITADEL_E2E_CONTEXT") or None
        return KubeCluster(Path(external), context, kubectl, "helm", local=False)
    Cluster(layout=layout).up(merge_kubeconfig=False)
    return KubeCluster(layout.admin_kubeconfig, None, kubectl, "helm", local=True)


@pytest.fixture
def kube_namespace(kube: KubeCluster) -> Iterator[str]:
    name = f"e2e-gateway-{uuid.uuid4().hex[:6]}"
    kube.kubectl("create", "namespace", name)
    kube.kubectl("label", "namespace", name, "citadel.ai/e2e=true")
    yield name
    kube.kubectl("delete", "namespace", name, "--wait=false", check=False)
