"""The WebSockets each key holds open, against a cap per key.

A GraphQL WebSocket stays open for as long as its client keeps it, and each
holds a connection, a task, and the streams of its subscriptions: without a cap
one key could open any number. The count is of this gateway process's sockets
(each replica counts its own), kept by one object that wiring builds.
"""

from __future__ import annotations


class SocketCounts:
    """Open WebSockets per key name, at most `max_per_key` each.

    Args:
        max_per_key: the most sockets one key may hold open at once; 0 for no
            cap (they are still counted).
    """

    def __init__(self, max_per_key: int = 0) -> None:
        if max_per_key < 0:
            raise ValueError(f"max_per_key must be 0 or more, not {max_per_key}")
        self.max_per_key = max_per_key
        # Key name -> its sockets open; a key with none is forgotten, so this
        # holds no more names than there are sockets.
        self._open: dict[str, int] = {}

    def open(self, key: str) -> bool:
        """Counts one more socket of `key`, unless it holds the most already.

        Returns:
            True when counted (the socket may open); False when `key` is at its
            cap (not counted: the socket must be refused).
        """
        held = self._open.get(key, 0)
        if self.max_per_key and held >= self.max_per_key:
            return False
        self._open[key] = held + 1
        return True

    def close(self, key: str) -> None:
        """Counts one socket of `key` fewer: call it once for each `open` that
        returned True, however the socket ended."""
        held = self._open.get(key, 0) - 1
        if held > 0:
            self._open[key] = held
        else:
            self._open.pop(key, None)

    def held(self, key: str) -> int:
        """How many sockets `key` holds open."""
        return self._open.get(key, 0)
