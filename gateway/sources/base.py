"""The narrow interfaces between discovery and the services."""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any, Protocol

from citadel.gateway.kube.client import doubling_s

log = logging.getLogger(__name__)

RESTART_BASE_S = 1.0
"""The longest pause before running again work that ended; it doubles with each
end in a row. The pause itself is drawn from half of it to all of it."""
RESTART_MAX_S = 60.0
"""The longest pause before running it again; a run that lasted this long ends
no row."""


class Source(Protocol):
    """A background source of routes, replicas or keys.

    `run` keeps the services it was built with up to date until it is cancelled;
    it never returns on a transient failure (it logs and retries). The app runs
    it under `keep_running`: a run that ends anyway is logged, and started
    again after a pause.
    """

    async def run(self) -> None: ...


class WatchHealth(Protocol):
    """Where the Kubernetes watches say how they fare (the gateway's metrics,
    `GatewayMetrics`).

    `resource` is the kind of object watched, one of a few; `watch` tells the
    watches of one kind apart (one per namespace) and is no label.
    """

    def watch_started(self, resource: str, watch: str) -> None: ...

    def watch_synced(self, resource: str, watch: str) -> None: ...

    def watch_failed(self, resource: str, watch: str) -> None: ...

    def watch_stopped(self, resource: str, watch: str) -> None: ...


class Unobserved:
    """A `WatchHealth` that keeps nothing (for sources built without one)."""

    def watch_started(self, resource: str, watch: str) -> None:
        """Keeps nothing."""

    def watch_synced(self, resource: str, watch: str) -> None:
        """Keeps nothing."""

    def watch_failed(self, resource: str, watch: str) -> None:
        """Keeps nothing."""

    def watch_stopped(self, resource: str, watch: str) -> None:
        """Keeps nothing."""


def watch_reporter(
    health: WatchHealth, resource: str, watch: str
) -> Callable[[bool], None]:
    """Tells `health` that a watch starts (not in sync yet), and returns what
    its `list_watch` tells how it fares (its `on_health`).

    Args:
        health: where it goes.
        resource: the kind watched (routes, endpointslices, secrets).
        watch: which watch of that kind.
    """
    health.watch_started(resource, watch)

    def report(in_sync: bool) -> None:
        if in_sync:
            health.watch_synced(resource, watch)
        else:
            health.watch_failed(resource, watch)

    return report


async def keep_running(
    work: Callable[[], Coroutine[Any, Any, None]],
    name: str,
    sleep: Callable[[float], Awaitable[None]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    jitter: Callable[[float, float], float] = random.uniform,
) -> None:
    """Runs `work()`, meant to run until cancelled, and runs it again each time
    it ends by anything but a cancel (logged as an error), after a pause that
    grows while the ends come in a row.

    A watch that died anyway (an error no retry of its own covers) left its
    view frozen: a namespace's replicas until the namespace left the routing
    document and came back, the keys or the routes until the gateway restarted.

    Args:
        work: makes the coroutine to run (a watch loop), once a run.
        name: what it keeps, for the log.
        sleep: how to pause (injected by tests).
        clock: monotonic seconds, to tell a run that lasted.
        jitter: a number between its two arguments (injected by tests).
    """
    ends_in_row = 0
    while True:
        started = clock()
        error: Exception | None = None
        try:
            await work()
        except Exception as err:  # not CancelledError: a BaseException
            error = err
        if clock() - started >= RESTART_MAX_S:
            ends_in_row = 0
        ends_in_row += 1
        pause = doubling_s(ends_in_row, RESTART_BASE_S, RESTART_MAX_S)
        pause *= jitter(0.5, 1.0)
        log.error(
            "background task failed; starting it again"
            if error is not None
            else "background task ended; starting it again",
            exc_info=error,
            extra={"task": name, "ends_in_row": ends_in_row, "pause_s": pause},
        )
        await sleep(pause)


def start_supervised(work: Coroutine[Any, Any, None], name: str) -> asyncio.Task[None]:
    """Starts `work`, meant to run until cancelled, as a task whose end by
    anything but a cancel is logged as an error.

    A background task that raised kept its exception to itself until it was
    awaited (at shutdown, if ever): a watch that died left its routes, replicas
    or keys frozen, with nothing in the logs.

    Args:
        work: the coroutine (a source's `run`, a watch loop).
        name: what it watches, for the log and the task's name.
    """
    task = asyncio.create_task(work, name=name)
    task.add_done_callback(_report_end)
    return task


def _report_end(task: asyncio.Task[None]) -> None:
    if task.cancelled():
        return
    error = task.exception()
    if error is None:
        log.error(
            "background task ended; it no longer updates what it kept",
            extra={"task": task.get_name()},
        )
    else:
        log.error(
            "background task failed; it no longer updates what it kept",
            exc_info=error,
            extra={"task": task.get_name()},
        )
