"""The simulator's `POST /v1/responses`, in process, against vLLM 0.32.0's shapes
(measured on the CPU vLLM: an answer, a stream, the errors)."""

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from aiohttp.test_utils import TestClient, TestServer
from simulator.params import SimParams
from simulator.server import ENGINE, make_app

pytestmark = pytest.mark.unit

PROMPT = "hi " * 40
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


def make_client(**options: Any) -> TestClient[object, object]:
    params = SimParams(
        decode_base_s=0.001, decode_per_seq_s=0.0, block_size=4, **options
    )
    return TestClient(TestServer(make_app(params, "sim")))


@pytest.fixture
async def client() -> AsyncIterator[TestClient[object, object]]:
    async with make_client() as c:
        yield c


def events(payload: bytes) -> list[tuple[str, dict[str, Any]]]:
    """(event name, data) per event; checks each names its own type."""
    found = []
    for block in payload.decode().split("\n\n"):
        if not block:
            continue
        head, data = block.split("\n")
        name = head.removeprefix("event: ")
        body = orjson.loads(data.removeprefix("data: "))
        assert body["type"] == name
        found.append((name, body))
    return found


async def post(
    client: TestClient[object, object], **body: Any
) -> tuple[int, dict[str, Any]]:
    response = await client.post("/v1/responses", json={"model": "sim", **body})
    return response.status, await response.json()


async def test_answer_has_vllms_shape_and_usage(
    client: TestClient[object, object],
) -> None:
    status, answer = await post(client, input=PROMPT, max_output_tokens=3)
    assert status == 200
    assert answer["object"] == "response" and answer["id"].startswith("resp_")
    assert answer["status"] == "incomplete"
    assert answer["incomplete_details"] == {"reason": "max_output_tokens"}
    [item] = answer["output"]
    assert item["type"] == "message" and item["role"] == "assistant"
    assert item["status"] == "completed" and item["id"].startswith("msg_")
    assert item["content"] == [
        {
            "annotations": [],
            "text": "lor ips dol ",
            "type": "output_text",
            "logprobs": None,
        }
    ]
    usage = answer["usage"]
    assert usage["output_tokens"] == 3
    assert usage["total_tokens"] == usage["input_tokens"] + 3
    assert usage["input_tokens_details"]["cached_tokens"] == 0
    assert answer["max_output_tokens"] == 3 and answer["model"] == "sim"


async def test_without_max_output_tokens_it_completes(
    client: TestClient[object, object],
) -> None:
    _, answer = await post(client, input="hello")
    assert answer["status"] == "completed" and answer["incomplete_details"] is None
    assert answer["usage"]["output_tokens"] == SimParams().default_max_tokens


async def test_prompt_is_rendered_as_the_chat_one(
    client: TestClient[object, object],
) -> None:
    """instructions + input make the prompt chat's system + user messages make:
    the same count of input tokens as the chat route."""
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": PROMPT},
    ]
    chat = await client.post(
        "/v1/chat/completions",
        json={"model": "sim", "messages": messages, "max_tokens": 1},
    )
    prompt_tokens = (await chat.json())["usage"]["prompt_tokens"]
    parts = [{"role": "user", "content": [{"type": "input_text", "text": PROMPT}]}]
    for given in (PROMPT, parts):
        _, answer = await post(
            client, instructions="Be brief.", input=given, max_output_tokens=1
        )
        assert answer["usage"]["input_tokens"] == prompt_tokens


async def test_a_resent_conversation_hits_the_prefix_cache(
    client: TestClient[object, object],
) -> None:
    turn: list[Any] = [{"role": "user", "content": PROMPT}]
    _, first = await post(client, input=turn, max_output_tokens=8)
    reply = first["output"][0]["content"]
    turn += [
        {"type": "message", "role": "assistant", "content": reply},
        {"role": "user", "content": "and then?"},
    ]
    _, second = await post(client, input=turn, max_output_tokens=8)
    # The first turn's prompt and its reply's full blocks are cached.
    cached = second["usage"]["input_tokens_details"]["cached_tokens"]
    assert cached >= first["usage"]["input_tokens"]
    metrics = await (await client.get("/metrics")).text()
    assert 'vllm:request_success_total{engine="0",finished_reason="length",' in metrics
    assert 'model_name="sim"} 2.0' in metrics
    hits = f'vllm:prefix_cache_hits_total{{engine="0",model_name="sim"}} {cached}.0'
    assert hits in metrics


