"""Liveness, readiness and the Prometheus endpoint."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
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
async def metrics(request: Request, deps: DepsDep) -> Response:
    """Prometheus text exposition of the gateway's metrics; only the series
    named by `name[]` parameters when there are any, as prometheus_client's own
    server (the metrics port) does: the operator's autoscaler reads
    `?name[]=citadel_gateway_model_requests` every few seconds."""
    registry = deps.metrics.registry
    names = request.query_params.getlist("name[]")
    text = generate_latest(registry.restricted_registry(names) if names else registry)
    return Response(text, media_type=CONTENT_TYPE_LATEST)
