"""The aiohttp client's requests, against a local stand-in for the API server."""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import Any

import kopf
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer

from citadel.operator.kube.client import (
    METADATA_ONLY,
    AioKube,
    ApiError,
    Kube,
    Listing,
)
from citadel.operator.kube.resources import CONFIGMAPS, LLMMODELS, NODES, PODS

pytestmark = pytest.mark.unit

CONFIGMAP = {
    "apiVersion": "v1",
    "kind": "ConfigMap",
    "metadata": {"name": "x", "namespace": "ns"},
    "data": {},
}


async def _apply_against(answer: web.Response) -> dict[str, Any]:
    """What `apply` returns from a server that always answers `answer`."""

    async def respond(request: web.Request) -> web.Response:
        return answer

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", respond)
    async with TestServer(app) as server:
        url = str(server.make_url("/"))
        kube = AioKube(lambda: kopf.ConnectionInfo(server=url))
        try:
            return await kube.apply(CONFIGMAP)
        finally:
            await kube.close()


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


@pytest.mark.parametrize(
    ("answer", "status", "reason", "message", "retry_after_s"),
    [
        # kube-apiserver's max-in-flight filter: plain text, and a Retry-After.
        (
            web.Response(
                status=429,
                text="Too many requests, please try again later.\n",
                headers={"Retry-After": "1"},
            ),
            429,
            "Too Many Requests",
            "Too many requests, please try again later.",
            1.0,
        ),
        # A proxy before it: an HTML page.
        (
            web.Response(
                status=502,
                text="<html><body>502 Bad Gateway</body></html>",
                content_type="text/html",
            ),
            502,
            "Bad Gateway",
            "<html><body>502 Bad Gateway</body></html>",
            None,
        ),
        (web.Response(status=503), 503, "Service Unavailable", "(no body)", None),
        # A Status object says it itself; APF says how long in its details.
        (
            web.json_response(
                {
                    "kind": "Status",
                    "reason": "TooManyRequests",
                    "message": "the server has received too many requests",
                    "details": {"retryAfterSeconds": 2},
                },
                status=429,
            ),
            429,
            "TooManyRequests",
            "the server has received too many requests",
            2.0,
        ),
        (
            web.json_response(
                {"kind": "Status", "reason": "Invalid", "message": "bad"}, status=422
            ),
            422,
            "Invalid",
            "bad",
            None,
        ),
    ],
)
async def test_every_refusal_is_an_api_error(
    answer: web.Response,
    status: int,
    reason: str,
    message: str,
    retry_after_s: float | None,
) -> None:
    """The API server answers with a Status object, except where it cannot;
    an answer that is not one failed as a JSON decoding error, which nothing
    expects (it ended the route publisher for good)."""
    with pytest.raises(ApiError) as err:
        await _apply_against(answer)
    assert (err.value.status, err.value.reason) == (status, reason)
    assert err.value.message == message
    assert err.value.retry_after_s == retry_after_s
    assert err.value.retryable == (status != 422)


@pytest.mark.parametrize(
    "answer",
    [
        web.Response(text="<html>sign in</html>", content_type="text/html"),
        web.Response(text='{"kind": "ConfigMap", "data": {"key": "se'),  # cut short
        web.json_response(["not", "an", "object"]),
    ],
)
async def test_a_success_that_is_not_a_json_object_is_an_api_error(
    answer: web.Response,
) -> None:
    with pytest.raises(ApiError) as err:
        await _apply_against(answer)
    assert err.value.status == 0 and err.value.retryable
    assert err.value.reason == "InvalidResponse"
    # Its length and type only: it may be part of a Secret.
    assert "sign in" not in str(err.value) and '"se' not in str(err.value)


async def test_an_empty_success_is_an_empty_object() -> None:
    assert await _apply_against(web.Response(status=200)) == {}


