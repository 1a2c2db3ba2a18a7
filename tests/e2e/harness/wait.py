"""Polling until something holds: the one helper the harness and the e2e tests
share."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

from .cluster import ClusterError

T = TypeVar("T")


class WaitTimeout(ClusterError):
    """What was awaited did not happen in time; the message says what and the
    last value seen."""


def wait_for(
    what: str,
    check: Callable[[], T | None],
    timeout: float = 60,
    interval: float = 0.5,
) -> T:
    """Calls `check` until it returns something truthy, and returns that.

    Raises:
        WaitTimeout: `timeout` seconds passed first.
    """
    deadline = time.monotonic() + timeout
    last: T | None = None
    while time.monotonic() < deadline:
        last = check()
        if last:
            return last
        time.sleep(interval)
    raise WaitTimeout(
        f"timed out after {timeout:.0f}s waiting for {what} (last: {last!r})"
    )
