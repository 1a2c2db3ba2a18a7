"""OpenAPI descriptions of the forwarded endpoints.

The handlers read raw bytes (validating with pydantic on the hot path would cost
more than the rest of the gateway); these schemas only document the API and feed
schema-driven tests. They list the fields the gateway itself looks at and allow any
other, as the backend receives them unchanged.
"""

from __future__ import annotations

from typing import Any

_MODEL = {"type": "string", "minLength": 1, "description": "Served name or alias."}
_POSITIVE = {"type": "integer", "minimum": 1}
_MESSAGE = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"type": "string", "enum": ["system", "user", "assistant"]},
        "content": {"type": "string"},
    },
}


def _generation(prompt_field: str, prompt: dict[str, Any]) -> dict[str, Any]:
    """A chat or completion request: its prompt field, then the shared ones."""
    return {
        "type": "object",
        "required": ["model", prompt_field],
        "properties": {
            "model": _MODEL,
            prompt_field: prompt,
            "max_tokens": _POSITIVE,
            "max_completion_tokens": _POSITIVE,
            "n": _POSITIVE,
            "temperature": {"type": "number", "minimum": 0, "maximum": 2},
            "stream": {"type": "boolean"},
            "stream_options": {
                "type": "object",
                "properties": {"include_usage": {"type": "boolean"}},
            },
        },
        "additionalProperties": True,
    }


CHAT_REQUEST = _generation(
    "messages", {"type": "array", "minItems": 1, "items": _MESSAGE}
)
COMPLETION_REQUEST = _generation("prompt", {"type": "string"})

EMBEDDING_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _MODEL,
        "input": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": {"type": "string"}, "minItems": 1},
            ]
        },
    },
    "additionalProperties": True,
}

ERROR: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["message", "type", "param", "code"],
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "param": {"type": ["string", "null"]},
                "code": {"type": ["string", "null"]},
            },
        }
    },
}

_ERRORS = {
    "400": "Malformed JSON or an invalid field.",
    "401": "No API key, or an unknown or revoked one.",
    "403": "The key may not use this model.",
    "404": "No such model (`model_not_found`).",
    "413": "The body is larger than the gateway accepts.",
    "429": "A rate limit or quota; see `Retry-After` and `x-ratelimit-*`.",
    "502": "The model's server failed.",
    "503": "No ready replica; see `Retry-After`.",
    "504": "The model's server did not answer in time.",
}


def error_responses() -> dict[int | str, dict[str, Any]]:
    """The documented error responses, in OpenAI's error shape."""
    return {
        code: {
            "description": text,
            "content": {"application/json": {"schema": ERROR}},
        }
        for code, text in _ERRORS.items()
    }


def request_body(schema: dict[str, Any]) -> dict[str, Any]:
    """`openapi_extra` for an endpoint whose body has this schema."""
    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": schema}},
        }
    }
