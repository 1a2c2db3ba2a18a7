"""What every unit-test folder shares: the `ipv6` marker."""

from __future__ import annotations

import socket

import pytest


def _ipv6() -> bool:
    """Whether this machine can listen on IPv6 (a container may have it off)."""
    if not socket.has_ipv6:
        return False
    try:
        with socket.socket(socket.AF_INET6) as sock:
            sock.bind(("::1", 0))
    except OSError:
        return False
    return True


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "ipv6: listens on IPv6; skipped where the machine has none"
    )


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    marked = [item for item in items if item.get_closest_marker("ipv6")]
    if marked and not _ipv6():
        skip = pytest.mark.skip(reason="no IPv6 on this machine")
        for item in marked:
            item.add_marker(skip)
