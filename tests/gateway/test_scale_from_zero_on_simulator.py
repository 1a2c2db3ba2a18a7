"""A model at zero through the real gateway: a request waits, counted as
waiting, until the routes give the model a replica (the simulator), then is
answered; driven with the official `openai` client."""

from __future__ import annotations

import json
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

pytestmark = pytest.mark.integration

WAIT_S = 30.0


def demand(url: str) -> dict[str, float]:
    """The model's `citadel_gateway_model_requests` by state, read as the
    operator's autoscaler reads it (the `name[]` filter)."""
    text = httpx.get(
        url + "/metrics", params={"name[]": "citadel_gateway_model_requests"}
    ).text
    found: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        assert line.startswith("citadel_gateway_model_requests{"), line
        assert 'model_namespace="llm"' in line and 'llmmodel="smol"' in line
        state = line.split('state="', 1)[1].split('"', 1)[0]
        found[state] = float(line.rsplit(" ", 1)[1])
    return found


def write_routes(path: Path, models: list[dict[str, Any]]) -> None:
    """Replaces the routes file whole, as the operator's write is seen (the
    gateway never reads half a file)."""
    draft = path.with_suffix(".draft")
    draft.write_text(json.dumps({"schemaVersion": 1, "models": models}))
    draft.replace(path)


def test_a_request_for_a_model_at_zero_is_answered_once_a_replica_is_routed(
    tmp_path: Path, start_gateway: Any, helpers: Any, smol_replica: str
) -> None:
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "tenant", "--models", "smol")
    at_zero = helpers.route("smol", [], scaleFromZero=True, ready=False)
    gateway = start_gateway(
        [at_zero], keys, scale_from_zero_timeout_seconds=str(WAIT_S * 2)
    )
    assert demand(gateway.url) == {"in_flight": 0, "waiting": 0}
    client = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=WAIT_S * 2
    )
    with client, ThreadPoolExecutor(1) as pool:
        asking = pool.submit(
            client.chat.completions.create,
            model="smol",
            messages=[{"role": "user", "content": "hi"}],
            max_tokens=3,
        )
        deadline = time.monotonic() + WAIT_S
        while demand(gateway.url)["waiting"] != 1 and time.monotonic() < deadline:
            time.sleep(0.05)
        assert demand(gateway.url) == {"in_flight": 0, "waiting": 1}
        assert not asking.done()
        # The autoscaler started a replica: the routes list it.
        write_routes(
            tmp_path / "routes.json",
            [{**at_zero, "endpoints": [smol_replica], "ready": True}],
        )
        chat = asking.result(timeout=WAIT_S)
    assert chat.model == "smol"
    assert chat.usage is not None and chat.usage.completion_tokens == 3
    assert demand(gateway.url) == {"in_flight": 0, "waiting": 0}
    assert helpers.counted(gateway.url, "citadel_gateway_requests_total") == 1