async def test_stream_sends_vllms_events_in_order(
    client: TestClient[object, object],
) -> None:
    response = await client.post(
        "/v1/responses",
        json={"model": "sim", "input": PROMPT, "max_output_tokens": 3, "stream": True},
    )
    assert response.headers["content-type"].startswith("text/event-stream")
    found = events(await response.read())
    assert [name for name, _ in found] == EVENTS
    assert [body["sequence_number"] for _, body in found] == list(range(len(EVENTS)))
    deltas = "".join(b["delta"] for n, b in found if n.endswith("text.delta"))
    assert deltas == "lor ips dol "
    assert found[7][1]["text"] == deltas
    assert found[1][1]["response"]["status"] == "in_progress"
    last = found[-1][1]["response"]
    assert last["status"] == "incomplete"
    assert last["output"][0]["content"][0]["text"] == deltas
    assert last["usage"]["output_tokens"] == 3
    item_ids = {b.get("item_id") or b["item"]["id"] for _, b in found[2:-1]}
    assert item_ids == {last["output"][0]["id"]}


@pytest.mark.parametrize("option", [{}, {"instant": True}, {"stream_every": 2}])
async def test_stream_options_apply(option: dict[str, Any]) -> None:
    async with make_client(**option) as client:
        response = await client.post(
            "/v1/responses",
            json={"input": PROMPT, "max_output_tokens": 5, "stream": True},
        )
        found = events(await response.read())
    deltas = [b["delta"] for n, b in found if n == "response.output_text.delta"]
    # Every token, or the first alone then every second (and the last).
    expected = 3 if option.get("stream_every") == 2 else 5
    assert len(deltas) == expected
    assert "".join(deltas) == "lor ips dol sit ame "
    assert found[-1][0] == "response.completed"


async def test_previous_response_id_is_not_found_as_without_a_store(
    client: TestClient[object, object],
) -> None:
    status, answer = await post(client, input="hi", previous_response_id="resp_abc")
    assert status == 404
    assert answer == {
        "error": {
            "message": "Response with id 'resp_abc' not found.",
            "type": "invalid_request_error",
            "param": "response_id",
            "code": 404,
        }
    }


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"input": 42},
        {"input": [{"role": "user"}]},
        {"input": ["hi"]},
        {"input": [{"role": "user", "content": [{"type": "input_text"}]}]},
        {"input": "hi", "instructions": 3},
        {"input": "hi", "max_output_tokens": "many"},
        {"input": "hi", "max_output_tokens": 10**6},
        {"input": "hi", "max_output_tokens": False},
        {"input": "hi", "max_output_tokens": 2.5},
        {"input": [{"type": "message", "content": "no role"}]},
        {"input": []},
        {"input": "hi", "background": True},
        {"input": "hi", "background": True, "store": False},
    ],
)
async def test_bad_requests_are_400(
    client: TestClient[object, object], body: dict[str, Any]
) -> None:
    status, answer = await post(client, **body)
    assert status == 400
    assert answer["error"]["code"] == 400 and answer["error"]["message"]


@pytest.mark.parametrize(
    ("body", "tokens"),
    [
        # As vLLM 0.32 reads them (measured on the CPU vLLM with SmolLM2):
        # `true` is 1, instructions alone are a conversation.
        ({"input": "hi", "max_output_tokens": True}, 1),
        ({"input": "hi", "max_output_tokens": "3"}, 3),
        ({"input": "hi", "max_output_tokens": 2.0}, 2),
        ({"input": [], "instructions": "Be brief.", "max_output_tokens": 2}, 2),
        (
            {
                "input": [
                    {"role": "user", "content": "weather?"},
                    {"type": "function_call", "call_id": "c1", "name": "w"},
                    {"type": "function_call_output", "call_id": "c1", "output": "1"},
                    {"type": "reasoning", "id": "rs_1", "summary": []},
                ],
                "max_output_tokens": 2,
            },
            2,
        ),
    ],
)
async def test_what_vllm_takes_is_taken(
    client: TestClient[object, object], body: dict[str, Any], tokens: int
) -> None:
    status, answer = await post(client, **body)
    assert status == 200, answer
    assert answer["usage"]["output_tokens"] == tokens


async def test_items_other_than_messages_are_prefilled(
    client: TestClient[object, object],
) -> None:
    ask = {"role": "user", "content": "weather?"}
    call = {"type": "function_call", "call_id": "c1", "name": "w", "arguments": "{}"}
    _, alone = await post(client, input=[ask], max_output_tokens=1)
    _, more = await post(client, input=[ask, call], max_output_tokens=1)
    assert more["usage"]["input_tokens"] > alone["usage"]["input_tokens"]


async def test_a_stream_left_early_frees_its_request() -> None:
    params = SimParams(decode_base_s=0.02, block_size=4)
    app = make_app(params, "sim")
    async with TestClient(TestServer(app)) as client:
        response = await client.post(
            "/v1/responses",
            json={"input": PROMPT, "max_output_tokens": 500, "stream": True},
        )
        seen = b""
        while b"output_text.delta" not in seen:
            seen += await response.content.readany()
        response.close()
        engine = app[ENGINE]
        for _ in range(100):
            if not engine.running:
                break
            await asyncio.sleep(0.01)
        assert not engine.running and engine.counters.requests_finished == 0
