"""The count of open WebSockets per key, and its cap."""

from __future__ import annotations

import pytest

from citadel.gateway.services.sockets import SocketCounts

pytestmark = pytest.mark.unit


def test_a_key_opens_up_to_its_cap_and_again_once_one_closes() -> None:
    sockets = SocketCounts(2)
    assert sockets.open("alice") and sockets.open("alice")
    assert not sockets.open("alice")  # refused, and not counted
    assert sockets.held("alice") == 2
    assert sockets.open("bob")  # each key has its own
    sockets.close("alice")
    assert sockets.open("alice")
    assert (sockets.held("alice"), sockets.held("bob")) == (2, 1)


def test_a_key_with_no_socket_left_is_forgotten() -> None:
    """The counts hold no more names than there are sockets open."""
    sockets = SocketCounts(2)
    sockets.open("alice")
    sockets.close("alice")
    assert sockets._open == {}
    sockets.close("alice")  # never below nothing
    assert sockets.held("alice") == 0


def test_zero_counts_without_a_cap() -> None:
    sockets = SocketCounts(0)
    assert all(sockets.open("alice") for _ in range(1000))
    assert sockets.held("alice") == 1000


def test_a_cap_below_zero_is_refused() -> None:
    with pytest.raises(ValueError, match="max_per_key"):
        SocketCounts(-1)
