"""Starting the proxies under test in front of given backends: Citadel's gateway,
vllm-router and the LiteLLM proxy (the last two from their venvs under
$CITADEL_CACHE/bench, installed by bench/peers/install.sh).

Each runs as its own documentation has it run, not tuned to the benchmark: Citadel
with its defaults (keys required, so the load generator sends one), vllm-router
with its defaults, LiteLLM with what its docs advise for throughput where that is
cheap to do (a worker per core, no callbacks, no retries, no access log).
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from citadel_bench.procs import (
    Proc,
    bench_env,
    free_port,
    start,
    stop,
    wait_http,
    wait_logged,
)

MODEL = "sim"
KEY_NAME = "bench"
"""The one key Citadel is started with: no limits, every model."""


@dataclass(frozen=True)
class Target:
    """A target that is up: its process, its base URL and the headers every
    request to it carries (Citadel's key; the peers check none by default)."""

    proc: Proc
    url: str
    headers: Mapping[str, str] = field(default_factory=dict)


def cache_dir() -> Path:
    """$CITADEL_CACHE/bench."""
    base = os.environ.get("CITADEL_CACHE") or str(Path.home() / ".cache" / "citadel")
    return Path(base) / "bench"


def peer_problem(name: str) -> str | None:
    """Why a peer cannot run (not installed, or its install failed), else None."""
    failed = cache_dir() / f"{name}.failed"
    if failed.exists():
        return f"install failed: {failed.read_text().strip().splitlines()[-1:]}"
    binary = {"vllm-router": "vllm-router", "litellm": "litellm"}[name]
    if not (cache_dir() / name / "bin" / binary).exists():
        return "not installed (run bench/peers/install.sh)"
    return None


def create_key(path: Path) -> str:
    """A key with no limits (`KEY_NAME`) in a new static key file at `path`,
    made by Citadel's own CLI (`citadel keys --file PATH create bench`), as a
    user running the gateway outside Kubernetes makes one; returns the key.

    Raises:
        RuntimeError: the CLI refused.
    """
    from citadel.gateway import cli

    path.unlink(missing_ok=True)
    shown = io.StringIO()
    with contextlib.redirect_stdout(shown), contextlib.redirect_stderr(shown):
        code = cli.main(["keys", "--file", str(path), "create", KEY_NAME])
    if code != 0:
        raise RuntimeError(f"citadel keys create failed: {shown.getvalue().strip()}")
    # The key is the last line: "created key 'bench'; ...", then the key.
    return shown.getvalue().split()[-1]


def citadel_env(
    port: int, routes: Path, keys: Path, extra: Mapping[str, str] | None = None
) -> dict[str, str]:
    """The gateway's environment: routes and keys from files, `extra` (more
    `CITADEL_GATEWAY_*` settings), the rest at its defaults (keys required, the
    metrics scrape period of `kv-aware`)."""
    return bench_env(
        CITADEL_GATEWAY_HOST="127.0.0.1",
        CITADEL_GATEWAY_PORT=str(port),
        CITADEL_GATEWAY_ROUTES_SOURCE="file",
        CITADEL_GATEWAY_ROUTES_FILE=str(routes),
        CITADEL_GATEWAY_KEYS_FILE=str(keys),
        **(extra or {}),
    )


@dataclass(frozen=True)
class CitadelFiles:
    """What gateways read at start-up, and the headers that pass their keys.

    Attributes:
        routes: the routes file (one model, `MODEL`).
        keys: the static key file (one key, `KEY_NAME`).
        headers: the key as every request sends it.
    """

    routes: Path
    keys: Path
    headers: Mapping[str, str]


def citadel_files(
    backends: Sequence[str],
    log_dir: Path,
    strategy: str | None = None,
    name: str = "citadel",
    route_options: Mapping[str, object] | None = None,
) -> CitadelFiles:
    """A routes file listing `backends` (with `strategy`, else the default, and
    any other fields of the route in `route_options`) and a key file of one
    key, under `log_dir`, named after `name`."""
    route: dict[str, object] = {
        "name": MODEL,
        "namespace": "bench",
        "servedName": MODEL,
        "service": MODEL,
        "endpoints": list(backends),
        "ready": True,
        **(route_options or {}),
    }
    if strategy:
        route["strategy"] = strategy
    routes = log_dir / f"{name}-routes.json"
    routes.write_text(json.dumps({"schemaVersion": 1, "models": [route]}))
    keys = log_dir / f"{name}-keys.json"
    headers = {"authorization": f"Bearer {create_key(keys)}"}
    return CitadelFiles(routes, keys, headers)


def start_gateways(
    files: CitadelFiles,
    log_dir: Path,
    names: Sequence[str],
    extra_env: Mapping[str, str] | None = None,
) -> list[Target]:
    """A gateway process per name, each on a port of its own, all on the same
    `files` (so the same key passes every one), with `extra_env`; started
    together, then waited for one by one. If one does not come up, all stop.

    Raises:
        RuntimeError: a gateway exited or did not become ready.
    """
    gateway = Path(sys.executable).with_name("citadel-gateway")
    started: list[Target] = []
    try:
        for name in names:
            port = free_port()
            env = citadel_env(port, files.routes, files.keys, extra_env)
            proc = start(name, [str(gateway)], log_dir, env=env)
            started.append(Target(proc, f"http://127.0.0.1:{port}", files.headers))
        for target in started:
            wait_http(target.proc, target.url + "/readyz")
            # Routes and keys are read apart: a request with the key must pass
            # before the first measured one goes.
            wait_http(target.proc, target.url + "/v1/models", headers=files.headers)
    except BaseException:
        for target in started:
            stop(target.proc)
        raise
    return started


def start_citadel(
    backends: Sequence[str],
    log_dir: Path,
    strategy: str | None = None,
    name: str = "citadel",
) -> Target:
    """The gateway on a routes file listing `backends`, with one key (sent in
    the target's headers)."""
    files = citadel_files(backends, log_dir, strategy, name)
    return start_gateways(files, log_dir, [name])[0]


def vllm_router_command(
    backends: Sequence[str], port: int, metrics_port: int, policy: str | None
) -> tuple[list[str], dict[str, str]]:
    """vllm-router's command line and environment.

    Its Python launcher takes `--log-level warning` but hands the word to its
    Rust core, which knows `warn` and falls back to INFO (0.1.17), logging a line
    per request for `consistent_hash` and `power_of_two`. The core reads
    RUST_LOG first, so the level goes there.
    """
    argv = [
        str(cache_dir() / "vllm-router" / "bin" / "vllm-router"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *backends,
        "--prometheus-port",
        str(metrics_port),
    ]
    if policy:
        argv += ["--policy", policy]
    return argv, bench_env(RUST_LOG="warn")


def start_vllm_router(
    backends: Sequence[str], log_dir: Path, policy: str | None = None
) -> Target:
    """vllm-router over `backends` (its default policy unless `policy`)."""
    port = free_port()
    argv, env = vllm_router_command(backends, port, free_port(), policy)
    name = f"vllm-router-{policy or 'default'}"
    proc = start(name, argv, log_dir, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, url + "/health", timeout_s=90)
    except RuntimeError:
        stop(proc)
        raise
    return Target(proc, url)


def litellm_workers() -> int:
    """LiteLLM's worker processes: one per core this process may use, as its
    docs advise."""
    return len(os.sched_getaffinity(0))


def litellm_config(backends: Sequence[str]) -> dict[str, object]:
    """The LiteLLM proxy's config: one deployment per backend, with the
    settings of LiteLLM's own benchmark config (no callbacks, no retries).

    Each deployment's `model_info` prices it (at zero): the cost of every
    answer is then looked up in the deployment's own entry, not searched for
    under the served model's name in the cost map.
    """
    deployments = [
        {
            "model_name": MODEL,
            "litellm_params": {
                "model": f"openai/{MODEL}",
                "api_base": backend + "/v1",
                "api_key": "none",
            },
            "model_info": {
                "mode": "chat",
                "input_cost_per_token": 0.0,
                "output_cost_per_token": 0.0,
            },
        }
        for backend in backends
    ]
    return {
        "model_list": deployments,
        "litellm_settings": {"callbacks": [], "num_retries": 0},
    }


LITELLM_LOG_CONFIG: dict[str, object] = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {
        "default": {
            "()": "uvicorn.logging.DefaultFormatter",
            "fmt": "%(levelprefix)s %(message)s",
            "use_colors": False,
        },
    },
    "handlers": {
        "default": {
            "formatter": "default",
            "class": "logging.StreamHandler",
            "stream": "ext://sys.stderr",
        },
    },
    "loggers": {
        "uvicorn": {"handlers": ["default"], "level": "INFO", "propagate": False},
        # No handler and no propagation: what uvicorn's `access_log=False` does,
        # which LiteLLM's CLI has no option for.
        "uvicorn.access": {"handlers": [], "propagate": False},
    },
}
"""uvicorn's logging for LiteLLM (`--log_config`): its own lines, no access log."""


LITELLM_HEALTHCHECK_S = 60
"""How long uvicorn's supervisor waits for a LiteLLM worker's answer before it
kills the worker (`--timeout_worker_healthcheck`): at its 5 s default it killed
a worker still importing LiteLLM on a busy 2-core machine, and could kill one
starved of CPU under load."""


def litellm_argv(config: Path, log_config: Path, port: int) -> list[str]:
    """The LiteLLM proxy's command line."""
    return [
        str(cache_dir() / "litellm" / "bin" / "litellm"),
        "--config",
        str(config),
        "--log_config",
        str(log_config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        str(litellm_workers()),
        "--timeout_worker_healthcheck",
        str(LITELLM_HEALTHCHECK_S),
    ]


def start_litellm(backends: Sequence[str], log_dir: Path) -> Target:
    """The LiteLLM proxy with one model deployment per backend."""
    port = free_port()
    config = log_dir / "litellm.json"
    config.write_text(json.dumps(litellm_config(backends)))
    # uvicorn reads a log config as JSON only when the name ends in .json.
    log_config = log_dir / "litellm-log.json"
    log_config.write_text(json.dumps(LITELLM_LOG_CONFIG))
    env = bench_env(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY="False",
        LITELLM_LOG="ERROR",
        PYTHONPATH="",
    )
    argv = litellm_argv(config, log_config, port)
    proc = start("litellm", argv, log_dir, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, url + "/health/liveliness", timeout_s=180)
        # One worker answering is not all of them serving.
        wait_logged(proc, "Application startup complete.", litellm_workers(), 180)
    except RuntimeError:
        stop(proc)
        raise
    return Target(proc, url)
