"""The operator's own long-running tasks: each started once, and watched.

The route publisher and the index sweep run beside Kopf's handlers, in tasks
that nothing awaits until the operator stops. Each catches its own failures and
goes on; one that ends all the same (a bug outside that care) would leave the
operator running without it, and with nothing that said so: a publisher that
ended on an answer that was not JSON never wrote the routing ConfigMap again,
while its metrics stood still and `/healthz` answered 200. `Background` logs such
an end with its traceback, and `dead` names the task for the liveness probe, so
that Kubernetes restarts the pod.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from typing import Any

log = logging.getLogger(__name__)
Work = Callable[[], Coroutine[Any, Any, None]]


class Background:
    """Named tasks meant to run until the operator stops."""

    def __init__(self) -> None:
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._stopping = False

    def start(self, name: str, work: Work) -> bool:
        """Runs `work()` in a task named `name`, unless one of that name runs.

        Kopf runs a start-up handler again when it failed: what it started
        before the failure must not run twice (two publishers would write the
        routing ConfigMap, two sweeps list every resource twice).

        Args:
            name: what the task is called in logs and by `dead`.
            work: makes the coroutine; called only when a task starts.

        Returns:
            Whether a task was started.
        """
        running = self._tasks.get(name)
        if running is not None and not running.done():
            return False
        task = asyncio.create_task(work(), name=name)
        task.add_done_callback(self._ended)
        self._tasks[name] = task
        return True

    def _ended(self, task: asyncio.Task[None]) -> None:
        if self._stopping:
            return
        if task.cancelled():
            log.error("background task %s was cancelled", task.get_name())
        elif (err := task.exception()) is not None:
            log.error("background task %s failed", task.get_name(), exc_info=err)
        else:
            log.error("background task %s ended", task.get_name())

    def running(self) -> list[str]:
        """The names of the tasks that run."""
        return sorted(name for name, task in self._tasks.items() if not task.done())

    def dead(self) -> list[str]:
        """The names of the tasks that ended before `stop` (none after it)."""
        if self._stopping:
            return []
        return sorted(name for name, task in self._tasks.items() if task.done())

    async def stop(self) -> None:
        """Cancels every task and waits for them to end."""
        self._stopping = True
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
