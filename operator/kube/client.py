"""The Kubernetes client interface and its aiohttp implementation.

Writes are server-side apply (`application/apply-patch+yaml`, field manager
`citadel-operator`, force): applying the same object twice is a no-op, fields the
operator stopped setting are removed, and fields other managers own are left alone.
"""

from __future__ import annotations

import asyncio
import json
import math
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp
import kopf

from citadel.operator import names
from citadel.operator.kube.resources import Resource, resource_for

Manifest = dict[str, Any]
Login = Callable[[], kopf.ConnectionInfo]

# Statuses worth retrying: conflicts, throttling, timeouts and server trouble.
RETRYABLE = frozenset({0, 404, 408, 409, 425, 429, 500, 502, 503, 504})
# A list of the objects' metadata alone (PartialObjectMetadataList), or the
# whole objects from a server that cannot.
METADATA_ONLY = (
    "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1, application/json"
)


@dataclass(frozen=True)
class Listing:
    """Which objects a list found, and as of when.

    Attributes:
        uids: the objects' uids.
        resource_version: the list's own resourceVersion (the state it shows).
    """

    uids: frozenset[str]
    resource_version: str


class ApiError(Exception):
    """An API request failed.

    Attributes:
        status: the HTTP status; 0 when no answer came (the server could not be
            reached), or one that is not JSON although it says it succeeded.
        reason: the Status object's reason, such as `NotFound` or `Invalid`
            (the HTTP reason phrase when the answer is not a Status).
        message: the Status object's message (else the start of the answer).
        retry_after_s: how long the server asked the client to wait before
            trying again (its Retry-After header, else the Status's
            retryAfterSeconds), if it said.
    """

    def __init__(
        self,
        status: int,
        reason: str,
        message: str,
        *,
        retry_after_s: float | None = None,
    ) -> None:
        super().__init__(f"{status} {reason}: {message}")
        self.status = status
        self.reason = reason
        self.message = message
        self.retry_after_s = retry_after_s

    @property
    def retryable(self) -> bool:
        """True when the same request may succeed later without a spec change."""
        return self.status in RETRYABLE


# What a client tells each ApiError it raises, before raising it.
OnRefusal = Callable[[ApiError], None]


class Kube(Protocol):
    """What the operator needs from the Kubernetes API."""

    async def apply(
        self, obj: Manifest, *, subresource: str = "", dry_run: bool = False
    ) -> Manifest:
        """Server-side applies `obj` (or its `status` with subresource="status");
        with `dry_run`, returns what the object would become and stores nothing."""
        ...

    async def get(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        cached: bool = False,
    ) -> Manifest | None:
        """The object, or None when it does not exist.

        With `cached`, the API server answers from its watch cache (it may be
        milliseconds behind) instead of reading etcd.
        """
        ...

    async def json_patch(
        self,
        resource: Resource,
        name: str,
        namespace: str | None,
        operations: list[Manifest],
    ) -> Manifest:
        """Applies a JSON patch (RFC 6902): for what server-side apply cannot do,
        such as removing a field another field manager also owns. A failed `test`
        operation raises ApiError (422)."""
        ...

    async def merge_patch(
        self,
        resource: Resource,
        name: str,
        namespace: str | None,
        body: Manifest,
        *,
        subresource: str = "",
    ) -> Manifest:
        """Applies a JSON merge patch (RFC 7386), to a subresource such as
        `scale` if given: what an HPA sends. A `metadata.resourceVersion` in
        `body` is a precondition: another version is a 409 ApiError."""
        ...

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
    ) -> list[Manifest]:
        """The objects in a namespace (every namespace when None)."""
        ...

    async def list_uids(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
    ) -> Listing:
        """Which objects exist in a namespace (every namespace when None), from
        the API server's watch cache and with their metadata alone."""
        ...

    async def delete(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        uid: str | None = None,
    ) -> bool:
        """Deletes an object; False when it did not exist. With `uid`, only the
        object of that uid: another one of that name is a 409 ApiError."""
        ...

    async def create(self, obj: Manifest) -> Manifest:
        """Creates an object; a 409 ApiError when one of that name exists (for
        Events, which are never applied, and claims that must not be merged into
        someone else's)."""
        ...

    async def has_resource(self, resource: Resource) -> bool:
        """True when the API server serves the resource (CRD installed)."""
        ...


