"""Introspection for operators (admin keys only): what the gateway routes to."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from citadel.gateway.deps import DepsDep, PrincipalDep, RequestIdDep
from citadel.gateway.errors import AdminOnly
from citadel.gateway.services.auth import Role

router = APIRouter(prefix="/admin", tags=["admin"])


@router.get("/replicas", responses={403: {"description": "Not an admin key."}})
async def replicas(
    deps: DepsDep, rid: RequestIdDep, principal: PrincipalDep
) -> dict[str, Any]:
    """Every model with the replicas that take its requests now, and their state."""
    if principal.key is not None and principal.key.role is not Role.ADMIN:
        raise AdminOnly("This endpoint needs a key with the admin role.")
    now = deps.clock()
    max_age_s = deps.load_max_age_s
    models = [
        {
            "name": route.name,
            "namespace": route.namespace,
            "servedName": route.served_name,
            "aliases": list(route.aliases),
            "adapters": list(route.adapters),
            "strategy": route.strategy.value,
            "replicas": [
                {
                    "url": r.url,
                    "inFlight": r.in_flight,
                    "ejected": not r.available(now),
                    # null: not exported, or no report (never read, or
                    # the last read failed), where a 0 read as idle.
                    "running": r.load.running,
                    "waiting": r.load.waiting,
                    "kvCacheUsage": r.load.kv_cache_usage,
                    # Since when the load is unknown, and whether a report
                    # is too old to count.
                    "loadAgeS": _age(now, r.load_read_at),
                    "loadStale": r.load.stale(now, max_age_s),
                }
                for r in deps.catalog.replicas(route)
            ],
        }
        for route in deps.catalog.routes()
    ]
    return {"models": models}


def _age(now: float, then: float | None) -> float | None:
    """Seconds from `then` to `now` (None: never)."""
    return None if then is None else round(now - then, 3)
