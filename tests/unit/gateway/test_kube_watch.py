"""list_watch: resume from the last version, list again after 410 Gone or a
version the API server has not seen yet, back off while lists and watches fail,
and outlive a handler that raises."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping
from typing import Any

import aiohttp
import orjson
import pytest

from citadel.gateway.kube import client as client_module
from citadel.gateway.kube.client import (
    KubeApiError,
    KubeClient,
    ResourceVersionTooLarge,
    WatchExpired,
    list_watch,
)
from citadel.gateway.kube.config import KubeConfig

pytestmark = pytest.mark.unit


class FakeApi:
    """Scripted answers: lists return (items, version); watches replay events or
    raise."""

    def __init__(self, watches: list[list[tuple[str, Any]] | Exception]) -> None:
        self.watches = watches
        self.lists = 0
        self.watched_from: list[str] = []

    async def list(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        return [{"metadata": {"name": f"list-{self.lists}"}}], f"{self.lists}0"

    async def watch(
        self, path: str, version: str, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.watched_from.append(version)
        if not self.watches:
            await asyncio.Event().wait()  # a quiet watch, until cancelled
        step = self.watches.pop(0)
        if isinstance(step, Exception):
            raise step
        for kind, version_ in step:
            yield kind, {"metadata": {"name": "x", "resourceVersion": version_}}


async def test_resumes_after_a_drop_and_relists_after_gone() -> None:
    api = FakeApi(
        [
            [("ADDED", "11"), ("BOOKMARK", "15")],  # the server ends the watch
            aiohttp.ClientConnectionError("dropped"),
            [("MODIFIED", "16")],
            WatchExpired(410, "too old"),
        ]
    )
    synced: list[list[str]] = []
    events: list[tuple[str, str]] = []
    task = asyncio.create_task(
        list_watch(
            api,  # type: ignore[arg-type]
            "/api/v1/namespaces/n/configmaps",
            {},
            lambda items: synced.append([i["metadata"]["name"] for i in items]),
            lambda kind, obj: events.append((kind, obj["metadata"]["resourceVersion"])),
            retry_s=0,
            jitter=lambda low, high: low,  # no pause before the list after 410
        )
    )
    while api.lists < 2 or len(api.watched_from) < 5:
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert synced == [["list-1"], ["list-2"]]
    assert events == [("ADDED", "11"), ("MODIFIED", "16")]  # bookmarks are silent
    # 10 from the list; 15 after the bookmark; 15 again after the drop; 16; then
    # a new list's 20 after 410.
    assert api.watched_from == ["10", "15", "15", "16", "20"]


async def test_a_watch_on_a_connection_gone_silent_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A peer that vanished without a word (no FIN, no RST) sends nothing; the
    watch ends past its bounds instead of waiting for ever."""
    monkeypatch.setattr(client_module, "WATCH_GRACE_S", 0.5)
    monkeypatch.setattr(client_module, "WATCH_SILENCE_S", 60.0)

    done_serving = asyncio.Event()

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        await writer.drain()
        await done_serving.wait()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    kube = KubeClient(KubeConfig(server=f"http://127.0.0.1:{port}"))
    await kube.start()

    async def drain() -> None:
        async for _ in kube.watch("/api/v1/namespaces/x/configmaps", "1", timeout_s=1):
            pass

    task = asyncio.create_task(drain())
    try:
        done, _ = await asyncio.wait({task}, timeout=5)
        assert task in done, "the watch still waits"
        # aiohttp's timeout is a TimeoutError, which list_watch retries.
        assert isinstance(task.exception(), TimeoutError)
    finally:
        task.cancel()
        await kube.close()
        done_serving.set()
        server.close()
        await server.wait_closed()


