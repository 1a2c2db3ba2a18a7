"""The pod runtime's network: an address a deleted pod had is reachable at once
in the pod that takes it, from a pod and from the host that talked to the old
one (their neighbour caches still hold the address)."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from collections.abc import Iterator

import pytest
from harness import podnet

pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="network namespaces need root"),
]

SERVED = "10.244.255.250"
CLIENT = "10.244.255.251"
PORT = 9000

SERVE = f"""
import socket
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
s.bind(("{SERVED}", {PORT}))
s.listen()
print("listening", flush=True)
while True:
    c, _ = s.accept()
    c.sendall(b"hello")
    c.close()
"""

ASK = f"""
import socket
s = socket.create_connection(("{SERVED}", {PORT}), timeout=1.0)
assert s.recv(5) == b"hello"
"""


def serve(ns: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [*podnet.exec_prefix(ns), sys.executable, "-I", "-c", SERVE],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None and proc.stdout.readline() == "listening\n"
    return proc


def stop(proc: subprocess.Popen[str]) -> None:
    proc.kill()
    proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


def ask(prefix: tuple[str, ...] = ()) -> None:
    """Connects to the served pod, from a namespace (`prefix`) or the host,
    within 1 s."""
    subprocess.run([*prefix, sys.executable, "-I", "-c", ASK], check=True, timeout=10)


@pytest.fixture
def uids() -> Iterator[list[str]]:
    made: list[str] = []
    podnet.ensure_bridge()
    yield made
    for uid in made:
        podnet.remove_pod(uid)


def test_an_address_taken_again_is_reached_at_once(uids: list[str]) -> None:
    first, client, second = (str(uuid.uuid4()) for _ in range(3))
    uids += [first, client, second]
    server = serve(podnet.add_pod(first, SERVED))
    client_ns = podnet.add_pod(client, CLIENT)
    try:
        ask(tuple(podnet.exec_prefix(client_ns)))
        ask()
    finally:
        stop(server)
    podnet.remove_pod(first)
    server = serve(podnet.add_pod(second, SERVED))
    try:
        # Within the neighbour entries' lifetime: both still map the address.
        ask(tuple(podnet.exec_prefix(client_ns)))
        ask()
    finally:
        stop(server)
