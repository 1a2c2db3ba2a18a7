"""`citadel-gateway`: the gateway's entry point (the only place that reads the
environment)."""

from __future__ import annotations

import argparse
import asyncio
import gc
import os
import socket
from collections.abc import Awaitable, Callable

import uvicorn
from prometheus_client import CollectorRegistry, start_http_server
from pydantic import ValidationError

from citadel.gateway import __version__, logs
from citadel.gateway.app import create_app, serving
from citadel.gateway.kube.config import KubeConfigError
from citadel.gateway.metrics import GatewayMetrics
from citadel.gateway.protocol import HeadRefusal, RefusedHeads, head_bounded
from citadel.gateway.rpc.server import add_grpc
from citadel.gateway.settings import GatewaySettings, explain
from citadel.gateway.wiring import StartupError, build_deps


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
    try:
        settings = GatewaySettings()
    except ValidationError as error:
        parser.exit(2, f"citadel-gateway: invalid settings\n{explain(error)}\n")
    logs.configure(settings.log_format, settings.log_level)
    try:
        deps = build_deps(settings, dict(os.environ))
    except (KubeConfigError, StartupError) as error:
        # Outside a cluster with the default routes source, or without the
        # routes or keys file: the message says which setting to give; a
        # traceback would bury it.
        parser.exit(2, f"citadel-gateway: {error}\n")
    draining: list[Callable[[], Awaitable[None]]] = []
    if settings.grpc_port:
        grpc_server = add_grpc(
            deps,
            settings.host,
            settings.grpc_port,
            settings.max_body_bytes,
            stop_grace_s=settings.shutdown_grace_s,
        )
        draining.append(grpc_server.stop)
    app = serving(create_app(settings, deps))
    stop_metrics = _serve_metrics(settings, deps.metrics.registry)

    async def mark_stopping() -> None:
        deps.proxy.stopping(settings.shutdown_grace_s)

    draining.append(mark_stopping)
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
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        loop="uvloop",
        # httptools with a bound on the request line and headers: httptools
        # has none, and one endless header stalled the event loop; and on the
        # time they take, which uvicorn does not bound (Slowloris).
        http=head_bounded(
            settings.max_header_bytes,
            RefusedHeads(_head_counter(deps.metrics)),
            head_timeout_s=settings.head_timeout_s,
        ),
        access_log=False,
        log_config=None,
        timeout_graceful_shutdown=settings.shutdown_grace_s,
        # A GraphQL WebSocket message carries a whole request: the same limit
        # as a request body (uvicorn closes the socket past it, code 1009).
        ws_max_size=settings.max_body_bytes,
    )
    server = _Server(config, draining)
    try:
        server.run()
    finally:
        stop_metrics()
    return 0 if server.started else 3  # uvicorn's code for a failed start


def _head_counter(metrics: GatewayMetrics) -> Callable[[HeadRefusal], None]:
    """Counts a refused request head in the metric of its reason."""
    counters = {
        HeadRefusal.TOO_LARGE: metrics.headers_too_large,
        HeadRefusal.TIMED_OUT: metrics.head_timeouts,
    }
    return lambda reason: counters[reason].inc()


def _serve_metrics(
    settings: GatewaySettings, registry: CollectorRegistry
) -> Callable[[], None]:
    """Serves `/metrics` on `settings.metrics_port`, if set, from a thread of its
    own (prometheus_client's server); returns what stops it."""
    if not settings.metrics_port:
        return lambda: None
    server, _ = start_http_server(
        settings.metrics_port, addr=settings.host, registry=registry
    )

    def stop() -> None:
        server.shutdown()
        server.server_close()

    return stop


class _Server(uvicorn.Server):
    """uvicorn, draining the gateway's other doors beside its own.

    uvicorn drains HTTP for the shutdown grace and only then shuts the app down,
    which stopped gRPC: gRPC took the grace a second time, past the pod's
    termination grace period, and went on taking new calls meanwhile.
    """

    def __init__(
        self, config: uvicorn.Config, draining: list[Callable[[], Awaitable[None]]]
    ) -> None:
        super().__init__(config)
        self._draining = draining

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        drains = [asyncio.ensure_future(drain()) for drain in self._draining]
        try:
            await super().shutdown(sockets)
        finally:
            await asyncio.gather(*drains, return_exceptions=True)
