"""list_watch: resume from the last version, list again after 410 Gone or a
version the API server has not seen yet."""

from __future__ import annotations

import asyncio
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
    is raised at once, a list of event types is delivered. Lists, watches and
    pauses are logged in order."""

    def __init__(self, script: list[Exception | list[str]]) -> None:
        self.script = script
        self.log: list[str] = []
        self.lists = 0
        self.list_params: list[Mapping[str, str] | None] = []

    async def list(
        self, path: str, params: Mapping[str, str] | None = None
    ) -> tuple[list[dict[str, Any]], str]:
        self.lists += 1
        self.list_params.append(params)
        self.log.append("list")
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
            yield kind, {"metadata": {"resourceVersion": version + "+"}}

    async def sleep(self, seconds: float) -> None:
        self.log.append(f"sleep {seconds:g}")


async def _run_script(
    api: ScriptedWatches,
    jitter: Callable[[float, float], float] = lambda low, high: high,
) -> None:
    with pytest.raises(asyncio.CancelledError):
        await list_watch(
            api,  # type: ignore[arg-type]
            "/x",
            {"labelSelector": "a"},
            lambda items: None,
            lambda kind, obj: None,
            sleep=api.sleep,
            jitter=jitter,
        )


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

    async def handle(
        reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        await reader.readuntil(b"\r\n\r\n")
        writer.write(answers.pop(0))
        await writer.drain()
        writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    kube = KubeClient(KubeConfig(server=f"http://127.0.0.1:{port}"))
    await kube.start()
    try:
        for _ in range(2):
            with pytest.raises(ResourceVersionTooLarge):
                async for _ in kube.watch("/api/v1/namespaces/x/configmaps", "120"):
                    pass
    finally:
        await kube.close()
        server.close()
        await server.wait_closed()
