"""Requests waiting at the gateway for a replica with room.

A model whose route sets `maxRequestsPerReplica` has at most that many of this
gateway's requests at each replica; a request that finds every replica at its
bound waits here, and each replica that frees takes the first waiting request
it can: standard priority before sheddable, in arrival order within each
(`RANKS`). Held by vLLM instead, a queued batch request would go before an
interactive one that came later, and to the replica that took it rather than
the first that frees (the Gateway API Inference Extension's flow control does
the same in front of the pool).

The queue picks no replica itself: each waiter brings `take`, which chooses and
takes one with room (the router's strategy among those; the proxy counts it
in flight) or returns None when none has. So a replica that frees is taken at
once, by the waiter it is given to, with no moment in which a request that
came later could take it first.
"""

from __future__ import annotations

import asyncio
import bisect
import contextlib
import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from citadel.gateway.services.auth import Priority

T = TypeVar("T")

RANKS: dict[Priority, int] = {Priority.STANDARD: 0, Priority.SHEDDABLE: 1}
"""Lower ranks are served first."""

RECHECK_S = 1.0
"""How often a waiting request tries again by itself, besides each replica
freed and each change of the replicas: a replica whose ejection ends frees
nothing, and costs a waiter a second at most."""


@dataclass(eq=False)
class _Waiter(Generic[T]):
    rank: int
    order: int
    take: Callable[[], T | None]
    excludes: bool
    """`take` leaves some replicas out (a retry's tried ones): where it finds
    none, a waiter after it may still find one."""
    future: asyncio.Future[T] = field(
        default_factory=lambda: asyncio.get_running_loop().create_future()
    )

    @property
    def key(self) -> tuple[int, int]:
        return self.rank, self.order


class ReplicaQueue(Generic[T]):
    """The requests of each model waiting for a replica with room.

    Keyed by anything hashable that names a model (the proxy uses its
    namespace and name), holding whatever `take` returns (a replica).
    """

    def __init__(self) -> None:
        self._waiting: dict[object, list[_Waiter[T]]] = {}
        self._order = itertools.count()
        self._closed: Callable[[], Exception] | None = None

    def waiting(self, model: object) -> int:
        """How many requests wait for `model` now."""
        return len(self._waiting.get(model, ()))

    async def take(
        self,
        model: object,
        priority: Priority,
        take: Callable[[], T | None],
        within_s: float,
        *,
        excludes: bool = False,
    ) -> tuple[T | None, bool]:
        """What `take` takes for the request, in its turn.

        At once when no request of its priority or a higher one waits for
        `model` and `take` finds room; else once a replica frees and every
        request before it was served (`offer`), trying again every `RECHECK_S`
        meanwhile.

        Args:
            take: chooses and takes a replica with room, or None; what it
                raises (no replica at all) is what this raises.
            within_s: the longest it waits.
            excludes: `take` leaves some replicas out (`_Waiter.excludes`).

        Returns:
            What `take` took (None: nothing within `within_s`), and whether
            the request waited.

        A cancel that comes as `take` was run for it still leaves it taken:
        the caller, which counts what `take` takes, gives it back.

        Raises:
            Exception: once `close`d, the error it gives, where the request
                would have to wait.
        """
        waiter = _Waiter(RANKS[priority], next(self._order), take, excludes)
        queue = self._waiting.setdefault(model, [])
        bisect.insort(queue, waiter, key=lambda w: w.key)
        self.offer(model)
        if waiter.future.done():
            return waiter.future.result(), False
        if self._closed is not None or within_s <= 0:
            # Nothing to wait for: no request waited.
            self._drop(model, waiter)
            if self._closed is not None:
                raise self._closed()
            return None, False
        loop = asyncio.get_running_loop()
        ends = loop.time() + within_s
        try:
            while (left := ends - loop.time()) > 0:
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(min(left, RECHECK_S)):
                        return await asyncio.shield(waiter.future), True
                self.offer(model)
                if waiter.future.done():
                    return waiter.future.result(), True
            return None, True
        finally:
            self._drop(model, waiter)

    def offer(self, model: object) -> None:
        """Gives what has room now to the requests waiting for `model`, in
        their order: each that `take` finds a replica for leaves the queue
        with it, as does each whose `take` raises (the error is its answer).
        It stops at the first that finds none and leaves none out: none after
        it would find one."""
        queue = self._waiting.get(model)
        if not queue:
            return
        served: list[_Waiter[T]] = []
        for waiter in queue:
            try:
                taken = waiter.take()
            except Exception as err:  # raised in the waiter's own task
                waiter.future.set_exception(err)
                served.append(waiter)
                continue
            if taken is not None:
                waiter.future.set_result(taken)
                served.append(waiter)
            elif not waiter.excludes:
                break
        for waiter in served:
            queue.remove(waiter)
        if not queue:
            del self._waiting[model]

    def close(self, error: Callable[[], Exception]) -> None:
        """Ends every wait with `error()`, and any later one that would wait:
        the server stops, and another gateway replica can take the requests
        sooner than a replica here frees (one may wait minutes, past the
        shutdown grace)."""
        self._closed = error
        for queue in self._waiting.values():
            for waiter in queue:
                if not waiter.future.done():
                    waiter.future.set_exception(error())
        self._waiting.clear()

    def offer_all(self) -> None:
        """`offer` for every model with requests waiting: after a change of
        the replicas (one added, a bound raised)."""
        for model in list(self._waiting):
            self.offer(model)

    def _drop(self, model: object, waiter: _Waiter[T]) -> None:
        queue = self._waiting.get(model)
        if queue is None:
            return
        with contextlib.suppress(ValueError):
            queue.remove(waiter)
        if not queue:
            del self._waiting[model]
