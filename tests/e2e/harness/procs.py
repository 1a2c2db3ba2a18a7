"""Starting, finding and stopping the harness's daemons by pid file."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path


def pid_of(run_dir: Path, name: str) -> int | None:
    """Returns the pid recorded for `name` when that process is still alive."""
    pid_file = run_dir / f"{name}.pid"
    try:
        pid = int(pid_file.read_text().strip())
    except (FileNotFoundError, ValueError):
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return None
    # A zombie or a recycled pid is not our daemon: check its command line.
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    if stat.split(") ", 1)[-1].startswith("Z"):
        return None
    marker = pid_file.with_suffix(".cmd")
    if marker.exists() and marker.read_bytes() not in cmdline:
        return None
    return pid


def start(
    run_dir: Path, log_dir: Path, name: str, argv: Sequence[str], env: dict[str, str]
) -> int:
    """Starts `argv` as a daemon, logging to `<log_dir>/<name>.log`.

    The daemon is detached (double fork, new session): it outlives the caller, so
    `make cluster-up` can return, and it is never the caller's child, so no zombie or
    unreaped-process warning is left when it stops. It is found again through its pid
    file.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    with (log_dir / f"{name}.log").open("ab") as log:
        pid = _spawn_detached(list(argv), env, log.fileno())
    (run_dir / f"{name}.pid").write_text(f"{pid}\n")
    (run_dir / f"{name}.cmd").write_bytes(os.fsencode(argv[0]))
    return pid


def _spawn_detached(argv: list[str], env: dict[str, str], log_fd: int) -> int:
    read_end, write_end = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - runs in the forked child
        try:
            os.close(read_end)
            os.setsid()
            grandchild = os.fork()
            if grandchild == 0:
                # Its own process group, so that stop() can signal it and anything
                # it starts in one go.
                os.setpgid(0, 0)
                devnull = os.open(os.devnull, os.O_RDONLY)
                os.dup2(devnull, 0)
                os.dup2(log_fd, 1)
                os.dup2(log_fd, 2)
                os.execve(argv[0], argv, env)
            os.write(write_end, str(grandchild).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(child, 0)
    with os.fdopen(read_end) as pipe:
        text = pipe.read()
    if not text:
        raise OSError(f"could not start {argv[0]}")
    return int(text)


def stop(run_dir: Path, name: str, grace: float = 10.0) -> bool:
    """Stops the daemon `name` (TERM, then KILL after `grace` seconds).

    Returns:
        True when a running process was stopped.
    """
    pid = pid_of(run_dir, name)
    if pid is not None:
        _signal_group(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and alive(pid):
            time.sleep(0.1)
        if alive(pid):
            _signal_group(pid, signal.SIGKILL)
            deadline = time.monotonic() + grace
            while time.monotonic() < deadline and alive(pid):
                time.sleep(0.05)
    for suffix in (".pid", ".cmd"):
        (run_dir / f"{name}{suffix}").unlink(missing_ok=True)
    return pid is not None


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """Signals the daemon's process group, or the daemon alone if it has none."""
    try:
        os.killpg(pid, sig)
    except ProcessLookupError:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, sig)


def processes_mentioning(text: str) -> list[int]:
    """Pids (not this process) whose command line contains `text`."""
    needle = text.encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if needle in cmdline:
            found.append(int(entry.name))
    return found


def kill_all(pids: Sequence[int], grace: float = 10.0) -> None:
    """TERM, then KILL after `grace` seconds, every pid still alive."""
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    running = list(pids)
    while running and time.monotonic() < deadline:
        time.sleep(0.1)
        running = [pid for pid in running if alive(pid)]
    for pid in running:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def alive(pid: int) -> bool:
    """Whether `pid` runs (a zombie does not: where pid 1 is no real init, as in
    some sandboxes, dead daemons linger as zombies)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return not stat.split(") ", 1)[-1].startswith("Z")


def listening_ports(ports: Sequence[int]) -> list[int]:
    """Returns those of `ports` on which something listens (from /proc/net/tcp*)."""
    wanted = set(ports)
    found: set[int] = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except FileNotFoundError:
            continue
        for line in lines:
            fields = line.split()
            state = fields[3]
            port = int(fields[1].rsplit(":", 1)[1], 16)
            if state == "0A" and port in wanted:  # 0A = LISTEN
                found.add(port)
    return sorted(found)


def stop_child(proc: subprocess.Popen[bytes], grace: float = 10.0) -> None:
    """Stops a child process: SIGTERM, then SIGKILL after `grace` seconds."""
    proc.terminate()
    try:
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
