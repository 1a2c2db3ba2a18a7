"""The GraphQL schema's types, and how they are read from the gateway's parts
and from OpenAI's JSON answers."""

from __future__ import annotations

from typing import Any

import strawberry
from strawberry.scalars import JSON

from citadel.gateway.routes import ModelRoute
from citadel.gateway.services.limits import Standing
from citadel.gateway.services.structured import openai_body


@strawberry.type
class ModelLimits:
    """Per-key defaults of a model; null means unlimited."""

    rpm: int | None
    tpm: int | None


@strawberry.type
class Model:
    """A model the caller may use."""

    id: str = strawberry.field(description="The served name, sent as `model`.")
    aliases: list[str]
    ready: bool = strawberry.field(description="At least one replica is Ready.")
    ready_replicas: int = strawberry.field(
        description="Ready replicas, as the operator last reported."
    )
    replicas: int = strawberry.field(description="Replicas this gateway routes to now.")
    strategy: str
    limits: ModelLimits

    @classmethod
    def of(cls, route: ModelRoute, replicas: int) -> Model:
        return cls(
            id=route.served_name,
            aliases=list(route.aliases),
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
        if not isinstance(payload, dict):
            return None
        prompt = int(payload.get("prompt_tokens") or 0)
        completion = int(payload.get("completion_tokens") or 0)
        total = int(payload.get("total_tokens") or prompt + completion)
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
        return cls(
            **_head(payload),
            choices=[
                ChatChoice(
                    index=int(c.get("index") or 0),
                    message=_message(c.get("message")),
                    finish_reason=c.get("finish_reason"),
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
        return cls(
            **_head(payload),
            choices=[
                ChunkChoice(
                    index=int(c.get("index") or 0),
                    delta=_message(c.get("delta")),
                    finish_reason=c.get("finish_reason"),
                )
                for c in _choices(payload)
            ],
        )


def _head(payload: dict[str, Any]) -> dict[str, Any]:
    """The fields a completion and its chunks share."""
    return {
        "id": str(payload.get("id", "")),
        "model": str(payload.get("model", "")),
        "created": int(payload.get("created") or 0),
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
    return Message(role=payload.get("role"), content=payload.get("content"))