# One call of each method of `Kube`, whatever the server answers.
CALLS: dict[str, Callable[[Kube], Awaitable[object]]] = {
    "apply": lambda kube: kube.apply(CONFIGMAP, subresource="status"),
    "get": lambda kube: kube.get(CONFIGMAPS, "x", "ns", cached=True),
    "json_patch": lambda kube: kube.json_patch(
        CONFIGMAPS, "x", "ns", [{"op": "remove", "path": "/data/key"}]
    ),
    "merge_patch": lambda kube: kube.merge_patch(
        LLMMODELS, "x", "ns", {"spec": {"replicas": 1}}, subresource="scale"
    ),
    "list": lambda kube: kube.list(PODS, "ns", label_selector="x=y"),
    "list_uids": lambda kube: kube.list_uids(PODS),
    "delete": lambda kube: kube.delete(CONFIGMAPS, "x", "ns", uid="u"),
    "create": lambda kube: kube.create(CONFIGMAP),
    "has_resource": lambda kube: kube.has_resource(PODS),
}


@pytest.mark.parametrize(
    "method",
    sorted(
        name
        for name, member in vars(Kube).items()
        if inspect.iscoroutinefunction(member)
    ),
)
@pytest.mark.parametrize(
    ("answer", "told"),
    [
        pytest.param(
            lambda: web.Response(status=429, headers={"Retry-After": "7"}),
            (429, 7.0),
            id="throttled",
        ),
        # No usable answer: still an ApiError, still told.
        pytest.param(
            lambda: web.Response(text="<html>", content_type="text/html"),
            (0, None),
            id="not-json",
        ),
    ],
)
async def test_every_method_tells_its_refusals(
    method: str,
    answer: Callable[[], web.Response],
    told: tuple[int, float | None],
) -> None:
    """Whichever method of `Kube` got it, the ApiError reaches `on_refusal`
    (where the process remembers a Retry-After) before it is raised: a method
    added to `Kube` has a case here, and fails it unless its requests go
    through the client's one error path."""

    async def respond(request: web.Request) -> web.Response:
        return answer()

    heard: list[ApiError] = []
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", respond)
    async with TestServer(app) as server:
        url = str(server.make_url("/"))
        kube = AioKube(lambda: kopf.ConnectionInfo(server=url), on_refusal=heard.append)
        try:
            with pytest.raises(ApiError) as err:
                await CALLS[method](kube)
        finally:
            await kube.close()
    assert heard == [err.value]
    assert (err.value.status, err.value.retry_after_s) == told


async def test_what_succeeds_tells_nothing() -> None:
    heard: list[ApiError] = []

    async def respond(request: web.Request) -> web.Response:
        return web.Response(status=404 if request.method == "GET" else 200)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", respond)
    async with TestServer(app) as server:
        url = str(server.make_url("/"))
        kube = AioKube(lambda: kopf.ConnectionInfo(server=url), on_refusal=heard.append)
        try:
            assert await kube.get(CONFIGMAPS, "x", "ns") is None  # not found
            assert await kube.apply(CONFIGMAP) == {}
        finally:
            await kube.close()
    assert heard == []


async def test_merge_patch_writes_the_scale_as_an_hpa_does() -> None:
    asked: list[tuple[str, str, str | None, dict[str, str], Any]] = []

    async def answer(request: web.Request) -> web.Response:
        asked.append(
            (
                request.method,
                request.path,
                request.headers.get("Content-Type"),
                dict(request.query),
                await request.json(),
            )
        )
        return web.json_response({"kind": "Scale", "spec": {"replicas": 3}})

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", answer)
    body = {"metadata": {"resourceVersion": "7"}, "spec": {"replicas": 3}}
    async with TestServer(app) as server:
        url = str(server.make_url("/"))
        kube = AioKube(lambda: kopf.ConnectionInfo(server=url))
        try:
            scale = await kube.merge_patch(
                LLMMODELS, "mixtral", "llm", body, subresource="scale"
            )
        finally:
            await kube.close()
    assert scale["spec"] == {"replicas": 3}
    assert asked == [
        (
            "PATCH",
            "/apis/citadel.ai/v1alpha1/namespaces/llm/llmmodels/mixtral/scale",
            "application/merge-patch+json",
            {"fieldManager": "citadel-operator"},
            body,
        )
    ]
