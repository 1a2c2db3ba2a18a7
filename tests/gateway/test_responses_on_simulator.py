"""OpenAI's Responses API (`POST /v1/responses`) through the real gateway to the
simulator (bench/simulator, which serves it as vLLM 0.32.0 does), driven with the
official `openai` client."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.integration

# What vLLM 0.32.0 sends for a reply of three tokens, one delta per token.
EVENTS = [
    "response.created",
    "response.in_progress",
    "response.output_item.added",
    "response.content_part.added",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.delta",
    "response.output_text.done",
    "response.content_part.done",
    "response.output_item.done",
    "response.completed",
]


@pytest.fixture
def setup(
    tmp_path: Path, start_gateway: Any, helpers: Any, smol_replica: str
) -> Iterator[dict[str, Any]]:
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "alice", "--models", "smol*", "chat")
    models = [
        helpers.route("smol", [], aliases=["chat"], endpoints=[smol_replica]),
        helpers.route("other", [], endpoints=[smol_replica]),
    ]
    gateway = start_gateway(models, keys)
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=0, timeout=30
    ) as client:
        yield {"client": client, "gateway": gateway, "replica": smol_replica}


def test_response_with_output_text_and_usage(setup: dict[str, Any]) -> None:
    client: openai.OpenAI = setup["client"]
    answer = client.responses.create(
        model="chat", input="Say hi", instructions="Be brief.", max_output_tokens=3
    )
    assert answer.output_text == "lor ips dol "
    assert answer.model == "smol"  # the alias became the served name
    assert answer.status == "incomplete"
    assert answer.usage is not None
    assert answer.usage.output_tokens == 3 and answer.usage.input_tokens > 0
    assert answer.usage.total_tokens == answer.usage.input_tokens + 3


def test_stream_events_arrive_in_order_and_end_with_usage(
    setup: dict[str, Any],
) -> None:
    client: openai.OpenAI = setup["client"]
    events = list(
        client.responses.create(
            model="smol", input="Say hi", max_output_tokens=3, stream=True
        )
    )
    assert [e.type for e in events] == EVENTS
    assert [e.sequence_number for e in events] == list(range(len(EVENTS)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    last = events[-1]
    assert last.type == "response.completed"
    assert text == last.response.output_text == "lor ips dol "
    assert last.response.usage is not None
    assert last.response.usage.output_tokens == 3


def test_gateway_and_replica_count_responses(
    setup: dict[str, Any], helpers: Any
) -> None:
    client: openai.OpenAI = setup["client"]
    url = setup["gateway"].url
    whole = client.responses.create(model="smol", input="One", max_output_tokens=3)
    events = list(
        client.responses.create(
            model="smol", input="Two", max_output_tokens=4, stream=True
        )
    )
    final = events[-1]
    assert final.type == "response.completed"
    assert whole.usage is not None and final.response.usage is not None
    prompt = whole.usage.input_tokens + final.response.usage.input_tokens
    ok = {"api": "responses", "model": "smol", "key": "alice", "status": "200"}
    assert helpers.counted(url, "citadel_gateway_requests_total", **ok) == 2
    tokens = "citadel_gateway_tokens_total"
    mine = {"model": "smol", "key": "alice"}
    assert helpers.counted(url, tokens, kind="completion", **mine) == 7
    assert helpers.counted(url, tokens, kind="prompt", **mine) == prompt
    # The replica counts them as vLLM does a chat request.
    replica = setup["replica"]
    assert helpers.counted(replica, "vllm:request_success_total") == 2
    assert helpers.counted(replica, "vllm:generation_tokens_total") == 7


def test_errors_have_openai_types(setup: dict[str, Any]) -> None:
    client: openai.OpenAI = setup["client"]
    with pytest.raises(openai.PermissionDeniedError):
        client.responses.create(model="other", input="hi")
    with pytest.raises(openai.NotFoundError) as missing:
        client.responses.create(model="nope", input="hi")
    assert missing.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.responses.create(model="smol", input=42)  # type: ignore[arg-type]
    # The replica's own 404 (vLLM keeps no responses here) comes back as it is.
    with pytest.raises(openai.NotFoundError) as unknown:
        client.responses.create(
            model="smol", input="hi", previous_response_id="resp_gone"
        )
    assert unknown.value.message.endswith("Response with id 'resp_gone' not found.")
