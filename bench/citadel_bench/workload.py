"""The multi-turn chat workload of the routing benchmark.

Several users hold conversations. Each conversation starts with one of a few shared
system prompts and grows by one user message and the model's answer per turn, so
consecutive requests of a conversation share everything but the newest turn, and
conversations on the same system prompt share that prefix.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any

_WORDS = [
    "cluster",
    "node",
    "replica",
    "model",
    "token",
    "cache",
    "prompt",
    "latency",
    "queue",
    "batch",
    "gateway",
    "operator",
    "kernel",
    "memory",
    "tensor",
    "route",
    "policy",
    "window",
    "budget",
    "stream",
    "metric",
]


@dataclass(frozen=True)
class ChatWorkload:
    """Shape of the workload; every field in characters or counts.

    Attributes:
        users: conversations held at once (the concurrency).
        conversations_per_user: conversations each user holds, one after another.
        turns: requests per conversation.
        system_prompts: distinct system prompts, shared by the conversations.
        system_chars: length of each system prompt.
        user_chars: length of each user message.
        max_tokens: reply length asked for.
        seed: makes the texts and the choice of system prompt repeatable.
    """

    users: int = 16
    conversations_per_user: int = 2
    turns: int = 10
    system_prompts: int = 4
    system_chars: int = 6000
    user_chars: int = 400
    max_tokens: int = 96
    seed: int = 7

    @property
    def requests(self) -> int:
        """Requests the whole workload sends."""
        return self.users * self.conversations_per_user * self.turns


def text(rng: random.Random, chars: int) -> str:
    """Random words, exactly `chars` characters long."""
    words: list[str] = []
    size = 0
    while size < chars:
        word = rng.choice(_WORDS)
        words.append(word)
        size += len(word) + 1
    return " ".join(words)[:chars]


def system_prompts(workload: ChatWorkload) -> list[str]:
    """The shared system prompts."""
    rng = random.Random(workload.seed)
    return [
        f"System {i}: " + text(rng, workload.system_chars)
        for i in range(workload.system_prompts)
    ]


@dataclass
class Conversation:
    """One conversation: its messages so far and its id (the session header)."""

    session: str
    messages: list[dict[str, str]]
    rng: random.Random

    def next_request(self, workload: ChatWorkload, model: str) -> dict[str, Any]:
        """Adds a user message and returns the chat request for this turn."""
        self.messages.append(
            {"role": "user", "content": text(self.rng, workload.user_chars)}
        )
        return {
            "model": model,
            "messages": list(self.messages),
            "max_tokens": workload.max_tokens,
            "stream": True,
        }

    def add_answer(self, answer: str) -> None:
        """Records the model's answer, which the next turn sends back."""
        self.messages.append({"role": "assistant", "content": answer})


def conversation(workload: ChatWorkload, user: int, index: int) -> Conversation:
    """The `index`-th conversation of `user` (deterministic)."""
    rng = random.Random(f"{workload.seed}/{user}/{index}")
    system = system_prompts(workload)[rng.randrange(workload.system_prompts)]
    return Conversation(
        session=f"user{user}-conv{index}",
        messages=[{"role": "system", "content": system}],
        rng=rng,
    )
