"""The operator's own long-running tasks: started once, their end reported."""

from __future__ import annotations

import asyncio

import pytest

from citadel.operator.background import Background

pytestmark = pytest.mark.unit


async def test_a_task_of_a_name_runs_once() -> None:
    background = Background()
    started: list[str] = []

    async def work() -> None:
        started.append("work")
        await asyncio.Event().wait()

    try:
        assert background.start("publisher", work)
        assert not background.start("publisher", work)  # still running
        await asyncio.sleep(0)
        assert started == ["work"]
        assert background.running() == ["publisher"]
        assert background.dead() == []
    finally:
        await background.stop()


async def test_a_task_that_ends_is_logged_and_named_dead(
    caplog: pytest.LogCaptureFixture,
) -> None:
    background = Background()
    fail = asyncio.Event()

    async def crashing() -> None:
        await fail.wait()
        raise RuntimeError("a bug")

    async def waiting() -> None:
        await asyncio.Event().wait()

    background.start("publisher", crashing)
    background.start("sweep", waiting)
    try:
        fail.set()
        for _ in range(3):
            await asyncio.sleep(0)
        assert background.dead() == ["publisher"]
        assert background.running() == ["sweep"]
        [record] = [
            r for r in caplog.records if r.name == "citadel.operator.background"
        ]
        assert record.message == "background task publisher failed"
        assert record.exc_info is not None
        # Started again (a start-up handler that runs again), it runs again.
        assert background.start("publisher", waiting)
        assert background.dead() == []
    finally:
        await background.stop()
    # Stopping is no death, and is not logged as one.
    assert background.dead() == [] and background.running() == []
    assert len([r for r in caplog.records if r.levelname == "ERROR"]) == 1
