"""Streams that clean up when closed, read or not."""

from __future__ import annotations

from collections.abc import AsyncGenerator, Awaitable, Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class Closing(Generic[T]):
    """An async generator whose `aclose` also cleans up when it was never read.

    A generator's `finally` runs only once it has started: closing one that was
    never read skips it. A relay holds a replica and an upstream connection from
    before its first chunk, and a client can leave before that chunk is asked
    for, so closing must free them either way.

    Args:
        items: the generator; it cleans up in its own `finally` once started.
        unread: the clean-up for when it is closed before its first item.
    """

    def __init__(
        self, items: AsyncGenerator[T, None], unread: Callable[[], Awaitable[None]]
    ) -> None:
        self._items = items
        self._unread = unread
        self._started = False
        self._closed = False

    def __aiter__(self) -> Closing[T]:
        return self

    async def __anext__(self) -> T:
        # Set before the generator runs: from its first step on, its own
        # `finally` is what cleans up.
        self._started = True
        return await self._items.__anext__()

    async def aclose(self) -> None:
        """Closes the generator, or cleans up for it if it never started."""
        if self._closed:
            return
        self._closed = True
        await self._items.aclose()
        if not self._started:
            await self._unread()
