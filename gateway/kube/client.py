"""A small async Kubernetes API client: what the gateway and the key CLI need.

Objects are plain dicts as the API returns them. `list_watch` keeps a view in sync:
it lists, then watches from the list's resourceVersion, resumes from the last one
seen after a dropped connection, lists again (after a short, jittered pause that
grows while it repeats) when the server answers 410 Gone or has not seen the version
yet, backs off when watches end at once without an event, and backs off with jitter
(honouring Retry-After) while lists and watches fail, an answer of a shape the API
does not define (a list without its resourceVersion, a watch line that is not an
object) counted as a failure. An error raised by one of its callbacks is logged with
the object it was given, and the view is listed afresh. It tells whoever asks (the
gateway's metrics) when its view is in sync and when a list or watch failed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from typing import Any

import aiohttp
import orjson

from citadel.gateway.kube.config import KubeConfig

log = logging.getLogger(__name__)

Obj = dict[str, Any]


class KubeApiError(Exception):
    """The API server refused a request.

    Attributes:
        status: the HTTP status (or a watch ERROR event's code).
        retry_after_s: how long the server asked the client to wait before
            trying again (its Retry-After header, else the Status's
            retryAfterSeconds), if it said.
    """

    def __init__(
        self, status: int, message: str, retry_after_s: float | None = None
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.retry_after_s = retry_after_s


class UnexpectedAnswer(KubeApiError):
    """The API server said it succeeded (status 200) but answered with
    something of a shape its API does not define: a list without
    metadata.resourceVersion, a watch line that is JSON but not an event
    object. A fault of the server or of a proxy before it, retried as a
    refusal is."""

    def __init__(self, message: str) -> None:
        super().__init__(200, message)


class WatchExpired(KubeApiError):
    """410 Gone: the resourceVersion is too old; list again."""


class ResourceVersionTooLarge(KubeApiError):
    """504 Timeout, "Too large resource version": the API server has not seen
    the resourceVersion yet (it lags behind etcd, e.g. the one a connection
    failed over to); list again from etcd rather than wait for it."""


TOO_LARGE_CAUSE = "ResourceVersionTooLarge"
"""The Status cause an API server gives a version it has not seen yet."""
TOO_LARGE_MESSAGE = "Too large resource version"
"""What API servers 1.17.0 to 1.18.5, which gave no cause, said instead."""


def configmaps(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/configmaps"


def secrets(namespace: str) -> str:
    return f"/api/v1/namespaces/{namespace}/secrets"


def endpoint_slices(namespace: str) -> str:
    return f"/apis/discovery.k8s.io/v1/namespaces/{namespace}/endpointslices"


CONNECT_TIMEOUT_S = 10.0
"""How long a connection to the API server may take (TLS included)."""
WATCH_GRACE_S = 30.0
"""How long past its timeoutSeconds a watch may run before it is dropped."""
WATCH_SILENCE_S = 150.0
"""How long a watch may stay silent (no event, no bookmark) before it is dropped."""
WATCH_QUICK_S = 5.0
"""A watch that ends sooner than this without an event counts as empty."""
WATCH_BACKOFF_BASE_S = 0.5
"""The pause after one empty watch; it doubles with each empty watch in a row."""
WATCH_BACKOFF_MAX_S = 30.0
"""The longest pause between empty watches."""
RELIST_BACKOFF_BASE_S = 1.0
"""The longest pause before listing again after the first 410 (or version too
large) in a row; it doubles with each one in a row. The pause itself is drawn
from zero to it."""
RELIST_BACKOFF_MAX_S = 30.0
"""The longest pause before listing again."""
FAILURE_BACKOFF_MAX_S = 30.0
"""The longest pause after failed lists or watches (from `list_watch`'s
`retry_s`, doubling with each failure in a row), a Retry-After included."""


class KubeClient:
    """Talks to one API server over one pooled aiohttp session."""

    def __init__(self, config: KubeConfig) -> None:
        self._config = config
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        """Opens the session (inside the running event loop)."""
        connector = aiohttp.TCPConnector(ssl=self._config.ssl_context())
        self._session = aiohttp.ClientSession(
            self._config.server,
            connector=connector,
            timeout=aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=None
            ),
            # A watch event is one line: a large ConfigMap must fit in the buffer.
            read_bufsize=4 * 1024 * 1024,
        )

    async def close(self) -> None:
        """Closes the session."""
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _headers(self) -> dict[str, str]:
        headers = {"accept": "application/json"}
        token = self._config.bearer()
        if token:
            headers["authorization"] = f"Bearer {token}"
        return headers

    async def request(
        self,
        method: str,
        path: str,
        params: Mapping[str, str] | None = None,
        body: Obj | None = None,
        timeout_s: float = 30,
    ) -> Obj:
        """One API call; returns the decoded JSON answer.

        Raises:
            KubeApiError: the server answered with an error status.
        """
        if self._session is None:
            raise RuntimeError("KubeClient.start() was not called")
        data = orjson.dumps(body) if body is not None else None
        headers = self._headers()
        if data is not None:
            headers["content-type"] = "application/json"
        async with self._session.request(
            method,
            path,
            params=params,
            data=data,
            headers=headers,
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as response:
            payload = await response.read()
            if response.status >= 400:
                raise _api_error(response.status, payload, response.headers)
            result = orjson.loads(payload) if payload else {}
            if not isinstance(result, dict):
                # Its type only: the answer may hold a Secret's data.
                raise UnexpectedAnswer(
                    f"{method} {path}: an answer that is not an object "
                    f"({type(result).__name__})"
                )
            return result

    async def list(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> tuple[list[Obj], str]:
        """Every item at `path`, and the list's resourceVersion.

        Raises:
            KubeApiError: the server refused the list.
            UnexpectedAnswer: its answer has no resourceVersion, or items
                that are not objects.
        """
        answer = await self.request("GET", path, params)
        items = answer.get("items") or []
        meta = answer.get("metadata")
        version = meta.get("resourceVersion") if isinstance(meta, dict) else None
        if not isinstance(version, str) or not version:
            # Without it there is no version to watch from (a KeyError here
            # ended the watch for good).
            raise UnexpectedAnswer(f"a list of {path} without a resourceVersion")
        if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
            raise UnexpectedAnswer(f"a list of {path} whose items are not objects")
        return items, version

    async def watch(
        self,
        path: str,
        resource_version: str,
        params: Mapping[str, str] | None = None,
        timeout_s: int = 300,
    ) -> AsyncIterator[tuple[str, Obj]]:
        """(type, object) events after `resource_version`, until the server ends
        the watch.

        Raises:
            WatchExpired: the version is too old (list again).
            ResourceVersionTooLarge: the server has not seen the version yet
                (list again).
            KubeApiError: the server refused the watch, or ended it with an
                ERROR event.
            UnexpectedAnswer: a line that is JSON but not an event object.
        """
        if self._session is None:
            raise RuntimeError("KubeClient.start() was not called")
        query = {
            **(params or {}),
            "watch": "true",
            "resourceVersion": resource_version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": str(timeout_s),
        }
        # The server ends the watch after timeout_s and sends a bookmark about
        # every minute meanwhile; silence past these bounds is a connection
        # that is gone without a word (a lost control-plane node, a dropped NAT
        # entry), which would otherwise hold the watch, and stale routes or
        # revoked keys, for ever.
        bounds = aiohttp.ClientTimeout(
            total=timeout_s + WATCH_GRACE_S,
            sock_connect=CONNECT_TIMEOUT_S,
            sock_read=WATCH_SILENCE_S,
        )
        async with self._session.get(
            path, params=query, headers=self._headers(), timeout=bounds
        ) as response:
            if response.status >= 400:
                payload = await response.read()
                raise _api_error(response.status, payload, response.headers)
            async for line in response.content:
                if not line.strip():
                    continue
                kind, obj = _read_event(line)
                if kind == "ERROR":
                    code = obj.get("code")
                    status = code if isinstance(code, int) else 500
                    raise _api_error(status, orjson.dumps(obj))
                yield kind, obj


def _read_event(line: bytes) -> tuple[str, Obj]:
    """A watch line's (type, object).

    Raises:
        ValueError: the line is not JSON (orjson's error is one).
        UnexpectedAnswer: it is JSON, but not an object with a type and an
            object (an AttributeError here ended the watch for good).
    """
    event = orjson.loads(line)
    kind = event.get("type") if isinstance(event, dict) else None
    obj = event.get("object") if isinstance(event, dict) else None
    if not isinstance(kind, str) or not isinstance(obj, dict):
        # Its shape only: the line may hold a Secret's data.
        shape = (
            "an object without a type and an object"
            if isinstance(event, dict)
            else f"a JSON {type(event).__name__}"
        )
        raise UnexpectedAnswer(f"a watch line that is not an event: {shape}")
    return kind, obj


def _api_error(
    status: int, payload: bytes, headers: Mapping[str, str] | None = None
) -> KubeApiError:
    try:
        answer = orjson.loads(payload)
        message = str(answer.get("message", payload[:200]))
    except (orjson.JSONDecodeError, AttributeError):
        answer, message = {}, payload[:200].decode(errors="replace")
    if status == 410:
        return WatchExpired(status, message)
    if _too_large(answer):
        return ResourceVersionTooLarge(status, message)
    return KubeApiError(status, message, _retry_after_s(answer, headers or {}))


def _retry_after_s(status: Obj, headers: Mapping[str, str]) -> float | None:
    """The wait a refusal asks for: the Retry-After header (delta-seconds; the
    API server never sends a date), else a Status's retryAfterSeconds (all a
    watch's ERROR event has)."""
    for value in (
        headers.get("Retry-After"),
        _details(status).get("retryAfterSeconds"),
    ):
        try:
            seconds = float(value)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            continue
        if seconds >= 0 and seconds == seconds:  # not NaN
            return seconds
    return None


def _details(status: Obj) -> Obj:
    details = status.get("details")
    return details if isinstance(details, dict) else {}


def _too_large(status: Obj) -> bool:
    """Whether a Status says the resourceVersion asked for is one the server
    has not seen yet (read as client-go's reflector reads it)."""
    found = _details(status).get("causes")
    causes = (
        [c for c in found if isinstance(c, dict)] if isinstance(found, list) else []
    )
    if any(cause.get("reason") == TOO_LARGE_CAUSE for cause in causes):
        return True
    if status.get("reason") != "Timeout":
        return False
    return TOO_LARGE_MESSAGE in str(status.get("message", "")) or any(
        cause.get("message") == TOO_LARGE_MESSAGE for cause in causes
    )


async def list_watch(
    client: KubeClient,
    path: str,
    params: Mapping[str, str],
    on_sync: Callable[[list[Obj]], Awaitable[None] | None],
    on_event: Callable[[str, Obj], Awaitable[None] | None],
    on_health: Callable[[bool], None] | None = None,
    retry_s: float = 2.0,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[float, float], float] = random.uniform,
) -> None:
    """Keeps a view in sync until cancelled: `on_sync` with the full list after
    each (re-)list, `on_event` with each change after it.

    A callback that raises is logged with what it was given; the view is then
    listed afresh (after a pause, as after a failure), since the callback may
    have left it half updated. Callbacks should skip what they cannot read
    rather than raise: a list that keeps failing them keeps the view stale.

    Args:
        client: the API client.
        path: the collection to list and watch.
        params: query parameters for both (a label selector).
        on_sync: called with every item after each list.
        on_event: called with (type, object) for each change.
        on_health: told True when the view is in sync (after each list, and
            when a watch delivers or lasts after a failure), False after each
            failed list or watch, each list or event a callback could not
            take, and when an error no retry covers ends it.
        retry_s: the longest pause after the first failed list or watch in a
            row; it doubles with each failure in a row, up to
            `FAILURE_BACKOFF_MAX_S`, and the pause itself is drawn from half
            of it to all of it. A longer Retry-After is honoured, up to that
            cap too.
        sleep: how to pause (injected by tests).
        clock: monotonic seconds, to tell a watch that ended at once.
        jitter: a number between its two arguments (injected by tests).
    """
    report = on_health or _unreported
    version: str | None = None
    in_sync = False
    empty_in_row = 0
    relists_in_row = 0
    failures_in_row = 0
    while True:
        try:
            if version is None:
                items, listed = await client.list(path, params)
                await _sync(on_sync, items)
                version, failures_in_row = listed, 0
                in_sync = True
                report(True)
            started, delivered = clock(), False
            async for kind, obj in client.watch(path, version, params):
                delivered = True
                # In sync again: a later 410 or failure is a first one.
                relists_in_row = failures_in_row = 0
                if not in_sync:
                    in_sync = True
                    report(True)
                version = _version_of(obj) or version
                if kind != "BOOKMARK":
                    await _deliver(on_event, kind, obj)
            if delivered or clock() - started >= WATCH_QUICK_S:
                empty_in_row = relists_in_row = failures_in_row = 0
                if not in_sync:
                    in_sync = True
                    report(True)
                continue
            # An API server shutting down, or a proxy that closes long-lived
            # streams, ends each watch at once: re-opened at once, every
            # gateway spins a CPU and floods the API server. The jitter keeps
            # the gateways' watches from coming back all together.
            empty_in_row += 1
            pause = doubling_s(empty_in_row, WATCH_BACKOFF_BASE_S, WATCH_BACKOFF_MAX_S)
            pause *= jitter(0.5, 1.0)
            log.warning(
                "watch ended at once without an event; pausing",
                extra={"path": path, "empty_in_row": empty_in_row, "pause_s": pause},
            )
            await sleep(pause)
        except (WatchExpired, ResourceVersionTooLarge) as err:
            # A compaction or an API server's restart expires the watches of
            # every gateway replica, of every kind, together: listed again at
            # once, they all hit the API server (and etcd: the list is a
            # quorum read) in the same instant. A pause drawn from zero spreads
            # them; repeated, it grows. A version too large (an API server
            # behind etcd) is not waited out either: the list, from etcd,
            # gives a version to watch from, as client-go's reflector does.
            relists_in_row += 1
            longest = doubling_s(
                relists_in_row, RELIST_BACKOFF_BASE_S, RELIST_BACKOFF_MAX_S
            )
            pause = jitter(0.0, longest)
            why = "expired" if isinstance(err, WatchExpired) else "version too large"
            log.info(
                "watch version unusable; listing again",
                extra={
                    "path": path,
                    "reason": why,
                    "relists_in_row": relists_in_row,
                    "pause_s": pause,
                },
            )
            version = None
            await sleep(pause)
        except _CallbackFailed as err:
            # A shape the handler did not expect (a KeyError, a TypeError):
            # raised out of the loop, it ended the watch for good, and that
            # namespace's replicas (or the keys) stopped changing, unseen.
            failures_in_row += 1
            in_sync = False
            report(False)
            pause = doubling_s(failures_in_row, retry_s, FAILURE_BACKOFF_MAX_S)
            pause *= jitter(0.5, 1.0)
            log.error(
                "watch handler failed; listing again",
                exc_info=err.__cause__,
                extra={"path": path, "object": err.what, "pause_s": pause},
            )
            version = None
            await sleep(pause)
        except (aiohttp.ClientError, TimeoutError, KubeApiError, ValueError) as err:
            # ValueError: a line that is not JSON, or past the read buffer.
            # An API server that is overloaded (429) or failing (5xx) is asked
            # again by every gateway replica: at a fixed pause, all together
            # and for ever. The pause grows, and the jitter spreads them.
            failures_in_row += 1
            in_sync = False
            report(False)
            pause = doubling_s(failures_in_row, retry_s, FAILURE_BACKOFF_MAX_S)
            pause *= jitter(0.5, 1.0)
            asked = err.retry_after_s if isinstance(err, KubeApiError) else None
            if asked is not None:
                pause = max(pause, min(asked, FAILURE_BACKOFF_MAX_S))
            log.warning(
                "watch failed; retrying",
                extra={
                    "path": path,
                    "error": err,
                    "failures_in_row": failures_in_row,
                    "pause_s": pause,
                },
            )
            await sleep(pause)
        except Exception:
            # Not a cancel (a BaseException): an error no retry covers ends
            # the watch, its view frozen until something starts it again.
            report(False)
            raise


def doubling_s(in_row: int, base_s: float, max_s: float) -> float:
    """The longest pause after `in_row` (1 or more) failures in a row: `base_s`
    for the first, doubling with each, never more than `max_s`."""
    exponent = min(in_row - 1, 16)  # past any cap long before: no overflow
    return min(max_s, base_s * 2.0**exponent)


class _CallbackFailed(Exception):
    """A `list_watch` callback raised (the cause); `what` names what it was
    given. Never leaves `list_watch`."""

    def __init__(self, what: str) -> None:
        super().__init__(what)
        self.what = what


async def _sync(
    on_sync: Callable[[list[Obj]], Awaitable[None] | None], items: list[Obj]
) -> None:
    try:
        await _maybe_await(on_sync(items))
    except Exception as err:  # not CancelledError: a BaseException
        raise _CallbackFailed(f"a list of {len(items)}") from err


async def _deliver(
    on_event: Callable[[str, Obj], Awaitable[None] | None], kind: str, obj: Obj
) -> None:
    try:
        await _maybe_await(on_event(kind, obj))
    except Exception as err:  # not CancelledError: a BaseException
        raise _CallbackFailed(f"{kind} {_describe(obj)}") from err


def _describe(obj: Obj) -> str:
    """An object's kind and namespace/name, for a log line, whatever its shape."""
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    meta = meta if isinstance(meta, dict) else {}
    kind = obj.get("kind") if isinstance(obj, dict) else None
    name = "/".join(
        str(part) for part in (meta.get("namespace"), meta.get("name")) if part
    )
    return f"{kind or 'object'} {name or '(no name)'}"


def _version_of(obj: Obj) -> str | None:
    meta = obj.get("metadata") if isinstance(obj, dict) else None
    version = meta.get("resourceVersion") if isinstance(meta, dict) else None
    return version if isinstance(version, str) and version else None


def _unreported(in_sync: bool) -> None:
    """`list_watch`'s `on_health` when nobody asks."""


async def _maybe_await(value: Awaitable[None] | None) -> None:
    if value is not None:
        await value
