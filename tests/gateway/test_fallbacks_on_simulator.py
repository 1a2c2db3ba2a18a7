"""A model's fallbacks through the real gateway: `big`, whose one replica
refuses connections, is answered by its fallback `smol` (the simulator);
driven with the official `openai` client."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.integration

HEADER = "x-citadel-fallback"


def test_a_model_that_cannot_answer_is_answered_by_its_fallback(
    tmp_path: Path, start_gateway: Any, helpers: Any, smol_replica: str
) -> None:
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "tenant", "--models", "big", "smol")
    # Nothing listens there: every connection is refused.
    nowhere = f"http://127.0.0.1:{helpers.free_port()}"
    big = helpers.route("big", [], endpoints=[nowhere], fallbacks=["smol"])
    smol = helpers.route("smol", [], endpoints=[smol_replica])
    gateway = start_gateway([big, smol], keys)
    client = openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30
    )
    messages: Any = [{"role": "user", "content": "hi"}]
    with client:
        raw = client.chat.completions.with_raw_response.create(
            model="big", messages=messages, max_tokens=3
        )
        assert raw.headers[HEADER] == "smol"
        chat = raw.parse()
        assert chat.model == "smol"  # the simulator's answer, as smol
        assert chat.usage is not None and chat.usage.completion_tokens == 3
        with client.chat.completions.with_streaming_response.create(
            model="big",
            messages=messages,
            max_tokens=3,
            stream=True,
            stream_options={"include_usage": True},
        ) as streamed:
            assert streamed.headers[HEADER] == "smol"
            chunks = list(streamed.parse())
    assert {c.model for c in chunks} == {"smol"}
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 3
    fallbacks = helpers.counted(
        gateway.url,
        "citadel_gateway_fallbacks_total",
        model="big",
        fallback="smol",
        reason="no_replica",
    )
    assert fallbacks == 2
    # Counted once each, under the model that answered.
    requests = "citadel_gateway_requests_total"
    assert helpers.counted(gateway.url, requests, model="smol", status="200") == 2
    assert helpers.counted(gateway.url, requests, model="big") == 0
