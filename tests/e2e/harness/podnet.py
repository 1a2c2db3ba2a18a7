"""The pod network of the local pod runtime: one network namespace per pod, joined
by a bridge on the host, as a CNI plugin would do.

Addresses: the bridge is 10.244.128.1 and runtime pods get 10.244.128.2 and up
(10.244.128.0/17). kwok hands out the other half, 10.244.0.0/17, to the pods it only
pretends to run. Only these addresses, which live on this machine, are ever
targeted. Needs root (CAP_NET_ADMIN), as CI and the sessions have.
"""

from __future__ import annotations

import contextlib
import ipaddress
import os
import signal
import subprocess
from collections.abc import Sequence

BRIDGE = "ctd-br0"
NETWORK = ipaddress.ip_network("10.244.128.0/17")
BRIDGE_IP = str(NETWORK.network_address + 1)
NETNS_PREFIX = "ctd-"


class PodNetworkError(RuntimeError):
    """An `ip` command failed; the message has its output."""


def _ip(*args: str, check: bool = True) -> str:
    result = subprocess.run(
        ["ip", *args], capture_output=True, text=True, check=False, timeout=30
    )
    if check and result.returncode != 0:
        raise PodNetworkError(f"ip {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout


def ensure_bridge() -> None:
    """Creates the bridge with the host's address on the pod network (idempotent)."""
    if BRIDGE not in _ip("-o", "link", "show"):
        _ip("link", "add", BRIDGE, "type", "bridge")
    if BRIDGE_IP not in _ip("-o", "addr", "show", "dev", BRIDGE):
        _ip("addr", "add", f"{BRIDGE_IP}/{NETWORK.prefixlen}", "dev", BRIDGE)
    _ip("link", "set", BRIDGE, "up")


def remove_bridge() -> None:
    _ip("link", "del", BRIDGE, check=False)


def netns_name(uid: str) -> str:
    return f"{NETNS_PREFIX}{uid.replace('-', '')[:12]}"


def mac_of(address: str) -> str:
    """The MAC address of the pod with `address`: its IPv4 bytes behind
    0a:58 (a locally administered prefix, as OVN-Kubernetes derives them).

    The same address always has the same MAC: a pod that takes an address a
    deleted pod had is reached at once by the pods and the host that talked to
    the old one, whose neighbour caches still map the address to a MAC. With
    the kernel's random MAC they sent to the old one's, and connections timed
    out for the seconds until the entry was probed again (the gateway ejected
    a new replica so).
    """
    packed = ipaddress.IPv4Address(address).packed
    return "0a:58:" + ":".join(f"{byte:02x}" for byte in packed)


def add_pod(uid: str, address: str) -> str:
    """Creates the namespace of pod `uid` with `address` on its eth0.

    Returns:
        The namespace's name, for `ip netns exec`.
    """
    ns = netns_name(uid)
    short = uid.replace("-", "")[:11]
    host_end, pod_end = f"cv{short}", f"cp{short}"
    remove_pod(uid)
    # A host end left by a namespace that outlived its deletion blocks the name.
    _ip("link", "del", host_end, check=False)
    _ip("netns", "add", ns)
    _ip("link", "add", host_end, "type", "veth", "peer", "name", pod_end)
    _ip("link", "set", pod_end, "netns", ns)
    _ip("-n", ns, "link", "set", pod_end, "name", "eth0")
    _ip("-n", ns, "link", "set", "eth0", "address", mac_of(address))
    _ip("-n", ns, "addr", "add", f"{address}/{NETWORK.prefixlen}", "dev", "eth0")
    _ip("-n", ns, "link", "set", "eth0", "up")
    _ip("-n", ns, "link", "set", "lo", "up")
    _ip("-n", ns, "route", "add", "default", "via", BRIDGE_IP)
    _ip("link", "set", host_end, "master", BRIDGE)
    _ip("link", "set", host_end, "up")
    return ns


def remove_pod(uid: str) -> None:
    """Deletes the pod's namespace (its veth pair goes with it)."""
    _ip("netns", "del", netns_name(uid), check=False)


def pod_namespaces() -> list[str]:
    """The runtime's namespaces that exist now."""
    names = [line.split()[0] for line in _ip("netns", "list").splitlines() if line]
    return [n for n in names if n.startswith(NETNS_PREFIX)]


def pids_in(ns: str) -> list[int]:
    return [int(p) for p in _ip("netns", "pids", ns, check=False).split()]


def remove_all() -> None:
    """Kills what still runs in the runtime's namespaces, then deletes them and the
    bridge (after a runtime that was killed before it could clean up)."""
    for ns in pod_namespaces():
        for pid in pids_in(ns):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        _ip("netns", "del", ns, check=False)
    for line in _ip("-o", "link", "show").splitlines():
        name = line.split(":")[1].strip().split("@")[0]
        if name.startswith("cv"):
            _ip("link", "del", name, check=False)
    remove_bridge()


def exec_prefix(ns: str) -> Sequence[str]:
    """The command prefix that runs a program inside namespace `ns`."""
    return ("ip", "netns", "exec", ns)
