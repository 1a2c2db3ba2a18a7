"""OpenAI's Responses API (`POST /v1/responses`) as the gateway reads it.

The gateway keeps no responses: it forwards each request, as it does a chat,
and reads of it only what its estimate and its routing need. Those read a chat's
`messages`, so a Responses request is read as the chat it stands for
(`chat_view`): what vLLM renders with the chat template is the same prompt.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

OPENING_EVENTS = frozenset({"response.created", "response.in_progress"})
"""The stream events that open a response: vLLM sends both at once, before
prefill (0.05 s into a 3.3 s prefill of a 1,500-word prompt), so they say
nothing of whether the replica can answer (`ApiCall.held`)."""

FINAL_EVENTS = frozenset(
    {"response.completed", "response.incomplete", "response.failed"}
)
"""The stream events that end a response, its `usage` in their `response`:
vLLM sends `response.completed` whatever the status (an `incomplete` one
included); OpenAI's API sends the other two for those outcomes."""

FAILED_EVENTS = frozenset({"error", "response.failed"})
"""The stream events that say the response failed (an `error` event holds no
`error` object, as a chat's error chunk does, but its fields at the top)."""


def chat_view(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Responses request as the chat vLLM renders for it: `instructions` as
    the system message, then `input`, a string as one user message or each
    item as a message (`_as_message`), and its `tools`.

    What reads a chat (the token estimate, prefix-aware routing and its marks
    of where a conversation ended) then reads a Responses request as it does
    the same conversation sent as a chat. `body` is one `parse_body` checked:
    `input` is a string or an array of objects.
    """
    messages: list[Any] = []
    instructions = body.get("instructions")
    # vLLM writes no system message for an empty one.
    if isinstance(instructions, str) and instructions:
        messages.append({"role": "system", "content": instructions})
    items = body.get("input")
    if isinstance(items, str):
        messages.append({"role": "user", "content": items})
    elif isinstance(items, list):
        messages.extend(_as_message(item) for item in items)
    view: dict[str, Any] = {"messages": messages}
    if body.get("tools") is not None:
        view["tools"] = body["tools"]
    return view


def _as_message(item: Any) -> Any:
    """One input item as a chat message: a message (it has a `role`, with or
    without `"type": "message"`) as it is; a function call's output as the
    tool message it becomes; any other item (a function call, reasoning, a
    reference) as an assistant's tool call holding the whole item, which the
    estimate counts by its JSON and routing tells apart by it, as a chat's
    tool calls."""
    if not isinstance(item, Mapping) or "role" in item:
        return item
    if item.get("type") == "function_call_output":
        return {
            "role": "tool",
            "tool_call_id": item.get("call_id"),
            "content": item.get("output"),
        }
    return {"role": "assistant", "content": None, "tool_calls": [item]}