async def test_a_watch_keeps_the_connect_timeout() -> None:
    """A request's own ClientTimeout replaces the session's whole one: the
    watch's must bound the connection too (a stuck TLS handshake took 60 s)."""
    seen: list[aiohttp.ClientTimeout] = []

    class Session:
        def get(self, *args: Any, timeout: aiohttp.ClientTimeout, **kw: Any) -> Any:
            seen.append(timeout)
            raise aiohttp.ClientConnectionError("no")

    kube = KubeClient(KubeConfig(server="http://127.0.0.1:1"))
    kube._session = Session()  # type: ignore[assignment]
    with pytest.raises(aiohttp.ClientConnectionError):
        async for _ in kube.watch("/api/v1/namespaces/x/configmaps", "1"):
            pass
    assert seen[0].sock_connect == client_module.CONNECT_TIMEOUT_S
    assert seen[0].sock_read == client_module.WATCH_SILENCE_S


class EmptyWatches:
    """A server (or a proxy before it) that ends every watch at once, with no
    event; then, from the `deliver_at`-th watch on, one that delivers an event."""

    def __init__(self, deliver_at: int = 10**9) -> None:
        self.watches = 0
        self.deliver_at = deliver_at

    async def list(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        return [], "1"

    async def watch(
        self, path: str, version: str, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.watches += 1
        await asyncio.sleep(0)  # one round trip, then the server ends it
        if self.watches == self.deliver_at:
            yield "ADDED", {"metadata": {"resourceVersion": "2"}}


async def _run_watches(
    api: EmptyWatches, count: int, clock: Callable[[], float] = lambda: 0.0
) -> list[float]:
    """The pauses list_watch takes over `count` watches; by default with a clock
    that never moves (each watch ends at once)."""
    pauses: list[float] = []

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)
        if api.watches >= count:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await list_watch(
            api,  # type: ignore[arg-type]
            "/x",
            {},
            lambda items: None,
            lambda kind, obj: None,
            sleep=sleep,
            clock=clock,
        )
    return pauses


async def test_watches_ended_at_once_back_off_with_jitter_up_to_a_cap() -> None:
    """An API server shutting down, or a proxy that closes long-lived streams,
    ends each watch at once: re-opening it at once spun a CPU and sent tens of
    thousands of watch requests a second."""
    pauses = await _run_watches(EmptyWatches(), 12)
    assert len(pauses) >= 11  # a pause after each empty watch
    assert all(0 < p <= client_module.WATCH_BACKOFF_MAX_S for p in pauses)
    assert pauses[0] <= 1.0  # a single empty watch costs little
    assert pauses[-1] >= client_module.WATCH_BACKOFF_MAX_S / 2
    assert len(set(pauses)) > 1


async def test_a_watch_that_delivers_resets_the_back_off() -> None:
    pauses = await _run_watches(EmptyWatches(deliver_at=8), 10)
    # empty watches 1-7 pause ever longer; the 8th delivers (no pause); the
    # 9th and 10th start again from the shortest pause.
    assert len(pauses) == 9
    assert pauses[6] > 4 * pauses[7]
    assert pauses[7] <= 1.0


class LastingWatches(EmptyWatches):
    """Each watch lasts 300 s (the server's timeoutSeconds), with no event."""

    def __init__(self) -> None:
        super().__init__()
        self.now = 0.0

    async def watch(
        self, path: str, version: str, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.watches += 1
        if self.watches > 3:
            raise asyncio.CancelledError
        self.now += 300.0
        return
        yield


async def test_a_watch_that_lasted_is_reopened_at_once() -> None:
    """The server ends each watch after its timeoutSeconds: no pause then."""
    api = LastingWatches()
    pauses = await _run_watches(api, 10**9, clock=lambda: api.now)
    assert pauses == []


async def test_empty_watches_are_not_reopened_in_a_spin() -> None:
    """The review's measure, with the real sleep: 36,876 watches in 0.2 s."""
    api = EmptyWatches()
    task = asyncio.create_task(
        list_watch(
            api,  # type: ignore[arg-type]
            "/x",
            {},
            lambda items: None,
            lambda kind, obj: None,
        )
    )
    await asyncio.sleep(0.2)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert api.watches <= 2


TOO_LARGE_STATUS = {
    "kind": "Status",
    "apiVersion": "v1",
    "metadata": {},
    "status": "Failure",
    "message": "Timeout: Too large resource version: 120, current: 100",
    "reason": "Timeout",
    "details": {
        "causes": [
            {
                "reason": "ResourceVersionTooLarge",
                "message": "Too large resource version",
            }
        ],
        "retryAfterSeconds": 1,
    },
    "code": 504,
}


class ScriptedWatches:
    """Each watch plays one step of a script, then the run ends: an exception
    is raised at once, a list of event types is delivered. Lists fail with
    `list_failures` first, one each. Lists, watches and pauses are logged in
    order."""

    def __init__(
        self,
        script: list[Exception | list[str]],
        list_failures: list[Exception] | None = None,
    ) -> None:
        self.script = script
        self.list_failures = list_failures or []
        self.log: list[str] = []
        self.lists = 0
        self.list_params: list[Mapping[str, str] | None] = []

    async def list(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        self.log.append("list")
        if self.list_failures:
            raise self.list_failures.pop(0)
        self.lists += 1
        self.list_params.append(params)
        return [], str(self.lists)

    async def watch(
        self, path: str, version: str, params: Mapping[str, str] | None = None
    ) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        self.log.append(f"watch {version}")
        if not self.script:
            raise asyncio.CancelledError  # the end of the run
        step = self.script.pop(0)
        if isinstance(step, Exception):
            raise step
        for kind in step:
            meta = {"namespace": "llm", "name": "m-1", "resourceVersion": version + "+"}
            yield kind, {"kind": "EndpointSlice", "metadata": meta}

    async def sleep(self, seconds: float) -> None:
        self.log.append(f"sleep {seconds:g}")


async def _run_script(
    api: ScriptedWatches,
    jitter: Callable[[float, float], float] = lambda low, high: high,
    on_sync: Callable[[list[dict[str, Any]]], None] = lambda items: None,
    on_event: Callable[[str, dict[str, Any]], None] = lambda kind, obj: None,
) -> None:
    with pytest.raises(asyncio.CancelledError):
        await list_watch(
            api,  # type: ignore[arg-type]
            "/x",
            {"labelSelector": "a"},
            on_sync,
            on_event,
            sleep=api.sleep,
            jitter=jitter,
        )


def _pauses(api: ScriptedWatches) -> list[float]:
    return [float(entry.split()[1]) for entry in api.log if entry[0] == "s"]


def gone() -> WatchExpired:
    return WatchExpired(410, "too old resource version: 1 (5)")


async def test_a_relist_after_gone_waits_a_pause_that_grows_while_it_repeats() -> None:
    """A compaction or an API server's restart expires every replica's watches
    of every kind together: all listed again in the same instant."""
    drawn: list[tuple[float, float]] = []

    def jitter(low: float, high: float) -> float:
        drawn.append((low, high))
        return high

    api = ScriptedWatches([gone() for _ in range(7)])
    await _run_script(api, jitter)
    # No pause before the first list; then one before each list again.
    assert api.log[:3] == ["list", "watch 1", "sleep 1"]
    pauses = [float(entry.split()[1]) for entry in api.log if entry[0] == "s"]
    assert pauses == [1, 2, 4, 8, 16, 30, 30]
    assert api.log[-3:] == ["sleep 30", "list", "watch 8"]
    # Each pause is drawn from zero up: the replicas' lists spread out.
    assert {low for low, _ in drawn} == {0.0}


async def test_a_first_relist_is_quick_with_the_real_jitter() -> None:
    api = ScriptedWatches([gone()])
    await _run_script(api, random.uniform)
    assert api.log[:2] == ["list", "watch 1"]
    assert api.log[2].startswith("sleep ")
    assert 0 <= float(api.log[2].split()[1]) <= 1.0
    assert api.log[3:] == ["list", "watch 2"]


async def test_a_watch_that_delivers_resets_the_relist_pause() -> None:
    api = ScriptedWatches([gone(), gone(), ["BOOKMARK"], gone()])
    await _run_script(api)
    pauses = [entry for entry in api.log if entry.startswith("sleep")]
    assert pauses == ["sleep 1", "sleep 2", "sleep 1"]


async def test_a_version_the_api_server_has_not_seen_lists_again() -> None:
    """An API server behind etcd (one a connection failed over to) answers 504
    "Too large resource version" for a version it has not seen yet: the watch
    was retried with that version for as long as the server lagged."""
    too_large = client_module._api_error(504, orjson.dumps(TOO_LARGE_STATUS))
    api = ScriptedWatches([too_large, too_large])
    await _run_script(api)
    assert api.log == [
        "list",
        "watch 1",
        "sleep 1",
        "list",
        "watch 2",
        "sleep 2",
        "list",
        "watch 3",
    ]
    # The list asks for no version: the freshest, from etcd, not the cache.
    assert all("resourceVersion" not in (p or {}) for p in api.list_params)


@pytest.mark.parametrize(
    "status",
    [
        TOO_LARGE_STATUS,
        # API servers 1.17.0 to 1.18.5 gave the cause without its reason.
        {
            **TOO_LARGE_STATUS,
            "details": {"causes": [{"message": "Too large resource version"}]},
        },
        {**TOO_LARGE_STATUS, "details": {}},
    ],
)
def test_too_large_resource_version_is_told_apart(status: dict[str, Any]) -> None:
    error = client_module._api_error(504, orjson.dumps(status))
    assert isinstance(error, ResourceVersionTooLarge)


@pytest.mark.parametrize(
    "status",
    [
        # A proxy's own 504, or a server that timed out for another reason.
        {"kind": "Status", "reason": "Timeout", "message": "request timed out"},
        {"message": "upstream timed out"},
    ],
)
def test_other_timeouts_are_plain_api_errors(status: dict[str, Any]) -> None:
    error = client_module._api_error(504, orjson.dumps(status))
    assert type(error) is KubeApiError
    assert type(client_module._api_error(504, b"<html>")) is KubeApiError


async def test_the_client_raises_too_large_from_an_answer_and_an_event() -> None:
    """The watch cache answers a version it has not seen with an ERROR event
    in a 200 stream; other paths answer with the HTTP status."""
    body = orjson.dumps(TOO_LARGE_STATUS)
    event = orjson.dumps({"type": "ERROR", "object": TOO_LARGE_STATUS}) + b"\n"
    answers = [
        b"HTTP/1.1 504 Gateway Timeout\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(body), body),
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(event), event),
    ]

    async with _canned_api(answers) as kube:
        for _ in range(2):
            with pytest.raises(ResourceVersionTooLarge):
                async for _ in kube.watch("/api/v1/namespaces/x/configmaps", "120"):
                    pass


def _api_error(status: int, retry_after_s: float | None = None) -> KubeApiError:
    if retry_after_s is None:
        return KubeApiError(status, "refused")
    return KubeApiError(status, "refused", retry_after_s)


async def test_failed_lists_and_watches_back_off_with_jitter_up_to_a_cap() -> None:
    """An API server answering 429 (or 500, 503, or not at all) was asked
    again every 2 s by every gateway replica, all together, for ever."""
    drawn: list[tuple[float, float]] = []

    def jitter(low: float, high: float) -> float:
        drawn.append((low, high))
        return high

    api = ScriptedWatches(
        [
            aiohttp.ClientConnectionError("refused"),
            TimeoutError(),
            _api_error(429),
            _api_error(500),
            _api_error(503),
            _api_error(503),
        ],
        list_failures=[_api_error(503), aiohttp.ClientConnectionError("reset")],
    )
    await _run_script(api, jitter)
    # Two failed lists; a list that works starts the count again; then six
    # failed watches, each retried from the list's version.
    assert api.log[:5] == ["list", "sleep 2", "list", "sleep 4", "list"]
    assert _pauses(api) == [2, 4, 2, 4, 8, 16, 30, 30]
    assert api.log[-2:] == ["sleep 30", "watch 1"]
    # Each pause is drawn from half its bound up: the replicas spread out.
    assert set(drawn) == {(0.5, 1.0)}


async def test_first_failures_are_quick_and_spread_with_the_real_jitter() -> None:
    """As many gateway replicas as runs here, failing at the same instant."""
    first: list[float] = []
    for _ in range(20):
        api = ScriptedWatches([_api_error(500)])
        await _run_script(api, random.uniform)
        first.append(_pauses(api)[0])
    assert all(1.0 <= pause <= 2.0 for pause in first)
    assert len(set(first)) > 1


async def test_a_watch_that_delivers_resets_the_failure_back_off() -> None:
    api = ScriptedWatches(
        [_api_error(500), _api_error(500), ["ADDED"], _api_error(500)]
    )
    await _run_script(api)
    assert _pauses(api) == [2, 4, 2]


@pytest.mark.parametrize(
    ("asked", "paused"),
    [
        (7.0, 7.0),  # longer than the back-off: honoured
        (0.5, 2.0),  # shorter: the back-off holds
        (3600.0, None),  # never past the cap
    ],
)
async def test_a_retry_after_is_honoured_up_to_the_cap(
    asked: float, paused: float | None
) -> None:
    paused = paused or client_module.FAILURE_BACKOFF_MAX_S
    api = ScriptedWatches([], list_failures=[_api_error(429, asked)])
    await _run_script(api)
    assert api.log[:3] == ["list", f"sleep {paused:g}", "list"]


async def test_the_client_reads_retry_after_from_an_answer_and_an_event() -> None:
    """The API server's 429 says Retry-After; a watch's ERROR event carries
    only its Status, whose details say retryAfterSeconds."""
    refused = orjson.dumps({"kind": "Status", "reason": "TooManyRequests"})
    status = {
        "kind": "Status",
        "reason": "TooManyRequests",
        "code": 429,
        "details": {"retryAfterSeconds": 3},
    }
    event = orjson.dumps({"type": "ERROR", "object": status}) + b"\n"
    answers = [
        b"HTTP/1.1 429 Too Many Requests\r\ncontent-type: application/json\r\n"
        b"retry-after: 5\r\ncontent-length: %d\r\n\r\n%s" % (len(refused), refused),
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"content-length: %d\r\n\r\n%s" % (len(event), event),
        b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 4\r\n\r\nbusy",
    ]

    async with _canned_api(answers) as kube:
        with pytest.raises(KubeApiError) as listed:
            await kube.list("/api/v1/namespaces/x/secrets")
        assert (listed.value.status, listed.value.retry_after_s) == (429, 5.0)
        with pytest.raises(KubeApiError) as watched:
            async for _ in kube.watch("/api/v1/namespaces/x/secrets", "1"):
                pass
        assert (watched.value.status, watched.value.retry_after_s) == (429, 3.0)
        with pytest.raises(KubeApiError) as busy:
            await kube.list("/api/v1/namespaces/x/secrets")
        assert (busy.value.status, busy.value.retry_after_s) == (503, None)


async def test_a_handler_that_raises_is_logged_and_the_view_listed_again(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A KeyError on an object of a shape the handler did not expect ended the
    watch for good, unlogged: the namespace's replicas stopped changing."""
    seen: list[str] = []

    def on_event(kind: str, obj: dict[str, Any]) -> None:
        seen.append(kind)
        if kind == "MODIFIED":
            raise KeyError("ports")

    api = ScriptedWatches([["ADDED", "MODIFIED", "DELETED"], ["ADDED"]])
    await _run_script(api, on_event=on_event)
    # The rest of that watch is dropped: the handler may have left the view
    # half updated, and a new list puts it right.
    assert seen == ["ADDED", "MODIFIED", "ADDED"]
    assert api.log == ["list", "watch 1", "sleep 2", "list", "watch 2", "watch 2+"]
    [error] = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert error.object == "MODIFIED EndpointSlice llm/m-1"  # type: ignore[attr-defined]
    assert error.exc_info is not None and error.exc_info[0] is KeyError


async def test_a_list_its_handler_cannot_take_is_listed_again_ever_later() -> None:
    calls: list[int] = []

    def on_sync(items: list[dict[str, Any]]) -> None:
        calls.append(len(items))
        if len(calls) < 4:
            raise TypeError("'NoneType' object is not subscriptable")

    api = ScriptedWatches([])
    await _run_script(api, on_sync=on_sync)
    assert api.log == [
        "list",
        "sleep 2",
        "list",
        "sleep 4",
        "list",
        "sleep 8",
        "list",
        "watch 4",  # watched from the version of the list it took
    ]


async def test_a_cancel_from_a_handler_is_not_swallowed() -> None:
    def on_event(kind: str, obj: dict[str, Any]) -> None:
        raise asyncio.CancelledError

    api = ScriptedWatches([["ADDED"], ["ADDED"]])
    await _run_script(api, on_event=on_event)
    assert api.log == ["list", "watch 1"]


def _ok(body: bytes) -> bytes:
    return (
        b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\n"
        b"connection: close\r\ncontent-length: %d\r\n\r\n%s" % (len(body), body)
    )


@contextlib.asynccontextmanager
async def _canned_api(answers: list[bytes]) -> AsyncIterator[KubeClient]:
    """A started client of a server that gives `answers` in turn, one a
    connection (and holds each further one open: a quiet watch, until the end)."""

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        if not answers:
            await asyncio.Event().wait()
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    kube = KubeClient(KubeConfig(server=f"http://127.0.0.1:{port}"))
    await kube.start()
    try:
        yield kube
    finally:
        await kube.close()
        server.close()
        await server.wait_closed()


async def _list_watch_served(
    answers: list[bytes], delivered: int
) -> tuple[list[list[dict[str, Any]]], list[str], list[float]]:
    """Runs list_watch with the real client against a server that gives
    `answers` in turn, one a connection (then holds each further one open),
    until `delivered` events came; what it synced, the events' object names,
    and the pauses it took."""
    synced: list[list[dict[str, Any]]] = []
    events: list[str] = []
    pauses: list[float] = []
    got_all = asyncio.Event()

    def on_event(kind: str, obj: dict[str, Any]) -> None:
        events.append(f"{kind} {obj['metadata']['name']}")
        if len(events) == delivered:
            got_all.set()

    async def sleep(seconds: float) -> None:
        pauses.append(seconds)

    async with _canned_api(answers) as kube:
        task = asyncio.create_task(
            list_watch(
                kube,
                "/api/v1/namespaces/x/secrets",
                {},
                synced.append,
                on_event,
                sleep=sleep,
                jitter=lambda low, high: high,
            )
        )
        try:
            done, _ = await asyncio.wait(
                {task, asyncio.create_task(got_all.wait())},
                timeout=5,
                return_when=asyncio.FIRST_COMPLETED,
            )
            assert task not in done, f"the watch ended: {task.exception()!r}"
            assert got_all.is_set(), "the events did not come"
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    return synced, events, pauses


def _listed(version: str = "5") -> bytes:
    meta = {"resourceVersion": version}
    return orjson.dumps({"kind": "SecretList", "metadata": meta, "items": []})


def _event(kind: str, name: str, version: str) -> bytes:
    meta = {"name": name, "resourceVersion": version}
    return orjson.dumps({"type": kind, "object": {"metadata": meta}}) + b"\n"


async def test_a_list_answer_without_its_version_is_a_failed_list(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A list answer without metadata.resourceVersion raised a KeyError out of
    list_watch: the watch ended for good, its view frozen."""
    answers = [
        _ok(orjson.dumps({"kind": "SecretList", "items": []})),
        _ok(orjson.dumps({"kind": "SecretList", "metadata": None, "items": []})),
        _ok(b"[]"),
        _ok(orjson.dumps({"metadata": {"resourceVersion": "5"}, "items": [3]})),
        _ok(_listed()),
        _ok(_event("ADDED", "a", "6")),
    ]
    synced, events, pauses = await _list_watch_served(answers, delivered=1)
    assert synced == [[]]
    assert events == ["ADDED a"]
    assert pauses == [2, 4, 8, 16]  # backed off as any failed list
    failed = [r for r in caplog.records if r.getMessage() == "watch failed; retrying"]
    assert len(failed) == 4
    assert all(
        isinstance(r.error, client_module.UnexpectedAnswer)  # type: ignore[attr-defined]
        for r in failed
    )


async def test_a_watch_line_that_is_not_an_event_is_a_failed_watch(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A watch line that is JSON but not an object (or one without its type
    and object) raised an AttributeError out of list_watch."""
    answers = [
        _ok(_listed()),
        _ok(_event("ADDED", "a", "6") + b"[1, 2]\n"),
        _ok(b'"ADDED"\n'),
        _ok(b'{"type": "ADDED", "object": null}\n'),
        _ok(b'{"type": "ERROR", "object": {"code": null}}\n'),
        _ok(_event("ADDED", "b", "7")),
    ]
    synced, events, pauses = await _list_watch_served(answers, delivered=2)
    assert synced == [[]]
    # Watched again from the last version seen, without a list.
    assert events == ["ADDED a", "ADDED b"]
    assert pauses == [2, 4, 8, 16]
    failed = [r for r in caplog.records if r.getMessage() == "watch failed; retrying"]
    assert [type(r.error).__name__ for r in failed] == [  # type: ignore[attr-defined]
        "UnexpectedAnswer",
        "UnexpectedAnswer",
        "UnexpectedAnswer",
        "KubeApiError",
    ]


async def test_list_watch_says_when_its_view_is_in_sync() -> None:
    """A failing watch was only in the logs: nothing a metric or an alert
    could read said that a view had gone stale."""
    said: list[bool] = []

    def on_event(kind: str, obj: dict[str, Any]) -> None:
        if kind == "MODIFIED":
            raise KeyError("ports")

    api = ScriptedWatches(
        [
            aiohttp.ClientConnectionError("reset"),
            ["ADDED", "BOOKMARK"],
            gone(),
            ["MODIFIED"],
        ],
        list_failures=[_api_error(403)],
    )
    with pytest.raises(asyncio.CancelledError):
        await list_watch(
            api,  # type: ignore[arg-type]
            "/x",
            {},
            lambda items: None,
            on_event,
            said.append,
            sleep=api.sleep,
        )
    assert said == [
        False,  # the list refused
        True,  # listed
        False,  # the watch dropped
        True,  # it delivers again (once: the bookmark says nothing new)
        True,  # listed again after 410 (no failure between)
        False,  # the handler could not take an event
        True,  # listed again
    ]


async def test_a_watch_ended_by_an_error_says_it_is_out_of_sync() -> None:
    said: list[bool] = []

    class Unstarted:
        async def list(self, path: str, params: Any = None) -> Any:
            raise RuntimeError("KubeClient.start() was not called")

    with pytest.raises(RuntimeError):
        await list_watch(
            Unstarted(),  # type: ignore[arg-type]
            "/x",
            {},
            lambda items: None,
            lambda kind, obj: None,
            said.append,
        )
    assert said == [False]
