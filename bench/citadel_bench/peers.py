"""Starting the proxies under test in front of given backends: Citadel's gateway,
vllm-router and the LiteLLM proxy (the last two from their venvs under
$CITADEL_CACHE/bench, installed by bench/peers/install.sh)."""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from pathlib import Path

from citadel_bench.procs import Proc, bench_env, free_port, start, stop, wait_http

MODEL = "sim"


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


def start_citadel(
    backends: Sequence[str],
    log_dir: Path,
    strategy: str | None = None,
    name: str = "citadel",
) -> tuple[Proc, str]:
    """The gateway on a routes file listing `backends`; auth disabled."""
    port = free_port()
    route: dict[str, object] = {
        "name": MODEL,
        "namespace": "bench",
        "servedName": MODEL,
        "service": MODEL,
        "endpoints": list(backends),
        "ready": True,
    }
    if strategy:
        route["strategy"] = strategy
    routes = log_dir / f"{name}-routes.json"
    routes.write_text(json.dumps({"schemaVersion": 1, "models": [route]}))
    env = bench_env(
        CITADEL_GATEWAY_HOST="127.0.0.1",
        CITADEL_GATEWAY_PORT=str(port),
        CITADEL_GATEWAY_ROUTES_SOURCE="file",
        CITADEL_GATEWAY_ROUTES_FILE=str(routes),
        CITADEL_GATEWAY_AUTH="disabled",
        CITADEL_GATEWAY_METRICS_SCRAPE_PERIOD_S="0.5",
    )
    gateway = Path(sys.executable).with_name("citadel-gateway")
    proc = start(name, [str(gateway)], log_dir, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, url + "/readyz")
    except RuntimeError:
        stop(proc)
        raise
    return proc, url


def start_vllm_router(
    backends: Sequence[str], log_dir: Path, policy: str | None = None
) -> tuple[Proc, str]:
    """vllm-router over `backends` (its default policy unless `policy`)."""
    port = free_port()
    argv = [
        str(cache_dir() / "vllm-router" / "bin" / "vllm-router"),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--worker-urls",
        *backends,
        "--log-level",
        "warning",
        "--prometheus-port",
        str(free_port()),
    ]
    if policy:
        argv += ["--policy", policy]
    name = f"vllm-router-{policy or 'default'}"
    proc = start(name, argv, log_dir, env=bench_env())
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, url + "/health", timeout_s=90)
    except RuntimeError:
        stop(proc)
        raise
    return proc, url


def start_litellm(backends: Sequence[str], log_dir: Path) -> tuple[Proc, str]:
    """The LiteLLM proxy with one model deployment per backend."""
    port = free_port()
    deployments = [
        {
            "model_name": MODEL,
            "litellm_params": {
                "model": f"openai/{MODEL}",
                "api_base": backend + "/v1",
                "api_key": "none",
            },
        }
        for backend in backends
    ]
    config = log_dir / "litellm.json"
    config.write_text(json.dumps({"model_list": deployments}))
    venv = cache_dir() / "litellm"
    env = bench_env(
        LITELLM_LOCAL_MODEL_COST_MAP="True",
        LITELLM_TELEMETRY="False",
        LITELLM_LOG="ERROR",
        PYTHONPATH="",
    )
    argv = [
        str(venv / "bin" / "litellm"),
        "--config",
        str(config),
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--num_workers",
        "1",
    ]
    proc = start("litellm", argv, log_dir, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, url + "/health/liveliness", timeout_s=180)
    except RuntimeError:
        stop(proc)
        raise
    return proc, url
