"""The GraphQL schema's types, and how they are read from the gateway's parts
and from OpenAI's JSON answers.

An answer is read whole before it is served: a value the schema cannot carry (a
`created` that is no number, an `Int` past 32 bits, an object for a `String`)
is the replica's failure, a `BackendError`, found while the proxy can still
count the request as the 502 its client gets.
"""

from __future__ import annotations

import reprlib
from typing import Any

import strawberry
from graphql import GraphQLError, GraphQLString
from strawberry.scalars import JSON

from citadel.gateway.errors import BackendError
from citadel.gateway.routes import ModelRoute
from citadel.gateway.services.limits import Standing
from citadel.gateway.services.structured import openai_body

_INT_MIN, _INT_MAX = -(2**31), 2**31 - 1
"""GraphQL's `Int` is 32 bits."""


@strawberry.type
class ModelLimits:
    """Per-key defaults of a model; null means unlimited."""

    rpm: int | None
    tpm: int | None


@strawberry.type
class Model:
    """A model the caller may use."""

    id: str = strawberry.field(
        description="The served name, sent as `model`; a LoRA adapter's name."
    )
    aliases: list[str]
    parent: str | None = strawberry.field(
        description="For a LoRA adapter, its base model's served name (the "
        "replicas, readiness and limits are the base's); null for a base model."
    )
    ready: bool = strawberry.field(description="At least one replica is Ready.")
    ready_replicas: int = strawberry.field(
        description="Ready replicas, as the operator last reported."
    )
    replicas: int = strawberry.field(description="Replicas this gateway routes to now.")
    strategy: str
    limits: ModelLimits

    @classmethod
    def of(cls, route: ModelRoute, replicas: int, adapter: str | None = None) -> Model:
        """The base model of `route`, or its adapter `adapter`."""
        return cls(
            id=adapter or route.served_name,
            aliases=[] if adapter else list(route.aliases),
            parent=route.served_name if adapter else None,
            ready=route.ready,
            ready_replicas=route.ready_replicas,
            replicas=replicas,
            strategy=route.strategy.value,
            limits=ModelLimits(rpm=route.limits.rpm, tpm=route.limits.tpm),
        )


@strawberry.type
class Limit:
    """One limit of the caller's key: its size, what is left, when it resets."""

    scope: str = strawberry.field(description="`requests`, `tokens` or `quota`.")
    window: str = strawberry.field(description="`minute`, `day` or `month`.")
    model: str | None = strawberry.field(
        description="The model for a per-model limit; null for the key's own."
    )
    limit: int
    remaining: int
    used: int = strawberry.field(description="`limit - remaining`.")
    resets_in_seconds: float

    @classmethod
    def of(cls, s: Standing) -> Limit:
        return cls(
            scope=s.scope,
            window=s.window,
            model=s.model,
            limit=s.limit,
            remaining=s.remaining,
            used=max(0, s.limit - s.remaining),
            resets_in_seconds=round(s.reset_s, 3),
        )


@strawberry.type
class Usage:
    """The caller's key and where its limits and quotas stand."""

    key: str | None = strawberry.field(description="Null when auth is disabled.")
    role: str | None
    priority: str | None = strawberry.field(
        description="standard or sheddable (refused while the model is full); "
        "null when auth is disabled."
    )
    limits: list[Limit]


@strawberry.input
class MessageInput:
    role: str
    content: str


@strawberry.input
class ChatCompletionInput:
    """A chat request; `extra` holds any other OpenAI or vLLM parameter."""

    model: str
    messages: list[MessageInput]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    n: int | None = None
    stop: list[str] | None = None
    seed: int | None = None
    extra: JSON | None = None

    def body(self, stream: bool) -> dict[str, Any]:
        """The OpenAI body (typed fields win over `extra`)."""
        extra: dict[str, Any] = self.extra if isinstance(self.extra, dict) else {}
        fields = {
            "model": self.model,
            "messages": [{"role": m.role, "content": m.content} for m in self.messages],
            "max_tokens": self.max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "n": self.n,
            "stop": self.stop,
            "seed": self.seed,
        }
        return openai_body(extra, fields, stream)


