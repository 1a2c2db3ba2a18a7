"""The real CPU vLLM answers through the official openai client (`make vllm` first)."""

from __future__ import annotations

import time

import openai
import pytest
from vllm_fixtures import SMOLLM2_SERVED
from vllm_server import VLLMServer, parse_metrics

pytestmark = pytest.mark.vllm

# What the gateway's queue- and KV-aware routing scrapes (DESIGN.md section 4).
ROUTING_GAUGES = (
    "vllm:num_requests_running",
    "vllm:num_requests_waiting",
    "vllm:kv_cache_usage_perc",
)
# Counters, in tokens; the CPU engine caches prefixes by default in blocks of 128.
PREFIX_CACHE_COUNTERS = (
    "vllm:prefix_cache_queries_total",
    "vllm:prefix_cache_hits_total",
)


def client(server: VLLMServer) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.openai_url, api_key="unused", timeout=60)


def test_models_lists_the_served_name(smollm2_server: VLLMServer) -> None:
    ids = [m.id for m in client(smollm2_server).models.list()]
    assert ids == [SMOLLM2_SERVED]


def test_chat_completion_knows_paris(smollm2_server: VLLMServer) -> None:
    start = time.monotonic()
    resp = client(smollm2_server).chat.completions.create(
        model=SMOLLM2_SERVED,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
    )
    elapsed = time.monotonic() - start
    answer = resp.choices[0].message.content or ""
    print(f"answer in {elapsed:.2f}s: {answer!r}; usage {resp.usage}")
    assert "Paris" in answer
    assert resp.usage is not None and resp.usage.completion_tokens > 0


def test_completion(smollm2_server: VLLMServer) -> None:
    resp = client(smollm2_server).completions.create(
        model=SMOLLM2_SERVED, prompt="The capital of France is", max_tokens=8
    )
    assert resp.choices[0].text
    assert resp.usage is not None and resp.usage.prompt_tokens > 0


def test_streaming_reports_usage_in_the_last_chunk(
    smollm2_server: VLLMServer,
) -> None:
    stream = client(smollm2_server).chat.completions.create(
        model=SMOLLM2_SERVED,
        messages=[{"role": "user", "content": "What is the capital of France?"}],
        max_tokens=24,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    assert len(chunks) > 2
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert last.usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1])


def test_metrics_for_routing(smollm2_server: VLLMServer) -> None:
    names = set(parse_metrics(smollm2_server.metrics()))
    print("vllm metrics:", " ".join(sorted(n for n in names if n.startswith("vllm:"))))
    for name in ROUTING_GAUGES + PREFIX_CACHE_COUNTERS:
        assert name in names
    assert 0.0 <= smollm2_server.metric("vllm:kv_cache_usage_perc") <= 1.0


def test_prefix_cache_hits_count_tokens(smollm2_server: VLLMServer) -> None:
    # Over two 128-token blocks, sent twice: the second time the full blocks hit.
    prompt = "Count with me: " + " ".join(str(i) for i in range(200))
    hits = "vllm:prefix_cache_hits_total"
    before = smollm2_server.metric(hits)
    for _ in range(2):
        client(smollm2_server).completions.create(
            model=SMOLLM2_SERVED, prompt=prompt, max_tokens=1
        )
    gained = smollm2_server.metric(hits) - before
    print(f"prefix cache hits gained: {gained:.0f} tokens")
    assert gained >= 128


def test_tiny_random_serves(tiny_random_server: VLLMServer) -> None:
    resp = client(tiny_random_server).completions.create(
        model="tiny-random",
        prompt="Hello",
        max_tokens=4,
        temperature=0,
        extra_body={"ignore_eos": True},  # vLLM's own sampling parameter
    )
    assert resp.usage is not None and resp.usage.completion_tokens == 4
