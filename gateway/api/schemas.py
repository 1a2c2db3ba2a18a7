"""OpenAPI descriptions of the forwarded endpoints.

The handlers read raw bytes (validating with pydantic on the hot path would cost
more than the rest of the gateway); these schemas only document the API and feed
schema-driven tests. They describe OpenAI's request shapes as wide as the gateway
forwards them (content parts, tool messages, token-id prompts) and allow any other
field, as the backend receives them unchanged. Every body they describe passes the
gateway's own checks (`citadel.gateway.services.requests.parse_body`) but for one
gap JSON Schema cannot close: it counts 2.0 as an integer, which the gateway
refuses where it wants one (`max_tokens`, `n`, `max_output_tokens`).
"""

from __future__ import annotations

from typing import Any

_MODEL = {
    "type": "string",
    "minLength": 1,
    "description": "Served name, alias or LoRA adapter name.",
}
_POSITIVE = {"type": "integer", "minimum": 1}
_PART = {
    "type": "object",
    "required": ["type"],
    "properties": {
        "type": {
            "type": "string",
            "description": "`text`, `image_url`, `input_audio`, `file`, ...",
        },
        "text": {"type": "string"},
    },
    "additionalProperties": True,
}
_TOOL_CALL = {
    "type": "object",
    "required": ["id", "type", "function"],
    "properties": {
        "id": {"type": "string"},
        "type": {"type": "string", "enum": ["function"]},
        "function": {
            "type": "object",
            "required": ["name", "arguments"],
            "properties": {
                "name": {"type": "string"},
                "arguments": {"type": "string", "description": "JSON text."},
            },
        },
    },
}
# One schema for every role, as wide as what the gateway forwards: which fields
# a role needs (`content`, except on an assistant message with `tool_calls`;
# `tool_call_id` on a tool message) is for the model's server to check.
_MESSAGE = {
    "type": "object",
    "required": ["role"],
    "properties": {
        "role": {
            "type": "string",
            "enum": ["developer", "system", "user", "assistant", "tool"],
        },
        "content": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "minItems": 1, "items": _PART},
                {"type": "null"},
            ],
            "description": "Text, content parts, or null beside `tool_calls`.",
        },
        "name": {"type": "string"},
        "tool_calls": {"type": "array", "items": _TOOL_CALL},
        "tool_call_id": {"type": "string"},
    },
    "additionalProperties": True,
}
_TOKENS = {"type": "array", "minItems": 1, "items": {"type": "integer", "minimum": 0}}
_PROMPT = {
    "oneOf": [
        {"type": "string"},
        {"type": "array", "minItems": 1, "items": {"type": "string"}},
        _TOKENS,
        {"type": "array", "minItems": 1, "items": _TOKENS},
    ],
    "description": "A text, texts, token ids, or lists of token ids.",
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
COMPLETION_REQUEST = _generation("prompt", _PROMPT)

EMBEDDING_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _MODEL,
        "input": _PROMPT,
    },
    "additionalProperties": True,
}

# Any item of a Responses `input`: a message (with `role`, and `"type":
# "message"` or none), a function call, its output, reasoning; the gateway
# reads each as an object and forwards it as it is.
_INPUT_ITEM = {
    "type": "object",
    "properties": {
        "type": {
            "type": "string",
            "description": "`message`, `function_call`, `function_call_output`, "
            "`reasoning`, ...",
        },
        "role": {
            "type": "string",
            "enum": ["developer", "system", "user", "assistant"],
        },
        "content": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": _PART},
            ],
            "description": "Text, or parts (`input_text`, `input_image`, ...).",
        },
    },
    "additionalProperties": True,
}

RESPONSE_REQUEST: dict[str, Any] = {
    "type": "object",
    "required": ["model", "input"],
    "properties": {
        "model": _MODEL,
        "input": {
            "oneOf": [
                {"type": "string"},
                {"type": "array", "items": _INPUT_ITEM},
            ],
            "description": "A text (one user message), or input items.",
        },
        "instructions": {"type": "string", "description": "The system message."},
        "max_output_tokens": _POSITIVE,
        "temperature": {"type": "number", "minimum": 0, "maximum": 2},
        "stream": {"type": "boolean"},
        "previous_response_id": {
            "type": "string",
            "description": "Forwarded as it is: the gateway keeps no responses, "
            "and the model's server answers 404 unless it stores them.",
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