@strawberry.type
class Message:
    role: str | None
    content: str | None


@strawberry.type
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int

    @classmethod
    def of(cls, payload: Any) -> TokenUsage | None:
        """The usage of an answer, if it has one.

        Raises:
            BackendError: a count that does not fit an `Int`.
        """
        if not isinstance(payload, dict):
            return None
        prompt = _int(payload, "prompt_tokens")
        completion = _int(payload, "completion_tokens")
        total = _int(payload, "total_tokens") or prompt + completion
        return cls(
            prompt_tokens=prompt, completion_tokens=completion, total_tokens=total
        )


@strawberry.type
class ChatChoice:
    index: int
    message: Message
    finish_reason: str | None


@strawberry.type
class ChatCompletion:
    """A whole chat completion."""

    id: str
    model: str
    created: int
    choices: list[ChatChoice]
    usage: TokenUsage | None

    @classmethod
    def of(cls, payload: dict[str, Any]) -> ChatCompletion:
        """The completion in a whole JSON answer.

        Raises:
            BackendError: the answer does not fit the schema.
        """
        return cls(
            **_head(payload),
            choices=[
                ChatChoice(
                    index=_int(c, "index"),
                    message=_message(c.get("message")),
                    finish_reason=_text(c, "finish_reason"),
                )
                for c in _choices(payload)
            ],
        )


@strawberry.type
class ChunkChoice:
    index: int
    delta: Message
    finish_reason: str | None


@strawberry.type
class ChatCompletionChunk:
    """One streamed piece; the last carries `usage`."""

    id: str
    model: str
    created: int
    choices: list[ChunkChoice]
    usage: TokenUsage | None

    @classmethod
    def of(cls, payload: dict[str, Any]) -> ChatCompletionChunk:
        """The chunk in one streamed JSON event.

        Raises:
            BackendError: the chunk does not fit the schema.
        """
        return cls(
            **_head(payload),
            choices=[
                ChunkChoice(
                    index=_int(c, "index"),
                    delta=_message(c.get("delta")),
                    finish_reason=_text(c, "finish_reason"),
                )
                for c in _choices(payload)
            ],
        )


def _head(payload: dict[str, Any]) -> dict[str, Any]:
    """The fields a completion and its chunks share."""
    return {
        "id": str(payload.get("id", "")),
        "model": str(payload.get("model", "")),
        "created": _int(payload, "created"),
        "usage": TokenUsage.of(payload.get("usage")),
    }


def _choices(payload: dict[str, Any]) -> list[dict[str, Any]]:
    choices = payload.get("choices")
    return (
        [c for c in choices if isinstance(c, dict)] if isinstance(choices, list) else []
    )


def _message(payload: Any) -> Message:
    if not isinstance(payload, dict):
        return Message(role=None, content=None)
    return Message(role=_text(payload, "role"), content=_text(payload, "content"))


def _int(payload: dict[str, Any], name: str) -> int:
    """The `Int` field `name` of `payload` (0 when absent or null)."""
    value = payload.get(name)
    try:
        number = int(value or 0)
    except (TypeError, ValueError, OverflowError) as err:
        raise _unfit(name, value, "a whole number") from err
    if not _INT_MIN <= number <= _INT_MAX:
        raise _unfit(name, value, "a 32-bit integer")
    return number


def _text(payload: dict[str, Any], name: str) -> str | None:
    """The `String` field `name` of `payload`, as GraphQL writes it (a number
    or a boolean too; not an object or a list)."""
    value = payload.get(name)
    if value is None:
        return None
    try:
        text: str = GraphQLString.serialize(value)
    except GraphQLError as err:
        raise _unfit(name, value, "a string") from err
    return text


def _unfit(name: str, value: Any, expected: str) -> BackendError:
    return BackendError(
        f"The model's answer could not be read: `{name}` is "
        f"{reprlib.repr(value)}, not {expected}."
    )
