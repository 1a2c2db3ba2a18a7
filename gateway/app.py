"""The app factory: routers, error handlers, and the parts' lifecycle."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import FastAPI
from starlette.types import ASGIApp

from citadel.gateway import __version__
from citadel.gateway.api import admin, errors, health, openai
from citadel.gateway.api.version import VersionHeaders
from citadel.gateway.deps import Deps
from citadel.gateway.graphql.router import graphql_router
from citadel.gateway.settings import GatewaySettings
from citadel.gateway.sources.base import Source, keep_running, start_supervised


def create_app(settings: GatewaySettings, deps: Deps) -> FastAPI:
    """The gateway's ASGI app, built from `deps` (nothing global)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        for start in deps.startup:
            await start()
        tasks = [_run_supervised(source) for source in deps.sources]
        try:
            yield
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            for stop in reversed(deps.shutdown):
                await stop()

    app = FastAPI(
        title="Citadel gateway",
        version=__version__,
        summary="One OpenAI-compatible endpoint for every model.",
        lifespan=lifespan,
    )
    app.state.deps = deps
    app.state.settings = settings
    app.include_router(openai.router)
    app.include_router(health.router)
    if not settings.metrics_port:
        app.include_router(health.metrics_router)
    app.include_router(admin.router)
    app.include_router(graphql_router(settings.graphql_init_timeout_s))
    app.add_middleware(VersionHeaders)
    errors.install(app)
    return app


def _run_supervised(source: Source) -> asyncio.Task[None]:
    """Runs a source as a task, started again after a pause each time it ends
    (logged), as each Kubernetes watch is.

    Run once, a source that died with an error none of its own retries covers
    stayed dead until the gateway restarted: the metrics scraper's (kv-aware
    routing then went without load figures), the routes or keys file's (their
    changes no longer seen).
    """
    name = type(source).__name__
    return start_supervised(keep_running(source.run, name), name)


def serving(app: FastAPI) -> ASGIApp:
    """What the server runs: the forwarding endpoints' fast path in front of
    `app` (see `openai.ForwardingFastPath`), which serves everything else."""
    return openai.ForwardingFastPath(app)
