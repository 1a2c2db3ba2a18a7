"""citadel.v1 messages to OpenAI's JSON bodies and back.

Requests become the body REST would receive (the typed fields, then `extra`
merged in), so the proxy below sees no difference. Answers are read with
protobuf's JSON mapping, which skips fields the messages do not have (vLLM adds
some) and treats `null` as unset.
"""

from __future__ import annotations

from typing import Any, TypeVar

from google.protobuf import json_format
from google.protobuf.message import Message

from citadel.gateway.errors import BackendError, InvalidRequest
from citadel.gateway.rpc.v1 import citadel_pb2 as pb
from citadel.gateway.services.requests import (
    MAX_MESSAGES,
    MAX_PROMPTS,
    MAX_STOP,
    check_length,
)
from citadel.gateway.services.structured import openai_body

M = TypeVar("M", bound=Message)
_INT64 = 2**63


def _json(message: Message, **options: Any) -> dict[str, Any]:
    """A message as JSON; a value JSON cannot carry (NaN, infinity) is the
    caller's mistake, as invalid JSON is on REST."""
    try:
        out: dict[str, Any] = json_format.MessageToDict(message, **options)
    except (ValueError, json_format.Error) as err:
        raise InvalidRequest(f"The request cannot be sent as JSON: {err}") from err
    return out


def _sampling(sampling: pb.Sampling) -> dict[str, Any]:
    check_length("stop", len(sampling.stop), MAX_STOP)
    out = _json(sampling, preserving_proto_field_name=True)
    if "seed" in out:  # int64 is a string in protobuf's JSON mapping
        out["seed"] = int(out["seed"])
    return out


def _extra(
    message: pb.ChatCompletionRequest | pb.CompletionRequest | pb.EmbeddingsRequest,
) -> dict[str, Any]:
    if not message.HasField("extra"):
        return {}
    extra = _json(message.extra)
    return {k: _integral(v) for k, v in extra.items()}


def _integral(value: Any) -> Any:
    """Struct numbers are doubles: 5.0 goes out as 5, as a client would send it.

    A whole double past 64-bit integers (1e30) stays a double, as REST's JSON
    reader keeps such a number: JSON could not carry it as an integer, and
    REST's checks refuse it where an integer is due (`max_tokens`).
    """
    if isinstance(value, float) and value.is_integer() and abs(value) < _INT64:
        return int(value)
    if isinstance(value, list):
        return [_integral(v) for v in value]
    if isinstance(value, dict):
        return {k: _integral(v) for k, v in value.items()}
    return value


def chat_body(request: pb.ChatCompletionRequest, stream: bool) -> dict[str, Any]:
    """The OpenAI body of a chat request; a stream asks for the usage chunk.

    Raises:
        InvalidRequest: more messages or stop strings than REST takes, refused
            before they are written out (4.5 million empty messages fit in a
            message: 1.5 s of the event loop to convert).
    """
    check_length("messages", len(request.messages), MAX_MESSAGES)
    messages = [{"role": m.role, "content": m.content} for m in request.messages]
    fields = {"model": request.model, "messages": messages}
    return openai_body(_extra(request), fields | _sampling(request.sampling), stream)


def completion_body(request: pb.CompletionRequest) -> dict[str, Any]:
    """The OpenAI body of a text completion request."""
    fields = {"model": request.model, "prompt": request.prompt}
    return openai_body(_extra(request), fields | _sampling(request.sampling))


def embeddings_body(request: pb.EmbeddingsRequest) -> dict[str, Any]:
    """The OpenAI body of an embeddings request."""
    check_length("input", len(request.input), MAX_PROMPTS)
    fields = {"model": request.model, "input": list(request.input)}
    body = openai_body(_extra(request), fields)
    if body.get("encoding_format", "float") != "float":
        # The answer's `embedding` is a list of floats in citadel.v1.
        raise InvalidRequest(
            "Over gRPC embeddings come as floats: `encoding_format` must be "
            "`float` or absent.",
            param="encoding_format",
        )
    return body


def parse(payload: dict[str, Any], message: M) -> M:
    """`message` filled from an OpenAI JSON answer.

    Raises:
        BackendError: the answer does not fit the message.
    """
    try:
        json_format.ParseDict(payload, message, ignore_unknown_fields=True)
    except json_format.ParseError as err:
        raise BackendError(f"The model's answer could not be read: {err}") from err
    return message
