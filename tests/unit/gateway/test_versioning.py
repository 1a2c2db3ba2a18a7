"""The API version on every response, and deprecation headers when set."""

from __future__ import annotations

from datetime import UTC, datetime

import httpx
import pytest
from fastapi import FastAPI

from citadel.gateway.api.version import VersionHeaders
from citadel.gateway.versioning import API_VERSION, Deprecation, response_headers

pytestmark = pytest.mark.unit


async def test_every_response_reports_the_version(kit: object) -> None:
    harness = kit.build()  # type: ignore[attr-defined]
    async with harness.client() as client:
        for path in ("/healthz", "/v1/models", "/nowhere"):
            reply = await client.get(path)
            assert reply.headers["x-citadel-api-version"] == API_VERSION


async def test_deprecated_paths_get_deprecation_and_sunset() -> None:
    app = FastAPI()

    @app.get("/v1/old")
    async def old() -> dict[str, str]:
        return {}

    gone = Deprecation(
        since=datetime(2030, 1, 1, tzinfo=UTC), sunset=datetime(2030, 7, 1, tzinfo=UTC)
    )
    wrapped = VersionHeaders(app, {"/v1/old": gone})
    transport = httpx.ASGITransport(app=wrapped)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as client:
        reply = await client.get("/v1/old")
    assert reply.headers["deprecation"] == "@1893456000"
    assert reply.headers["sunset"] == "Mon, 01 Jul 2030 00:00:00 GMT"
    assert 'rel="deprecation"' in reply.headers["link"]


def test_undeprecated_paths_get_only_the_version() -> None:
    assert response_headers("/v1/chat/completions") == [
        (b"x-citadel-api-version", API_VERSION.encode())
    ]
