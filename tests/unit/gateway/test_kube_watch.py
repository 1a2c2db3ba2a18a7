"""list_watch: resume from the last version, list again after 410 Gone."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp
import pytest

from citadel.gateway.kube.client import WatchExpired, list_watch

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
