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
    """Starts `argv` as a daemon in its own session, logging to `<log_dir>/<name>.log`.

    The process outlives the caller (so `make cluster-up` can return) and is found
    again through its pid file.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    log_dir.mkdir(parents=True, exist_ok=True)
    log = (log_dir / f"{name}.log").open("ab")
    proc = subprocess.Popen(
        list(argv),
        stdin=subprocess.DEVNULL,
        stdout=log,
        stderr=subprocess.STDOUT,
        env=env,
        start_new_session=True,
    )
    log.close()
    (run_dir / f"{name}.pid").write_text(f"{proc.pid}\n")
    (run_dir / f"{name}.cmd").write_bytes(os.fsencode(argv[0]))
    return proc.pid


def stop(run_dir: Path, name: str, grace: float = 10.0) -> bool:
    """Stops the daemon `name` (TERM, then KILL after `grace` seconds).

    Returns:
        True when a running process was stopped.
    """
    pid = pid_of(run_dir, name)
    stopped = False
    if pid is not None:
        stopped = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGTERM)
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and pid_of(run_dir, name) is not None:
            time.sleep(0.1)
        if pid_of(run_dir, name) is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
            while pid_of(run_dir, name) is not None:
                time.sleep(0.05)
    for suffix in (".pid", ".cmd"):
        (run_dir / f"{name}{suffix}").unlink(missing_ok=True)
    return stopped


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
