"""The OpenAPI document: it describes the requests the gateway forwards, and none
that the gateway refuses itself."""

from __future__ import annotations

from typing import Any

import jsonschema_rs
import pytest

pytestmark = pytest.mark.unit

# What OpenAI's API takes beyond plain text, all of it forwarded as it is.
OPENAI_SHAPES: list[tuple[str, dict[str, Any]]] = [
    (
        "/v1/chat/completions",
        {
            "model": "chat",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "What is this?"},
                        {"type": "image_url", "image_url": {"url": "https://x/a.png"}},
                    ],
                }
            ],
        },
    ),
    (
        "/v1/chat/completions",
        {
            "model": "chat",
            "tools": [{"type": "function", "function": {"name": "f"}}],
            "messages": [
                {"role": "developer", "content": "Use the tools."},
                {"role": "user", "content": "f?"},
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "id": "c1",
                            "type": "function",
                            "function": {"name": "f", "arguments": "{}"},
                        }
                    ],
                },
                {"role": "tool", "tool_call_id": "c1", "content": "42"},
            ],
        },
    ),
    ("/v1/completions", {"model": "chat", "prompt": ["one", "two"]}),
    ("/v1/completions", {"model": "chat", "prompt": [1, 2, 3]}),
    ("/v1/completions", {"model": "chat", "prompt": [[1, 2], [3]]}),
    ("/v1/embeddings", {"model": "chat", "input": [1, 2, 3]}),
    ("/v1/embeddings", {"model": "chat", "input": [[1, 2], [3]]}),
    ("/v1/responses", {"model": "chat", "input": "hi", "instructions": "Be brief."}),
    (
        "/v1/responses",
        {
            "model": "chat",
            "max_output_tokens": 16,
            "tools": [{"type": "function", "name": "f", "parameters": {}}],
            "input": [
                {
                    "role": "user",
                    "content": [
                        {"type": "input_text", "text": "What is this?"},
                        {"type": "input_image", "image_url": "https://x/a.png"},
                    ],
                },
                {"type": "function_call", "call_id": "c1", "name": "f"},
                {"type": "function_call_output", "call_id": "c1", "output": "42"},
                {"type": "reasoning", "summary": []},
            ],
        },
    ),
]

# Bodies the gateway refuses itself (400), which the document must not describe.
REFUSED: list[tuple[str, dict[str, Any]]] = [
    ("/v1/chat/completions", {"model": "chat", "messages": []}),
    ("/v1/chat/completions", {"model": "chat", "messages": ["hi"]}),
    ("/v1/chat/completions", {"model": "", "messages": [{"role": "user"}]}),
    ("/v1/completions", {"model": "chat", "prompt": None}),
    ("/v1/completions", {"model": "chat", "prompt": 7}),
    ("/v1/completions", {"model": "chat", "prompt": "x", "max_tokens": 0}),
    ("/v1/completions", {"model": "chat", "prompt": "x", "stream": "yes"}),
    ("/v1/embeddings", {"model": "chat"}),
    ("/v1/responses", {"model": "chat"}),
    ("/v1/responses", {"model": "chat", "input": 5}),
    ("/v1/responses", {"model": "chat", "input": ["hi"]}),
    ("/v1/responses", {"model": "chat", "input": "x", "instructions": 5}),
    ("/v1/responses", {"model": "chat", "input": "x", "max_output_tokens": 0}),
]


async def _document(harness: Any) -> dict[str, Any]:
    async with harness.client() as client:
        answer = await client.get("/openapi.json")
    document: dict[str, Any] = answer.json()
    return document


def _body_schema(document: dict[str, Any], path: str) -> dict[str, Any]:
    body = document["paths"][path]["post"]["requestBody"]
    schema: dict[str, Any] = body["content"]["application/json"]["schema"]
    return schema


def _describes(document: dict[str, Any], path: str, body: Any) -> bool:
    schema = _body_schema(document, path)
    return bool(jsonschema_rs.Draft202012Validator(schema).is_valid(body))


@pytest.mark.parametrize(("path", "body"), OPENAI_SHAPES)
async def test_openai_request_shapes_are_documented_and_forwarded(
    harness: Any, path: str, body: dict[str, Any]
) -> None:
    assert _describes(await _document(harness), path, body)
    async with harness.client() as client:
        answer = await client.post(path, json=body)
    assert answer.status_code == 200
    assert harness.upstream.calls[-1][1] == {**body, "model": "smollm2"}


@pytest.mark.parametrize(("path", "body"), REFUSED)
async def test_bodies_the_gateway_refuses_are_not_documented(
    harness: Any, path: str, body: dict[str, Any]
) -> None:
    assert not _describes(await _document(harness), path, body)
    async with harness.client() as client:
        answer = await client.post(path, json=body)
    assert answer.status_code == 400
    assert not harness.upstream.calls
