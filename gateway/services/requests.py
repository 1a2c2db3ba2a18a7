"""What a request to an OpenAI endpoint must look like before it is forwarded.

The gateway checks only what it needs (a JSON object with a model name and the
field that holds the prompt) and what it would otherwise misread; everything else,
known or not, goes to the backend untouched for it to judge.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

import orjson

from citadel.gateway.errors import InvalidRequest


class Door(enum.StrEnum):
    """The protocol a request came in by (the value is the metric label)."""

    REST = "rest"
    GRPC = "grpc"
    GRAPHQL = "graphql"


class ApiKind(enum.StrEnum):
    """The forwarded endpoints (the value is the metric label)."""

    CHAT = "chat"
    COMPLETIONS = "completions"
    EMBEDDINGS = "embeddings"


@dataclass(frozen=True)
class ApiCall:
    """One forwarded endpoint: its path on the backend and what it streams."""

    kind: ApiKind
    path: str
    prompt_field: str
    streams: bool


CHAT = ApiCall(ApiKind.CHAT, "/v1/chat/completions", "messages", True)
COMPLETIONS = ApiCall(ApiKind.COMPLETIONS, "/v1/completions", "prompt", True)
EMBEDDINGS = ApiCall(ApiKind.EMBEDDINGS, "/v1/embeddings", "input", False)

MAX_DEPTH = 254
"""How deeply a body's arrays and objects may nest (the body is the first level).

orjson reads 1,024 levels but writes only 254: a deeper body, once read, could
not be written again where the gateway changes it (an alias, a stream's usage
option) or measures it (the token estimate), so it is refused as it is read."""

TOO_DEEP = (
    "The request body is nested too deeply: its arrays and objects may nest "
    f"at most {MAX_DEPTH} levels."
)


def parse_body(raw: bytes, call: ApiCall) -> dict[str, Any]:
    """The request body as a dict, checked just enough to route it.

    Raises:
        InvalidRequest: malformed JSON or a missing or mistyped field.
    """
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as err:
        raise InvalidRequest(
            f"We could not parse the JSON body of your request: {err}."
        ) from err
    if not isinstance(body, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    # Writing it is the depth check: in C, about 4 us for a 20 KB chat (a fifth
    # of the read), where a walk in Python takes 35 us. What orjson reads it
    # fails to write only past MAX_DEPTH (numbers past 64 bits it reads as
    # floats, and it refuses lone surrogates), so nothing needs a walk.
    dumps_request(body)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise InvalidRequest(
            "You must provide a model parameter (a string).", param="model"
        )
    prompt = body.get(call.prompt_field)
    if call.kind is ApiKind.CHAT:
        if not isinstance(prompt, list) or not prompt:
            raise InvalidRequest(
                "`messages` must be a non-empty array of messages.", param="messages"
            )
        if not all(isinstance(m, dict) for m in prompt):
            raise InvalidRequest("Each message must be an object.", param="messages")
    elif not isinstance(prompt, str | list):
        raise InvalidRequest(
            f"`{call.prompt_field}` must be a string or an array.",
            param=call.prompt_field,
        )
    if "stream" in body and not isinstance(body["stream"], bool | None):
        raise InvalidRequest("`stream` must be a boolean.", param="stream")
    for field in ("max_tokens", "max_completion_tokens", "n"):
        value = body.get(field)
        if value is not None and (not isinstance(value, int) or value < 1):
            raise InvalidRequest(f"`{field}` must be a positive integer.", param=field)
    return body


def dumps_request(body: dict[str, Any]) -> bytes:
    """`body` as JSON bytes, for any door.

    Raises:
        InvalidRequest: it cannot be written: nested deeper than `MAX_DEPTH`,
            or (from a door other than REST's) an integer past 64 bits.
    """
    try:
        return orjson.dumps(body)
    except orjson.JSONEncodeError as err:
        # orjson's word for depth; any other failure keeps its own words.
        if "recursion" in str(err).lower():
            raise InvalidRequest(TOO_DEEP) from err
        raise InvalidRequest(f"The request cannot be sent as JSON: {err}.") from err


def client_wants_usage(body: dict[str, Any]) -> bool:
    """True when a streaming client asked for the usage chunk itself."""
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def upstream_body(
    raw: bytes, body: dict[str, Any], served_name: str, stream: bool
) -> bytes:
    """The body for the backend: the client's, with the served model name and, on
    a stream, a request for the usage chunk. Unchanged bytes when nothing changes."""
    needs_usage = stream and not client_wants_usage(body)
    if body["model"] == served_name and not needs_usage:
        return raw
    out = dict(body)
    out["model"] = served_name
    if needs_usage:
        options = body.get("stream_options")
        out["stream_options"] = {
            **(options if isinstance(options, dict) else {}),
            "include_usage": True,
        }
    return dumps_request(out)
