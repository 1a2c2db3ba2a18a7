"""Processes under test: start, wait, stop, and read their memory and CPU."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parents[1]
REPO = BENCH_DIR.parent
TICKS = os.sysconf("SC_CLK_TCK")


def free_port() -> int:
    """A free loopback port."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def bench_env(**extra: str) -> dict[str, str]:
    """The environment for child processes: no CITADEL_GATEWAY_* leaking in,
    `bench/` importable, the repository root never on sys.path, and `citadel`
    imported from this checkout's `src/`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CITADEL_GATEWAY_")}
    env["PYTHONSAFEPATH"] = "1"
    # Ahead of the editable install, which may point at another checkout (the
    # main one, while it is being edited): the code measured is the code here.
    env["PYTHONPATH"] = os.pathsep.join((str(BENCH_DIR), str(REPO / "src")))
    return {**env, **extra}


@dataclass
class Proc:
    """A started process (leader of its own process group)."""

    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    def pids(self) -> list[int]:
        """The process and its descendants."""
        children: dict[int, list[int]] = {}
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit():
                continue
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            children.setdefault(ppid, []).append(int(entry.name))
        found, todo = [], [self.pid]
        while todo:
            pid = todo.pop()
            found.append(pid)
            todo.extend(children.get(pid, []))
        return found

    def rss_bytes(self) -> int:
        """Resident memory of the process tree."""
        total = 0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                for line in Path(f"/proc/{pid}/status").read_text().splitlines():
                    if line.startswith("VmRSS:"):
                        total += int(line.split()[1]) * 1024
        return total

    def cpu_seconds(self) -> float:
        """User plus system CPU time of the process tree so far."""
        total = 0.0
        for pid in self.pids():
            with contextlib.suppress(OSError):
                fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                total += (int(fields[11]) + int(fields[12])) / TICKS
        return total

    def alive(self) -> bool:
        return self.popen.poll() is None

    def tail(self, chars: int = 3000) -> str:
        try:
            return self.log.read_text(errors="replace")[-chars:]
        except OSError:
            return ""


def start(
    name: str,
    argv: Sequence[str],
    log_dir: Path,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> Proc:
    """Starts `argv` in a new process group, output to `log_dir/name.log`."""
    log = log_dir / f"{name}.log"
    with log.open("wb") as out:
        popen = subprocess.Popen(
            list(argv),
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env or bench_env(),
            cwd=cwd or log_dir,
            start_new_session=True,
        )
    return Proc(name, popen, log)


def stop(
    proc: Proc, timeout_s: float = 15.0, first: signal.Signals = signal.SIGTERM
) -> None:
    """`first` (SIGTERM) to the group, SIGKILL after `timeout_s`."""
    if proc.popen.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, first)
        try:
            proc.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
            proc.popen.wait()
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(proc.pid, signal.SIGKILL)


def wait_http(
    proc: Proc,
    url: str,
    timeout_s: float = 60.0,
    headers: Mapping[str, str] | None = None,
) -> None:
    """Waits until a GET of `url` (with `headers`) answers 200 (bounded); raises
    with the log's tail."""
    deadline = time.monotonic() + timeout_s
    request = urllib.request.Request(url, headers=dict(headers or {}))
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        with (
            contextlib.suppress(OSError),
            urllib.request.urlopen(request, timeout=2) as response,
        ):
            if response.status == 200:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{proc.name} not ready in {timeout_s}s:\n{proc.tail()}")


def wait_logged(proc: Proc, text: str, count: int, timeout_s: float = 60.0) -> None:
    """Waits until the log holds `text` `count` times (bounded); raises with the
    log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError):
            if proc.log.read_text(errors="replace").count(text) >= count:
                return
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        time.sleep(0.2)
    raise RuntimeError(
        f"{proc.name} did not log {text!r} {count} times in {timeout_s}s:\n"
        f"{proc.tail()}"
    )


def wait_listening(proc: Proc, timeout_s: float = 30.0) -> list[int]:
    """The ports a simulator printed on its `listening on ...` line."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        for line in proc.tail(10_000).splitlines():
            if line.startswith("listening on "):
                return [int(p) for p in line.split()[2:]]
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        time.sleep(0.05)
    raise RuntimeError(f"{proc.name} did not start in {timeout_s}s:\n{proc.tail()}")


def simulator_argv(replicas: int = 1, *options: str) -> list[str]:
    """The command line of `python -m simulator`."""
    return [
        sys.executable,
        "-m",
        "simulator",
        "--replicas",
        str(replicas),
        *options,
    ]


@contextlib.contextmanager
def running(procs: list[Proc]) -> Iterator[list[Proc]]:
    """Stops every process in `procs` (also ones added inside) on exit."""
    try:
        yield procs
    finally:
        for proc in reversed(procs):
            stop(proc)
