"""Routing quality through the real gateway, over four simulated vLLM replicas.

The bench's simulator (bench/simulator, MODEL.md) keeps a prefix cache as vLLM does
and reports it with vLLM's metrics, so how much of the prompts the replicas found
cached says how well the gateway placed the requests. Requests go one at a time, so
the placements, and the counts, do not depend on timing.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
from citadel_bench import procs
from citadel_bench.routing import replica_counters

pytestmark = pytest.mark.integration

REPLICAS = 4


class Simulator:
    """`python -m simulator --replicas 4`, one process, started as the bench
    starts it."""

    def __init__(self, log_dir: Path, name: str, options: tuple[str, ...]) -> None:
        self.proc = procs.start(name, procs.simulator_argv(REPLICAS, *options), log_dir)
        try:
            ports = procs.wait_listening(self.proc)
        except RuntimeError:
            procs.stop(self.proc)
            raise
        self.urls = [f"http://127.0.0.1:{p}" for p in ports]

    def prefix_cache(self) -> tuple[float, float]:
        """Prompt tokens looked up and found, summed over the replicas."""
        counted = replica_counters(self.urls)
        return counted.cache_queries, counted.cache_hits

    def requests_per_replica(self) -> list[float]:
        found = []
        for url in self.urls:
            text = httpx.get(url + "/metrics").text
            found.append(
                sum(
                    float(line.rsplit(" ", 1)[1])
                    for line in text.splitlines()
                    if line.startswith("vllm:request_success_total{")
                )
            )
        return found


@pytest.fixture
def simulators(tmp_path: Path, helpers: Any) -> Iterator[Callable[[], Simulator]]:
    started: list[Simulator] = []

    def start() -> Simulator:
        # Fast steps: the tests are about where requests go, not how long.
        sim = Simulator(tmp_path, f"simulator-{len(started)}", helpers.fast_simulator)
        started.append(sim)
        return sim

    yield start
    for sim in started:
        procs.stop(sim.proc)


def converse(client: openai.OpenAI, model: str) -> None:
    """Seven users, four turns each, taking turns: two shared system prompts, a
    long text of each user's own at the head of its first message.

    Seven, not a multiple of the replicas: with eight, round robin would send each
    user to the same replica every turn and be sticky by accident.
    """
    systems = [
        f"System {s}: you answer questions about clusters. " * 40 for s in (0, 1)
    ]
    chats: list[list[Any]] = [
        [{"role": "system", "content": systems[user % 2]}] for user in range(7)
    ]
    for turn in range(4):
        for user, messages in enumerate(chats):
            context = f"User {user}'s notes: " + "lorem ipsum dolor " * 200
            question = f"Question {turn} from user {user}?"
            messages.append(
                {
                    "role": "user",
                    "content": f"{context}\n\n{question}" if turn == 0 else question,
                }
            )
            answer = client.chat.completions.create(
                model=model, messages=messages, max_tokens=16
            )
            messages.append(
                {"role": "assistant", "content": answer.choices[0].message.content}
            )


def run(
    strategy: str,
    simulators: Callable[[], Simulator],
    start_gateway: Any,
    helpers: Any,
    tmp_path: Path,
) -> Simulator:
    sim = simulators()
    model = {
        "name": "chat",
        "namespace": "llm",
        "servedName": "chat",
        "service": "chat",
        "endpoints": sim.urls,
        "ready": True,
        "strategy": strategy,
    }
    keys = tmp_path / f"keys-{strategy}.json"
    key = helpers.create_key(keys, strategy)
    gateway = start_gateway([model], keys)
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=0
    ) as client:
        converse(client, "chat")
    return sim


def test_prefix_aware_finds_far_more_of_each_prompt_cached_than_round_robin(
    simulators: Callable[[], Simulator],
    start_gateway: Any,
    helpers: Any,
    tmp_path: Path,
) -> None:
    prefix = run("prefix-aware", simulators, start_gateway, helpers, tmp_path)
    rotation = run("round-robin", simulators, start_gateway, helpers, tmp_path)
    queries, hits = prefix.prefix_cache()
    rr_queries, rr_hits = rotation.prefix_cache()
    print(
        f"hit rate: prefix-aware {hits / queries:.3f}, round robin "
        f"{rr_hits / rr_queries:.3f}; requests per replica, prefix-aware "
        f"{prefix.requests_per_replica()}"
    )
    # Same prompts on both: only where they went differs.
    assert queries == rr_queries
    # Every later turn finds its whole conversation cached, bar the new question.
    assert hits / queries > 0.7
    assert hits / queries > rr_hits / rr_queries + 0.4
    # ... without putting every conversation on one replica.
    assert sum(1 for n in prefix.requests_per_replica() if n > 0) >= 3
