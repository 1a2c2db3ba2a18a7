"""How long the API server asked this process to wait, and a `Kube` that tells.

An API server under load refuses with 429 (or a 5xx) and says how long to wait
(Retry-After). The failed request's own retry waits that long (see
`ReconcileError.delay`); `AskedWait` remembers the wait for the rest of the
process, so that work which can wait (periodic passes, status refreshes) sends
no new requests meanwhile: 1,000 models resynced every 120 s are about 8
requests a second that an API server asking for 30 s of quiet still got.
"""

from __future__ import annotations

import math
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

from citadel.operator.kube.client import ApiError, Kube, Listing, Manifest
from citadel.operator.kube.resources import Resource

T = TypeVar("T")


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


class HeedingKube:
    """`kube` whose refusals tell `wait` how long the API server asked to wait.

    Every request of the process goes through one, so that a Retry-After is
    remembered whichever request got it (a status write, the sweep's list, the
    routing ConfigMap's write).
    """

    def __init__(self, kube: Kube, wait: AskedWait) -> None:
        self._kube = kube
        self._wait = wait

    async def _heeded(self, request: Awaitable[T]) -> T:
        try:
            return await request
        except ApiError as err:
            self._wait.heed(err)
            raise

    async def apply(
        self, obj: Manifest, *, subresource: str = "", dry_run: bool = False
    ) -> Manifest:
        return await self._heeded(
            self._kube.apply(obj, subresource=subresource, dry_run=dry_run)
        )

    async def get(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        cached: bool = False,
    ) -> Manifest | None:
        return await self._heeded(
            self._kube.get(resource, name, namespace, cached=cached)
        )

    async def json_patch(
        self,
        resource: Resource,
        name: str,
        namespace: str | None,
        operations: list[Manifest],
    ) -> Manifest:
        return await self._heeded(
            self._kube.json_patch(resource, name, namespace, operations)
        )

    async def list(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
    ) -> list[Manifest]:
        return await self._heeded(
            self._kube.list(resource, namespace, label_selector=label_selector)
        )

    async def list_uids(
        self,
        resource: Resource,
        namespace: str | None = None,
        *,
        label_selector: str | None = None,
    ) -> Listing:
        return await self._heeded(
            self._kube.list_uids(resource, namespace, label_selector=label_selector)
        )

    async def delete(
        self,
        resource: Resource,
        name: str,
        namespace: str | None = None,
        *,
        uid: str | None = None,
    ) -> bool:
        return await self._heeded(self._kube.delete(resource, name, namespace, uid=uid))

    async def create(self, obj: Manifest) -> Manifest:
        return await self._heeded(self._kube.create(obj))

    async def has_resource(self, resource: Resource) -> bool:
        return await self._heeded(self._kube.has_resource(resource))
