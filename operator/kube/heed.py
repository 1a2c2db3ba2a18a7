"""How long the API server asked this process to wait.

An API server under load refuses with 429 (or a 5xx) and says how long to wait
(Retry-After). The failed request's own retry waits that long (see
`ReconcileError.delay`); `AskedWait` remembers the wait for the rest of the
process, so that work which can wait (periodic passes, status refreshes) sends
no new requests meanwhile: 1,000 models resynced every 120 s are about 8
requests a second that an API server asking for 30 s of quiet still got.

The process makes one and hands its `heed` to the client as `on_refusal`
(`AioKube`, whose every request raises through one place), so that a
Retry-After is remembered whichever request got it: a status write, the
sweep's list, the routing ConfigMap's write.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

from citadel.operator.kube.client import ApiError


class AskedWait:
    """Until when the API server asked this process to wait: as long as the
    latest answer that said so (Retry-After) asked, up to `max_s`.

    The latest, even when it asks for less than an earlier one: it is the API
    server's newer word on its load.

    Args:
        max_s: the longest wait one answer is followed for, so that a wait
            asked in error does not stop the work for good.
        clock: monotonic seconds (a test's own).
    """

    def __init__(
        self, max_s: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._max_s = max_s
        self._clock = clock
        self._until = -math.inf

    def heed(self, err: ApiError) -> None:
        """Remembers the wait `err` asks for, if it asks for one."""
        if err.retry_after_s is not None:
            self._until = self._clock() + min(err.retry_after_s, self._max_s)

    def left(self) -> float:
        """Seconds still to wait; 0 when the API server asked for no more."""
        return max(0.0, self._until - self._clock())
