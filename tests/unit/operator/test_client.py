"""The aiohttp client's requests, against a local stand-in for the API server."""

from __future__ import annotations

from typing import Any

import kopf
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from citadel.operator.kube.client import METADATA_ONLY, AioKube, Listing
from citadel.operator.kube.resources import NODES, PODS

pytestmark = pytest.mark.unit


async def test_list_uids_asks_the_cache_for_metadata_alone() -> None:
    asked: list[tuple[str, dict[str, str], str | None]] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append((request.path, dict(request.query), request.headers.get("Accept")))
        items = [{"metadata": {"uid": "a"}}, {"metadata": {"uid": "b"}}]
        body: dict[str, Any] = {
            "kind": "PartialObjectMetadataList",
            "metadata": {"resourceVersion": "42"},
            # An empty one says null, not [] (kube-apiserver 1.36).
            "items": items if request.path.endswith("/pods") else None,
        }
        return web.json_response(body)

    app = web.Application()
    app.router.add_get("/{tail:.*}", answer)
    async with TestServer(app) as server:
        url = str(server.make_url("/"))
        kube = AioKube(lambda: kopf.ConnectionInfo(server=url))
        try:
            pods = await kube.list_uids(PODS, "llm", label_selector="x=y")
            nodes = await kube.list_uids(NODES)
        finally:
            await kube.close()
    assert pods == Listing(frozenset({"a", "b"}), "42")
    assert nodes == Listing(frozenset(), "42")
    assert asked == [
        (
            "/api/v1/namespaces/llm/pods",
            {"resourceVersion": "0", "labelSelector": "x=y"},
            METADATA_ONLY,
        ),
        ("/api/v1/nodes", {"resourceVersion": "0"}, METADATA_ONLY),
    ]
