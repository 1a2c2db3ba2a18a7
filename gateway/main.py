"""`citadel-gateway`: the gateway's entry point (the only place that reads the
environment)."""

from __future__ import annotations

import argparse
import gc
import os

import uvicorn

from citadel.gateway import __version__, logs
from citadel.gateway.app import create_app
from citadel.gateway.rpc.server import add_grpc
from citadel.gateway.settings import GatewaySettings
from citadel.gateway.wiring import build_deps


def main(argv: list[str] | None = None) -> int:
    """Serves the gateway until SIGTERM or SIGINT (requests in flight finish).

    Settings come from `CITADEL_GATEWAY_*` environment variables (see
    `citadel.gateway.settings`).
    """
    parser = argparse.ArgumentParser(
        prog="citadel-gateway",
        description="Citadel's OpenAI-compatible gateway; configured by "
        "CITADEL_GATEWAY_* environment variables.",
    )
    parser.add_argument("--version", action="version", version=__version__)
    parser.parse_args(argv)
    settings = GatewaySettings()
    logs.configure(settings.log_format, settings.log_level)
    deps = build_deps(settings, dict(os.environ))
    if settings.grpc_port:
        add_grpc(
            deps,
            settings.host,
            settings.grpc_port,
            settings.max_body_bytes,
            stop_grace_s=settings.shutdown_grace_s,
        )
    app = create_app(settings, deps)
    # What start-up built (modules, FastAPI's routes, pydantic's validators;
    # about 105,700 objects from the imports alone: len(gc.get_objects()) after
    # importing this module) lives as long as the process.
    # Frozen, it is left out of full collections, which otherwise walked all of
    # it and found nothing to free: 55-67 ms each, every few seconds under load,
    # with every request in flight waiting (gc.callbacks, concurrency 64;
    # commit 36d70e5). The json p99 at concurrency 64 went from 78 ms (make
    # bench at ededc39) to 30 ms (at 36d70e5). Garbage is collected first:
    # frozen, it would never be freed.
    gc.collect()
    gc.freeze()
    uvicorn.run(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        http="httptools",
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
    )
    return 0
