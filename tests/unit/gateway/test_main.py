"""The gateway's entry point."""

from __future__ import annotations

import gc
import json
import weakref
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from citadel.gateway import main as entry

pytestmark = pytest.mark.unit


class _Cycle:
    """Refers to itself, so only the cycle collector frees it."""

    def __init__(self) -> None:
        self.me = self


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Gives back to the collector whatever a test froze (it is one process), with
    automatic collection off meanwhile so that only the code under test collects."""
    gc.unfreeze()
    gc.disable()
    yield
    gc.enable()
    gc.unfreeze()


def test_startup_objects_are_frozen_before_serving(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, unfrozen: None
) -> None:
    routes = tmp_path / "routes.json"
    routes.write_text(json.dumps({"schemaVersion": 1, "models": []}))
    monkeypatch.setenv("CITADEL_GATEWAY_ROUTES_SOURCE", "file")
    monkeypatch.setenv("CITADEL_GATEWAY_ROUTES_FILE", str(routes))
    monkeypatch.setenv("CITADEL_GATEWAY_AUTH", "disabled")
    served: dict[str, Any] = {}
    garbage = weakref.ref(_Cycle())

    def run(server: Any) -> None:
        served["frozen"] = gc.get_freeze_count()
        served["garbage_left"] = garbage() is not None
        served["app"] = server.config.app
        server.started = True

    monkeypatch.setattr(entry._Server, "run", run)
    assert entry.main([]) == 0
    # The app, and what it was built from, sit in the permanent generation when
    # serving starts, so full collections under load do not walk them.
    assert served["frozen"] > 0
    assert not any(obj is served["app"] for obj in gc.get_objects())
    # Garbage from before is freed first, not frozen for good.
    assert not served["garbage_left"]
