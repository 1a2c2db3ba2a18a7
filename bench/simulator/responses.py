"""OpenAI's Responses API as vLLM 0.32.0 serves it: the request read into chat
messages, and the response object and stream events built, without any I/O.

The shapes are those the CPU vLLM 0.32.0 answers (MODEL.md, "Responses").
"""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import orjson
from pydantic import TypeAdapter, ValidationError

_LAX_INT = TypeAdapter(int)


class ResponsesError(Exception):
    """A request vLLM refuses, with its HTTP status and error fields."""

    def __init__(
        self,
        message: str,
        status: int = 400,
        kind: str = "BadRequestError",
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.status = status
        self.kind = kind
        self.param = param


@dataclass(frozen=True)
class ResponsesRequest:
    """What the simulator uses of a `POST /v1/responses` body."""

    messages: list[dict[str, str]]
    """Instructions (as a system message) and input, as chat messages."""
    max_output_tokens: int | None
    stream: bool
    echo: dict[str, Any] = field(default_factory=dict)
    """Request fields the response object repeats."""


def _text(content: Any, where: str) -> str:
    """A message's content: a string, or parts each with a string `text`
    (`input_text` in a request, `output_text` in a reply sent back)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ResponsesError(f"{where}.content must be a string or a list of parts.")
    texts = []
    for i, part in enumerate(content):
        text = part.get("text") if isinstance(part, Mapping) else None
        if not isinstance(text, str):
            raise ResponsesError(f"{where}.content[{i}] has no string `text`.")
        texts.append(text)
    return "".join(texts)


def _input_messages(given: Any) -> list[dict[str, str]]:
    if isinstance(given, str):
        return [{"role": "user", "content": given}]
    if not isinstance(given, list):
        raise ResponsesError(
            "`input` must be a string or a list of items.", param="input"
        )
    messages = []
    for i, item in enumerate(given):
        where = f"input[{i}]"
        if not isinstance(item, Mapping):
            raise ResponsesError(f"{where} must be an object.")
        kind = item.get("type")
        if "role" not in item and kind == "function_call_output":
            output = item.get("output")
            text = output if isinstance(output, str) else orjson.dumps(output).decode()
            messages.append({"role": "tool", "content": text})
            continue
        if "role" not in item and isinstance(kind, str) and kind != "message":
            # A function call, reasoning, ...: vLLM renders them too, here
            # as the assistant's text of the item (tokens to prefill, cached
            # as a chat's tool calls are).
            text = orjson.dumps(item).decode()
            messages.append({"role": "assistant", "content": text})
            continue
        if not isinstance(item.get("role"), str):
            raise ResponsesError(f"{where} must be a message with a `role`.")
        if "content" not in item:
            raise ResponsesError(f"{where} has no `content`.")
        messages.append(
            {"role": item["role"], "content": _text(item["content"], where)}
        )
    return messages


def parse_request(body: Mapping[str, Any]) -> ResponsesRequest:
    """The request in `body`.

    Raises:
        ResponsesError: a malformed field (400), or a `previous_response_id`,
            which vLLM without its response store cannot find (404).
    """
    if "input" not in body:
        raise ResponsesError("`input` is required.", param="input")
    messages = _input_messages(body["input"])
    instructions = body.get("instructions")
    if instructions is not None:
        if not isinstance(instructions, str):
            raise ResponsesError(
                "`instructions` must be a string.", param="instructions"
            )
        messages.insert(0, {"role": "system", "content": instructions})
    if not messages:
        raise ResponsesError(
            "Cannot apply chat template to an empty conversation. "
            "Provide at least one message."
        )
    limit = body.get("max_output_tokens")
    if limit is not None:
        # As vLLM's pydantic model reads it (lax: `true`, `5.0` and "5" are
        # numbers), then vLLM's own check.
        try:
            limit = _LAX_INT.validate_python(limit)
        except ValidationError as err:
            raise ResponsesError(
                "`max_output_tokens` must be an integer.", param="max_output_tokens"
            ) from err
        if limit < 1:
            raise ResponsesError(
                f"max_tokens must be at least 1, got {limit}.", param="max_tokens"
            )
    if body.get("background") is True:
        # vLLM's answers without its store: `store` defaults to true.
        if body.get("store", True) is False:
            message = "background can only be used when `store` is true"
        else:
            message = (
                "This vLLM engine does not support `store=True` and therefore "
                "does not support the background mode. To enable these "
                "features, set the environment variable "
                "`VLLM_ENABLE_RESPONSES_API_STORE=1` when launching the vLLM "
                "server."
            )
        raise ResponsesError(message, kind="invalid_request_error", param="background")
    previous = body.get("previous_response_id")
    if previous is not None:
        raise ResponsesError(
            f"Response with id '{previous}' not found.",
            status=404,
            kind="invalid_request_error",
            param="response_id",
        )
    echo = {
        "instructions": instructions,
        "max_output_tokens": limit,
        "metadata": body.get("metadata"),
        "temperature": body.get("temperature", 1.0),
        "top_p": body.get("top_p", 1.0),
        "user": body.get("user"),
    }
    return ResponsesRequest(messages, limit, body.get("stream") is True, echo)


def new_ids() -> tuple[str, str]:
    """A response id and its message item's id, as vLLM makes them."""
    return f"resp_{uuid.uuid4().hex[:16]}", f"msg_{uuid.uuid4().hex[:16]}"


def usage(prompt_tokens: int, cached_tokens: int, output_tokens: int) -> dict[str, Any]:
    """vLLM's `usage` of a response."""
    return {
        "input_tokens": prompt_tokens,
        "input_tokens_details": {
            "cached_tokens": cached_tokens,
            "cache_write_tokens": 0,
            "input_tokens_per_turn": [],
            "cached_tokens_per_turn": [],
        },
        "output_tokens": output_tokens,
        "output_tokens_details": {
            "reasoning_tokens": 0,
            "tool_output_tokens": 0,
            "output_tokens_per_turn": [],
            "tool_output_tokens_per_turn": [],
        },
        "total_tokens": prompt_tokens + output_tokens,
    }


def text_part(text: str, done: bool = True) -> dict[str, Any]:
    """An `output_text` content part (vLLM: empty logprobs while streaming)."""
    return {
        "annotations": [],
        "text": text,
        "type": "output_text",
        "logprobs": None if done else [],
    }


def message_item(item_id: str, text: str | None) -> dict[str, Any]:
    """The assistant's message item: in progress and empty with None."""
    return {
        "id": item_id,
        "content": [] if text is None else [text_part(text)],
        "role": "assistant",
        "status": "in_progress" if text is None else "completed",
        "type": "message",
        "phase": None,
    }


@dataclass(frozen=True)
class ResponseHead:
    """What stays the same in every copy of one response object."""

    response_id: str
    item_id: str
    created_at: int
    model: str
    request: ResponsesRequest


def response_object(
    head: ResponseHead, text: str | None, used: dict[str, Any] | None
) -> dict[str, Any]:
    """The response: in progress with no `text` yet, else finished; `incomplete`
    when `max_output_tokens` cut it (the simulator always makes that many)."""
    cut = text is not None and head.request.max_output_tokens is not None
    status = "incomplete" if cut else "completed"
    return {
        "id": head.response_id,
        "created_at": head.created_at,
        "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
        "model": head.model,
        "object": "response",
        "output": [] if text is None else [message_item(head.item_id, text)],
        "parallel_tool_calls": True,
        "tool_choice": "none",
        "tools": [],
        "background": False,
        "max_tool_calls": None,
        "previous_response_id": None,
        "prompt": None,
        "reasoning": None,
        "service_tier": "auto",
        "status": "in_progress" if text is None else status,
        "text": None,
        "top_logprobs": None,
        "truncation": "disabled",
        "usage": used,
        **head.request.echo,
    }


class EventStream:
    """The stream's events in vLLM's order, each numbered and encoded as
    `event: <type>` and `data: <json>`."""

    def __init__(self, head: ResponseHead) -> None:
        self.head = head
        self._number = 0

    def _event(self, kind: str, fields: dict[str, Any]) -> dict[str, Any]:
        event = {**fields, "sequence_number": self._number, "type": kind}
        self._number += 1
        return event

    def _text_event(self, kind: str, **fields: Any) -> dict[str, Any]:
        where = {"content_index": 0, "item_id": self.head.item_id, "output_index": 0}
        return self._event(kind, {**where, **fields})

    def opening(self) -> list[dict[str, Any]]:
        """Sent at once, before prefill."""
        created = response_object(self.head, None, None)
        return [
            self._event("response.created", {"response": created}),
            self._event("response.in_progress", {"response": created}),
        ]

    def first_token(self) -> list[dict[str, Any]]:
        """Sent with the first token, before its delta."""
        return [
            self._event(
                "response.output_item.added",
                {"item": message_item(self.head.item_id, None), "output_index": 0},
            ),
            self._text_event(
                "response.content_part.added", part=text_part("", done=False)
            ),
        ]

    def delta(self, piece: str) -> dict[str, Any]:
        """Some generated text."""
        return self._text_event("response.output_text.delta", delta=piece, logprobs=[])

    def closing(self, text: str, used: dict[str, Any]) -> list[dict[str, Any]]:
        """Sent after the last token: the whole text, then the response."""
        return [
            self._text_event("response.output_text.done", logprobs=[], text=text),
            self._text_event("response.content_part.done", part=text_part(text)),
            self._event(
                "response.output_item.done",
                {"item": message_item(self.head.item_id, text), "output_index": 0},
            ),
            self._event(
                "response.completed",
                {"response": response_object(self.head, text, used)},
            ),
        ]
