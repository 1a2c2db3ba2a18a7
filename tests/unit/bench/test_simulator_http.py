"""The simulator's HTTP side, in process (aiohttp's test server on loopback)."""

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from citadel_bench.loadgen import parse_sse_text
from simulator.params import SimParams
from simulator.server import make_app

pytestmark = pytest.mark.unit

CHAT = {"model": "sim", "messages": [{"role": "user", "content": "hi " * 40}]}


@pytest.fixture
async def client() -> AsyncIterator[TestClient[object, object]]:
    params = SimParams(decode_base_s=0.001, decode_per_seq_s=0.0, block_size=4)
    async with TestClient(TestServer(make_app(params, "sim"))) as c:
        yield c


async def test_chat_answers_with_usage(client: TestClient[object, object]) -> None:
    response = await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    answer = await response.json()
    assert response.status == 200
    assert answer["choices"][0]["message"]["content"] == "lor ips dol "
    assert answer["usage"]["completion_tokens"] == 3
    again = await (
        await client.post("/v1/chat/completions", json={**CHAT, "max_tokens": 3})
    ).json()
    assert again["usage"]["prompt_tokens_details"]["cached_tokens"] > 0


async def test_stream_with_usage(client: TestClient[object, object]) -> None:
    body = {
        **CHAT,
        "max_tokens": 4,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    response = await client.post("/v1/chat/completions", json=body)
    payload = await response.read()
    assert parse_sse_text(payload) == "lor ips dol sit "
    assert b'"usage"' in payload and payload.endswith(b"data: [DONE]\n\n")


async def test_models_health_metrics_and_errors(
    client: TestClient[object, object],
) -> None:
    models = await (await client.get("/v1/models")).json()
    assert models["data"][0]["id"] == "sim"
    assert (await client.get("/health")).status == 200
    text = await (await client.get("/metrics")).text()
    assert "vllm:kv_cache_usage_perc" in text
    bad = await client.post("/v1/completions", data=b"{")
    assert bad.status == 400
    too_long = await client.post(
        "/v1/completions", json={"prompt": "x", "max_tokens": 10**6}
    )
    assert too_long.status == 400