class AioKube:
    """`Kube` over aiohttp, with the credentials Kopf's login functions find."""

    def __init__(
        self,
        login: Login,
        *,
        timeout: float = 30.0,
        on_refusal: OnRefusal | None = None,
    ) -> None:
        """Creates a client; the connection opens on the first request.

        Args:
            login: returns fresh credentials; called again after a 401.
            timeout: seconds per request.
            on_refusal: told every ApiError a request raises (a refusal, or
                no usable answer), whichever method sent it: where the
                process hears how long the API server asked it to wait
                (`heed.AskedWait.heed`).
        """
        self._login = login
        self._on_refusal = on_refusal
        self._timeout = aiohttp.ClientTimeout(total=timeout)
        self._session: aiohttp.ClientSession | None = None
        self._info: kopf.ConnectionInfo | None = None
        self._lock = asyncio.Lock()

    async def _open(self, *, fresh: bool = False) -> aiohttp.ClientSession:
        async with self._lock:
            if self._session is not None and not fresh:
                return self._session
            if self._session is not None:
                await self._session.close()
            self._info = self._login()
            ctx: ssl.SSLContext | bool = self._info.as_ssl_context()
            if self._info.insecure:
                ctx = False
            self._session = aiohttp.ClientSession(
                base_url=self._info.server.rstrip("/") + "/",
                headers=self._info.as_http_headers(),
                connector=aiohttp.TCPConnector(ssl=ctx, limit=64),
                timeout=self._timeout,
            )
            return self._session

    async def close(self) -> None:
        """Closes the connection pool."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def _request(
        self,
        method: str,
        path: str,
        *,
        params: dict[str, str] | None = None,
        body: Manifest | list[Manifest] | None = None,
        content_type: str = "application/json",
        accept: str | None = None,
    ) -> Manifest | None:
        """The answer to one request: every method's one way to the API server,
        and so the one place its errors pass (`on_refusal`)."""
        try:
            return await self._send(method, path, params, body, content_type, accept)
        except ApiError as err:
            if self._on_refusal is not None:
                self._on_refusal(err)
            raise

    async def _send(
        self,
        method: str,
        path: str,
        params: dict[str, str] | None,
        body: Manifest | list[Manifest] | None,
        content_type: str,
        accept: str | None,
    ) -> Manifest | None:
        for attempt in (1, 2):
            session = await self._open(fresh=attempt == 2)
            data = None if body is None else json.dumps(body)
            headers = {"Content-Type": content_type} if body is not None else {}
            if accept is not None:
                headers["Accept"] = accept
            try:
                async with session.request(
                    method, path.lstrip("/"), params=params, data=data, headers=headers
                ) as response:
                    if response.status == 401 and attempt == 1:
                        continue  # a rotated token: log in again once
                    if response.status == 404 and method in ("GET", "DELETE"):
                        return None
                    raw = await response.read()
                    if response.status >= 400:
                        raise _refusal(
                            response.status, response.reason, raw, response.headers
                        )
                    return _answer(response.status, raw, response.content_type)
            except (aiohttp.ClientError, TimeoutError) as err:
                raise ApiError(0, type(err).__name__, str(err)) from err
        raise ApiError(401, "Unauthorized", "the credentials were refused twice")

    async def apply(
        self, obj: Manifest, *, subresource: str = "", dry_run: bool = False
    ) -> Manifest:
        resource = resource_for(obj["apiVersion"], obj["kind"])
        meta = obj["metadata"]
        path = resource.path(meta.get("namespace"), meta["name"], subresource)
        params = {"fieldManager": names.FIELD_MANAGER, "force": "true"}
        if dry_run:
            params["dryRun"] = "All"
        result = await self._request(
            "PATCH",
            path,
            params=params,
            body=obj,
            content_type="application/apply-patch+yaml",
        )
        return result or {}

    async def get(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        cached: bool = False,
    ) -> Manifest | None:
        # resourceVersion=0: any version the server holds, so its cache answers.
        params = {"resourceVersion": "0"} if cached else None
        return await self._request("GET", resource.path(namespace, name), params=params)

    async def json_patch(
        self,
        resource: Resource,
        name: str,
        namespace: str | None,
        operations: list[Manifest],
    ) -> Manifest:
        result = await self._request(
            "PATCH",
            resource.path(namespace, name),
            params={"fieldManager": names.FIELD_MANAGER},
            body=operations,
            content_type="application/json-patch+json",
        )
        return result or {}

    async def merge_patch(
        self,
        resource: Resource,
        name: str,
        namespace: str | None,
        body: Manifest,
        *,
        subresource: str = "",
    ) -> Manifest:
        result = await self._request(
            "PATCH",
            resource.path(namespace, name, subresource),
            params={"fieldManager": names.FIELD_MANAGER},
            body=body,
            content_type="application/merge-patch+json",
        )
        return result or {}

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
    ) -> list[Manifest]:
        params = {"labelSelector": label_selector} if label_selector else None
        result = await self._request("GET", resource.path(namespace), params=params)
        return list((result or {}).get("items", []))

    async def list_uids(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
    ) -> Listing:
        params = {"resourceVersion": "0"}
        if label_selector:
            params["labelSelector"] = label_selector
        result = await self._request(
            "GET", resource.path(namespace), params=params, accept=METADATA_ONLY
        )
        result = result or {}
        # An empty PartialObjectMetadataList has `"items": null`.
        items = result.get("items") or []
        return Listing(
            uids=frozenset(str(item["metadata"]["uid"]) for item in items),
            resource_version=str(result.get("metadata", {}).get("resourceVersion")),
        )

    async def delete(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        uid: str | None = None,
    ) -> bool:
        body: Manifest = {"propagationPolicy": "Background"}
        if uid is not None:
            body["preconditions"] = {"uid": uid}
        path = resource.path(namespace, name)
        return await self._request("DELETE", path, body=body) is not None

    async def create(self, obj: Manifest) -> Manifest:
        resource = resource_for(obj["apiVersion"], obj["kind"])
        path = resource.path(obj["metadata"].get("namespace"))
        params = {"fieldManager": names.FIELD_MANAGER}
        return await self._request("POST", path, params=params, body=obj) or {}

    async def has_resource(self, resource: Resource) -> bool:
        prefix = f"/apis/{resource.api_version}" if resource.group else "/api/v1"
        found = await self._request("GET", prefix)
        return any(
            r.get("name") == resource.plural for r in (found or {}).get("resources", [])
        )


# How much of an answer that is not a Status goes into an ApiError's message.
EXCERPT_CHARS = 200


def _refusal(
    status: int, phrase: str | None, raw: bytes, headers: Mapping[str, str]
) -> ApiError:
    """The ApiError for an answer of status 400 or more, whatever its body.

    The API server answers with a Status object, except where it cannot: its
    overload filter answers 429 in plain text, and proxies before it answer 502
    or 503 with HTML. Those fail as their status says (429 and 5xx retryable),
    not as a JSON decoding error that no caller expects: one ended the route
    publisher for good.
    """
    try:
        payload = json.loads(raw) if raw.strip() else None
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        excerpt = raw.decode("utf-8", "replace").strip()[:EXCERPT_CHARS]
        return ApiError(
            status,
            phrase or "Error",
            excerpt or "(no body)",
            retry_after_s=_retry_after_s({}, headers),
        )
    return ApiError(
        status,
        str(payload.get("reason", phrase or "Error")),
        str(payload.get("message", payload)),
        retry_after_s=_retry_after_s(payload, headers),
    )


def _answer(status: int, raw: bytes, content_type: str) -> Manifest:
    """The object a successful answer holds (empty for an empty body).

    Raises:
        ApiError: the body is not a JSON object (status 0, retryable): a
            proxy's page, or an answer cut short. Its length and type alone
            are told, since it may be part of an object such as a Secret.
    """
    if not raw.strip():
        return {}
    try:
        payload = json.loads(raw)
    except ValueError:
        payload = None
    if not isinstance(payload, dict):
        raise ApiError(
            0,
            "InvalidResponse",
            f"a {status} answer that is not a JSON object "
            f"({len(raw)} bytes of {content_type or 'no content type'})",
        )
    return payload


def _retry_after_s(status: Manifest, headers: Mapping[str, str]) -> float | None:
    """The wait a refusal asks for: the Retry-After header (delta-seconds; the
    API server never sends a date), else a Status's retryAfterSeconds."""
    details = status.get("details")
    for value in (
        headers.get("Retry-After"),
        details.get("retryAfterSeconds") if isinstance(details, dict) else None,
    ):
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if seconds >= 0 and math.isfinite(seconds):
            return seconds
    return None
