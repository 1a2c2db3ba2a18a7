"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from citadel.gateway.deps import DepsDep
from citadel.gateway.errors import NotReady

router = APIRouter(tags=["operations"])
metrics_router = APIRouter(tags=["operations"])
"""`/metrics`, on the HTTP port only when no port of its own serves it."""


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    """200 while the process serves requests."""
    return {"status": "ok"}


@router.get("/readyz", responses={503: {"description": "No routes loaded yet."}})
async def readyz(deps: DepsDep) -> dict[str, str]:
    """200 once a routing document is loaded; 503 before."""
    if not deps.catalog.loaded:
        raise NotReady("no routing document loaded yet", retry_after_s=1)
    return {"status": "ready"}


@metrics_router.get("/metrics", include_in_schema=False)
async def metrics(deps: DepsDep) -> Response:
    """Prometheus text exposition of the gateway's metrics."""
    return Response(
        generate_latest(deps.metrics.registry), media_type=CONTENT_TYPE_LATEST
    )
