"""The gateway in front of the real CPU vLLM, driven with the official client.

Needs `make vllm` (skipped with the reason otherwise): run with
`.venv/bin/pytest -m vllm tests/gateway/vllm`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from vllm_fixtures import SMOLLM2_ADAPTER_SERVED
from vllm_server import VLLMServer

pytestmark = pytest.mark.vllm

QUESTION: Any = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture
def gateway(
    tmp_path: Path, smollm2_server: VLLMServer, start_gateway: Any, helpers: Any
) -> tuple[Any, str, str]:
    """(a gateway in front of vLLM, a key for smollm2, its alias and its adapter,
    a key for smollm2 alone)."""
    keys = tmp_path / "keys.json"
    key = helpers.create_key(
        keys, "vllm-user", "--models", "smollm2", "smol-chat", SMOLLM2_ADAPTER_SERVED
    )
    base_only = helpers.create_key(keys, "base-only", "--models", "smollm2")
    route = {
        "name": "smollm2",
        "namespace": "llm",
        "servedName": "smollm2",
        "aliases": ["smol-chat"],
        "adapters": [SMOLLM2_ADAPTER_SERVED],
        "service": "smollm2",
        "endpoints": [smollm2_server.base_url],
    }
    return start_gateway([route], keys), key, base_only


@pytest.fixture
def clients(
    gateway: tuple[Any, str, str], smollm2_server: VLLMServer
) -> Iterator[tuple[openai.OpenAI, openai.OpenAI]]:
    """(through the gateway, straight to vLLM)."""
    started, key, _ = gateway
    via = openai.OpenAI(
        base_url=started.url + "/v1", api_key=key, max_retries=0, timeout=120
    )
    direct = openai.OpenAI(
        base_url=smollm2_server.openai_url, api_key="unused", timeout=120
    )
    with via, direct:
        yield via, direct


def test_chat_through_the_gateway_knows_paris(clients: Any) -> None:
    via, _ = clients
    answer = via.chat.completions.create(
        model="smol-chat", messages=QUESTION, max_tokens=24, temperature=0
    )
    assert "Paris" in (answer.choices[0].message.content or "")
    assert answer.model == "smollm2"
    assert answer.usage is not None and answer.usage.prompt_tokens > 0


def test_completion_and_streaming_with_usage(clients: Any) -> None:
    via, _ = clients
    completion = via.completions.create(
        model="smollm2", prompt="The capital of France is", max_tokens=8, temperature=0
    )
    assert completion.choices[0].text
    chunks = list(
        via.chat.completions.create(
            model="smollm2",
            messages=QUESTION,
            max_tokens=16,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert "Paris" in text
    usage = chunks[-1].usage
    assert usage is not None and usage.completion_tokens > 0
    silent = list(
        via.completions.create(
            model="smollm2", prompt="Hello", max_tokens=4, stream=True
        )
    )
    assert silent and all(c.usage is None for c in silent)


def test_vllm_parameters_the_gateway_does_not_know_pass_through(
    clients: Any,
) -> None:
    via, direct = clients
    extra = {"ignore_eos": True, "top_k": 1}
    answers = [
        client.completions.create(
            model="smollm2",
            prompt="Hi",
            max_tokens=12,
            temperature=0,
            extra_body=extra,
        )
        for client in (via, direct)
    ]
    # ignore_eos forces all 12 tokens: only if the gateway forwarded it.
    assert [a.usage.completion_tokens for a in answers] == [12, 12]
    assert answers[0].choices[0].text == answers[1].choices[0].text


def test_errors_from_the_gateway_and_from_vllm(clients: Any) -> None:
    via, _ = clients
    with pytest.raises(openai.NotFoundError):
        via.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.BadRequestError):
        # vLLM refuses a reply longer than the model's context: its 400 passes.
        via.chat.completions.create(
            model="smollm2", messages=QUESTION, max_tokens=10_000_000
        )


def test_responses_through_the_gateway_with_usage_counted(
    gateway: tuple[Any, str, str], clients: Any
) -> None:
    via, _ = clients
    answer = via.responses.create(
        model="smol-chat", input="What is the capital of France?", max_output_tokens=16
    )
    assert answer.output_text and answer.model == "smollm2"
    assert answer.usage is not None and answer.usage.output_tokens > 0
    events = list(
        via.responses.create(
            model="smollm2", input=QUESTION, max_output_tokens=16, stream=True
        )
    )
    assert events[0].type == "response.created"
    last = events[-1]
    assert last.type == "response.completed" and last.response.usage is not None
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text and text == last.response.output_text
    started, _, _ = gateway
    lines = httpx.get(started.url + "/metrics").text.splitlines()

    def counted(name: str, *labels: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith(name + "{") and all(x in line for x in labels)
        )

    tokens = counted(
        "citadel_gateway_tokens_total", 'kind="completion"', 'model="smollm2"'
    )
    assert tokens == answer.usage.output_tokens + last.response.usage.output_tokens
    assert counted("citadel_gateway_requests_total", 'api="responses"') == 2


def test_adapter_through_the_gateway_as_vllm_answers_it(
    gateway: tuple[Any, str, str], clients: Any
) -> None:
    """A request naming the model's LoRA adapter reaches vLLM under that name:
    the answer is vLLM's own for the adapter, not the base model's."""
    via, direct = clients

    def ask(client: openai.OpenAI, model: str) -> Any:
        return client.chat.completions.create(
            model=model, messages=QUESTION, max_tokens=12, temperature=0
        )

    adapted = ask(via, SMOLLM2_ADAPTER_SERVED)
    assert adapted.model == SMOLLM2_ADAPTER_SERVED
    assert adapted.choices[0].message.content == (
        ask(direct, SMOLLM2_ADAPTER_SERVED).choices[0].message.content
    )
    assert adapted.choices[0].message.content != (
        ask(via, "smollm2").choices[0].message.content
    )
    chunks = list(
        via.chat.completions.create(
            model=SMOLLM2_ADAPTER_SERVED,
            messages=QUESTION,
            max_tokens=12,
            temperature=0,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == adapted.choices[0].message.content
    listed = {m.id for m in via.models.list()}
    assert {"smollm2", "smol-chat", SMOLLM2_ADAPTER_SERVED} <= listed
    started, _, _ = gateway
    lines = httpx.get(started.url + "/metrics").text.splitlines()
    assert any(
        line.startswith("citadel_gateway_requests_total{")
        and f'model="{SMOLLM2_ADAPTER_SERVED}"' in line
        for line in lines
    )


def test_a_key_for_the_base_model_may_not_use_its_adapter(
    gateway: tuple[Any, str, str],
) -> None:
    """An adapter is a model of its own to keys: the base model's key is refused
    it, and does not see it listed."""
    started, _, base_only = gateway
    with openai.OpenAI(
        base_url=started.url + "/v1", api_key=base_only, max_retries=0, timeout=120
    ) as client:
        with pytest.raises(openai.PermissionDeniedError):
            client.chat.completions.create(
                model=SMOLLM2_ADAPTER_SERVED, messages=QUESTION, max_tokens=4
            )
        assert SMOLLM2_ADAPTER_SERVED not in {m.id for m in client.models.list()}
