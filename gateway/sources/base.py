"""The narrow interfaces between discovery and the services."""

from __future__ import annotations

from typing import Protocol


class Source(Protocol):
    """A background source of routes, replicas or keys.

    `run` keeps the services it was built with up to date until it is cancelled;
    it never returns on a transient failure (it logs and retries).
    """

    async def run(self) -> None: ...
