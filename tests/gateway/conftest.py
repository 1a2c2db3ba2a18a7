"""Integration fixtures: fake backends, Redis and gateways as real local processes.

Everything listens on 127.0.0.1 with ports the kernel hands out; every process is
stopped at teardown. Waits are bounded (`START_TIMEOUT_S`), never asserted on.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest
from citadel_bench import procs

BIN = Path(sys.executable).parent
FAKE_BACKEND = Path(__file__).with_name("fake_backend.py")
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITADEL_GATEWAY_")}
    if env.get("PYTHONPATH"):
        # The processes start in a temporary folder: a relative entry (a
        # worktree's `PYTHONPATH=src`) would name nothing there, and they would
        # import the editable install's code instead of the checkout's.
        env["PYTHONPATH"] = os.pathsep.join(
            os.path.abspath(p) for p in env["PYTHONPATH"].split(os.pathsep) if p
        )
    return {**env, "PYTHONSAFEPATH": "1", **extra}


def _stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    if proc.stdout is not None:
        proc.stdout.close()


@dataclass
class Backend:
    """One fake replica process."""

    name: str
    url: str
    proc: subprocess.Popen[bytes]

    def received(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = httpx.get(self.url + "/received").json()
        return result

    def release(self) -> None:
        httpx.post(self.url + "/release")

    def kill(self) -> None:
        self.proc.kill()
        self.proc.wait()


@dataclass
class Gateway:
    """One gateway process."""

    url: str
    proc: subprocess.Popen[bytes]
    log: Path

    def metric(self, prefix: str) -> float:
        """The sum of the metric samples whose line starts with `prefix`."""
        text = httpx.get(self.url + "/metrics").text
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in text.splitlines()
            if line.startswith(prefix)
        )


@pytest.fixture
def start_backend(tmp_path: Path) -> Iterator[Callable[[str], Backend]]:
    started: list[Backend] = []

    def start(name: str) -> Backend:
        proc = subprocess.Popen(
            [sys.executable, str(FAKE_BACKEND), "--name", name],
            stdout=subprocess.PIPE,
            env=_env(),
            cwd=tmp_path,
        )
        assert proc.stdout is not None
        line = proc.stdout.readline().decode()
        if not line.startswith("listening on "):
            proc.kill()
            raise RuntimeError(f"fake backend {name} did not start: {line!r}")
        backend = Backend(name, f"http://127.0.0.1:{int(line.split()[-1])}", proc)
        started.append(backend)
        return backend

    yield start
    for backend in started:
        _stop(backend.proc)


def route(name: str, backends: list[Backend], **extra: Any) -> dict[str, Any]:
    """A routing-document entry for a model served by `backends`."""
    return {
        "name": name,
        "namespace": "llm",
        "servedName": name,
        "service": name,
        "endpoints": [b.url for b in backends],
        "ready": True,
        **extra,
    }


def create_key(keys_file: Path, name: str, *options: str) -> str:
    """A new key in the static key file, made by the real CLI."""
    out = subprocess.run(
        [
            str(BIN / "citadel"),
            "keys",
            "--file",
            str(keys_file),
            "create",
            name,
            *options,
        ],
        check=True,
        capture_output=True,
        text=True,
        env=_env(),
    ).stdout
    return out.strip().splitlines()[-1]


def batch_and_user_keys(keys_file: Path, model: str) -> tuple[str, str]:
    """Two keys for `model` made by the real CLI: `batch`, sheddable by its
    record (`--priority sheddable`), and `user`, standard."""
    batch = create_key(keys_file, "batch", "--models", model, "--priority", "sheddable")
    return batch, create_key(keys_file, "user", "--models", model)


def wait_ready(url: str, proc: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"process exited:\n{log.read_text()[-3000:]}")
        try:
            if httpx.get(url + "/readyz").status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"not ready in {START_TIMEOUT_S}s:\n{log.read_text()[-3000:]}")


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(
        models: list[dict[str, Any]] | None, keys_file: Path | None, **env: str
    ) -> Gateway:
        """A gateway on `models` (a routes file) or, with None, on what `env`
        says; on the keys in `keys_file` or, with None, on what `env` says."""
        port = free_port()
        log = tmp_path / f"gateway-{port}.log"
        settings = {
            "CITADEL_GATEWAY_HOST": "127.0.0.1",
            "CITADEL_GATEWAY_PORT": str(port),
            "CITADEL_GATEWAY_FILE_POLL_PERIOD_S": "0.2",
            "CITADEL_GATEWAY_METRICS_SCRAPE_PERIOD_S": "0.5",
        }
        if models is not None:
            routes = tmp_path / "routes.json"
            routes.write_text(json.dumps({"schemaVersion": 1, "models": models}))
            settings["CITADEL_GATEWAY_ROUTES_SOURCE"] = "file"
            settings["CITADEL_GATEWAY_ROUTES_FILE"] = str(routes)
        if keys_file is not None:
            settings["CITADEL_GATEWAY_KEYS_FILE"] = str(keys_file)
        settings.update({f"CITADEL_GATEWAY_{k.upper()}": v for k, v in env.items()})
        with log.open("wb") as out:
            proc = subprocess.Popen(
                [str(BIN / "citadel-gateway")],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=_env(**settings),
                cwd=tmp_path,
            )
        gateway = Gateway(f"http://127.0.0.1:{port}", proc, log)
        started.append(gateway)
        wait_ready(gateway.url, proc, log)
        return gateway

    yield start
    for gateway in started:
        _stop(gateway.proc)


@pytest.fixture
def redis_url(tmp_path: Path) -> Iterator[str]:
    server = shutil.which("redis-server")
    if server is None:
        pytest.fail(
            "redis-server is not installed (Debian: apt-get install redis-server)"
        )
    port = free_port()
    proc = subprocess.Popen(
        [
            server,
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
        ],
        stdout=subprocess.DEVNULL,
        cwd=tmp_path,
    )
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1) as conn:
                conn.sendall(b"PING\r\n")
                if conn.recv(16).startswith(b"+PONG"):
                    break
        except OSError:
            time.sleep(0.1)
    yield f"redis://127.0.0.1:{port}/0"
    _stop(proc)


FAST_SIMULATOR = (
    "--prefill-tokens-per-s",
    "10000000",
    "--decode-base-s",
    "0.0005",
    "--decode-per-seq-s",
    "0",
)
"""Simulator options for tests about where requests go and what is relayed,
not how long they take: prefill at once, decode 0.5 ms a step."""


@contextlib.contextmanager
def simulator(log_dir: Path, *options: str) -> Iterator[str]:
    """One simulated replica serving "smol" with `options`: its base URL."""
    argv = procs.simulator_argv(1, "--served-name", "smol", *options)
    proc = procs.start("simulator", argv, log_dir)
    try:
        [port] = procs.wait_listening(proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        procs.stop(proc)


@pytest.fixture
def smol_replica(tmp_path: Path) -> Iterator[str]:
    """One simulated replica serving "smol" with FAST_SIMULATOR's steps, for
    tests about what the gateway relays and counts: its base URL."""
    with simulator(tmp_path, *FAST_SIMULATOR) as url:
        yield url


def counted(url: str, name: str, **labels: str) -> float:
    """The sum of the samples of `name` at `url`/metrics that carry `labels`,
    whatever their other labels and their order."""
    total = 0.0
    for line in httpx.get(url + "/metrics").text.splitlines():
        if not line.startswith(name + "{"):
            continue
        series, value = line.rsplit(" ", 1)
        if all(f'{k}="{v}"' in series for k, v in labels.items()):
            total += float(value)
    return total


@dataclass(frozen=True)
class Helpers:
    """Plain helpers for the tests (conftest itself is not importable)."""

    route: Callable[..., dict[str, Any]] = route
    create_key: Callable[..., str] = create_key
    batch_and_user_keys: Callable[[Path, str], tuple[str, str]] = batch_and_user_keys
    free_port: Callable[[], int] = free_port
    fast_simulator: tuple[str, ...] = FAST_SIMULATOR
    counted: Callable[..., float] = counted
    simulator: Callable[..., contextlib.AbstractContextManager[str]] = simulator


@pytest.fixture
def helpers() -> Helpers:
    return Helpers()
