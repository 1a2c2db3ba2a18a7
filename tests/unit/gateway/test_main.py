"""The gateway's entry point."""

from __future__ import annotations

import gc
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from citadel.gateway import main as entry

pytestmark = pytest.mark.unit


@pytest.fixture
def unfrozen() -> Iterator[None]:
    """Gives back to the collector whatever a test froze (it is one process)."""
    gc.unfreeze()
    yield
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

    def run(app: object, **options: Any) -> None:
        served["frozen"] = gc.get_freeze_count()
        served["app"] = app

    monkeypatch.setattr(entry.uvicorn, "run", run)
    assert entry.main([]) == 0
    # The app, and what it was built from, sit in the permanent generation when
    # serving starts, so full collections under load do not walk them.
    assert served["frozen"] > 0
    assert not any(obj is served["app"] for obj in gc.get_objects())
