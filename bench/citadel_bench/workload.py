"""The multi-turn chat workloads of the routing benchmark.

Several users hold conversations. Each conversation starts with one of a few shared
system prompts, optionally followed by a long user-specific context (a document or
chat history) at the head of its first user message, and grows by one user message
and the model's answer per turn, so consecutive requests of a conversation share
everything but the newest turn, and conversations on the same system prompt share
that prefix.

Two shapes run: `SHORT_CHAT` (short conversations on four system prompts) and
`MULTI_ROUND_QA` (after vLLM production-stack's multi-round QA benchmark: one
system prompt, a long context per user, short questions).
"""

from __future__ import annotations

import random
import re
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


CHARS_PER_TOKEN = 4
"""The simulator's default tokenizer: one token per 4 characters (MODEL.md)."""


@dataclass(frozen=True)
class ChatWorkload:
    """Shape of the workload; every field in characters or counts.

    Attributes:
        name: what the report calls it.
        about: where its shape comes from and what it stresses, for the report
            (Markdown, one or more sentences).
        users: conversations held at once (the concurrency).
        conversations_per_user: conversations each user holds, one after another.
        turns: requests per conversation.
        system_prompts: distinct system prompts, shared by the conversations.
        system_chars: length of each system prompt.
        context_chars: length of the user-specific context at the head of each
            conversation's first user message; 0 for none.
        user_chars: length of each user message (besides the context).
        max_tokens: reply length asked for.
        seed: makes the texts and the choice of system prompt repeatable.
    """

    name: str = "short chat"
    about: str = ""
    users: int = 16
    conversations_per_user: int = 2
    turns: int = 10
    system_prompts: int = 4
    system_chars: int = 6000
    context_chars: int = 0
    user_chars: int = 400
    max_tokens: int = 96
    seed: int = 7

    @property
    def requests(self) -> int:
        """Requests the whole workload sends."""
        return self.users * self.conversations_per_user * self.turns

    @property
    def slug(self) -> str:
        """The name as a file name (the plot's)."""
        return re.sub(r"[^a-z0-9]+", "-", self.name.lower()).strip("-")

    @property
    def system_tokens(self) -> int:
        """Tokens of all the system prompts together, as the simulator counts."""
        return self.system_prompts * self.system_chars // CHARS_PER_TOKEN

    @property
    def conversation_tokens(self) -> int:
        """Tokens one conversation holds after its last answer, its system prompt
        left out (it is shared): context, user messages and answers."""
        chars = self.context_chars + self.turns * self.user_chars
        return chars // CHARS_PER_TOKEN + self.turns * self.max_tokens

    def footprint(self, users: int) -> int:
        """KV-cache tokens that `users` whole conversations need on one replica,
        with every system prompt (chat-template overhead left out)."""
        return self.system_tokens + users * self.conversation_tokens


SHORT_CHAT = ChatWorkload(
    about=(
        "Citadel's own chat workload. Its conversations stay short: they grow to "
        "~3,500 tokens, of which 1,500 are a system prompt every replica soon "
        "caches anyway, so a prefix-cache miss costs little prefill next to the "
        "fixed time of each engine step."
    )
)
"""Short conversations on four shared system prompts."""

MULTI_ROUND_QA = ChatWorkload(
    name="multi-round QA",
    about=(
        "After vLLM production-stack's multi-round QA benchmark "
        "(github.com/vllm-project/production-stack, [`benchmarks/multi-round-qa/"
        "run.sh`](https://github.com/vllm-project/production-stack/blob/"
        "4cbf4a224fa626dc21d5ff955d178d2dfbff577f/benchmarks/multi-round-qa/run.sh)"
        " and `multi-round-qa.py` beside it): 320 users, 10 rounds, "
        "a shared system prompt of 1,000 tokens, a user-specific chat history of "
        "20,000 tokens, answers of 100 tokens, questions of about 20 tokens "
        "(\"Here's question #N: can you tell me a new long story with a happy "
        'ending?"). Here the rounds, the system prompt and the question and '
        "answer lengths are theirs; users and history are scaled down to this "
        "machine and to the simulated replicas' KV cache (sizing below), and "
        "users ask closed-loop (the next question once the answer is in, all "
        "starting at once) where theirs join and ask at a set rate."
    ),
    users=16,
    conversations_per_user=1,
    turns=10,
    system_prompts=1,
    system_chars=4000,
    context_chars=16000,
    user_chars=80,
    max_tokens=100,
)
"""Long user-specific contexts under memory pressure: a quarter of the users'
conversations fit in one replica's KV cache, all of them do not, so where a
request goes decides whether ~4,000 tokens are prefilled again."""


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
    """One conversation: its messages so far and its id (the session header).

    Attributes:
        session: the conversation's id, sent as `x-session-id`.
        messages: the chat so far, system prompt first.
        rng: draws the user messages.
        context: the user-specific text the first user message starts with.
    """

    session: str
    messages: list[dict[str, str]]
    rng: random.Random
    context: str = ""

    def next_request(self, workload: ChatWorkload, model: str) -> dict[str, Any]:
        """Adds a user message and returns the chat request for this turn."""
        message = text(self.rng, workload.user_chars)
        # The context goes with the first question, as in production-stack's
        # benchmark, so it sits right after the shared system prompt.
        if self.context and len(self.messages) == 1:
            message = f"{self.context}\n\n{message}"
        self.messages.append({"role": "user", "content": message})
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
        context=text(rng, workload.context_chars) if workload.context_chars else "",
    )
