"""`up` twice is harmless and `down` leaves no process or listening port behind.

Runs a second, throw-away cluster on other ports with its own state directory (the
binaries are shared), so the cluster the other tests use stays up.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from harness import procs
from harness.cluster import Cluster
from harness.config import Layout, Ports
from harness.kube import KubeCluster

pytestmark = pytest.mark.e2e


def test_up_is_idempotent_and_down_leaves_nothing(
    cluster: KubeCluster, tmp_path: Path
) -> None:
    if not cluster.local:
        pytest.skip("the harness lifecycle only applies to the local cluster")
    # A run of this test that was killed half-way leaves its cluster behind, with
    # its pid files in a pytest temporary directory: clear those first.
    procs.kill_all(procs.processes_mentioning("/test_up_is_idempotent_and_down"))
    layout = Layout(cache=Layout.from_env().cache, state_dir=tmp_path / "cluster")
    ports = Ports.shifted(100)
    # One pod runtime per machine: the second cluster runs without.
    second = Cluster(layout=layout, ports=ports, pod_runtime=False)
    try:
        second.up(merge_kubeconfig=False)
        first_pids = {
            name: procs.pid_of(layout.run, name) for name in second.components
        }
        assert all(first_pids.values()), first_pids
        second.up(merge_kubeconfig=False)
        again = {name: procs.pid_of(layout.run, name) for name in second.components}
        assert again == first_pids, "a second `up` must not restart anything"
        nodes = second.kubectl("get", "nodes", "-o", "name").split()
        assert "node/hx-llm-server-01" in nodes
    finally:
        second.down()
    for name, pid in first_pids.items():
        assert pid is not None and not procs.alive(pid), name
    assert procs.processes_mentioning(str(layout.state)) == []
    all_ports = [getattr(ports, f) for f in ports.__dataclass_fields__]
    assert procs.listening_ports(all_ports) == []
