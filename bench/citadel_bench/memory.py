"""Gateway memory over many requests: RSS sampled between batches of requests
against the fast backend.

Every request of the run is a prompt of its own, several hash blocks long, so
that the prefix-aware strategy (the default) remembers new block hashes with
each: its table fills to its cap during the warm-up and keeps turning over
while RSS is measured. Requests that repeated earlier prompts would leave the
table as it was and say nothing about it.
"""

from __future__ import annotations

import asyncio
import inspect
import math
import tracemalloc
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from citadel.gateway.services.prefix import block_hashes, prefix_text
from citadel.gateway.services.replicas import Replica
from citadel.gateway.services.strategies import PrefixAware, RouteRequest
from citadel_bench import loadgen, peers
from citadel_bench.overhead import REPLY_TOKENS, start_instant_citadel
from citadel_bench.procs import Proc, stop

CONCURRENCY = 16
# ~2,100 characters (~500 tokens): a short chat turn with its system prompt,
# 8 full blocks of the gateway's prefix hashes.
FILLER = (
    "Summarise the benefits of continuous batching for a large language model "
    "server, with an example of a request arriving mid-batch. "
) * 16


def memory_body(n: int, stream: bool) -> dict[str, Any]:
    """Request `n` of the run: its number leads the prompt, so its every block
    hash is new (each covers the blocks before it)."""
    return {
        "model": peers.MODEL,
        "messages": [{"role": "user", "content": f"Request {n}. {FILLER}"}],
        "max_tokens": REPLY_TOKENS,
        "stream": stream,
    }


def blocks_per_request() -> int:
    """Block hashes each request adds to the prefix-aware table, counted by the
    gateway's own code."""
    return len(block_hashes(prefix_text(memory_body(0, False))))


def table_capacity() -> int:
    """Slots of the prefix-aware table (the gateway builds it with its
    defaults), a block hash each at most."""
    capacity: int = inspect.signature(PrefixAware).parameters["capacity"].default
    return capacity


def warmup_requests(per_batch: int) -> int:
    """Requests before the first measured sample: whole batches, enough to send
    as many block hashes as the prefix table has slots and one batch more, so
    that the measured window starts with the table at its full size and
    turning over (steady state)."""
    fill = math.ceil(table_capacity() / blocks_per_request())
    return per_batch * (math.ceil(fill / per_batch) + 1)


def full_table_mib() -> float:
    """What the prefix-aware table weighs once sent as many of this run's
    hashes as it has slots: a `PrefixAware` alone, in this process, fed the
    run's requests, its Python allocations traced (the gateway's interpreter
    is this one)."""
    strategy = PrefixAware()
    replicas = [Replica("http://replica")]
    requests = math.ceil(table_capacity() / blocks_per_request())
    bodies = [memory_body(n, False) for n in range(requests)]
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for body in bodies:
            strategy.choose(replicas, RouteRequest(body))
        held = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    return held / 2**20


@dataclass
class MemoryRun:
    """The gateway's RSS over the run.

    Attributes:
        requests: measured requests (after the warm-up).
        errors: failed requests, warm-up included.
        curve: (requests sent so far, RSS MiB): at start-up, before any
            completion, then after each batch, warm-up batches included.
        warmup: requests of the warm-up.
        wall_s: load time of the measured batches.
        blocks_per_request: block hashes each request adds to the table.
        table_capacity: slots of the table (a block hash each).
        table_mib: what the full table weighs (`full_table_mib`).
    """

    requests: int
    errors: int
    curve: list[tuple[int, float]]
    warmup: int
    wall_s: float
    blocks_per_request: int
    table_capacity: int
    table_mib: float

    @property
    def start_mb(self) -> float:
        """RSS at start-up, before any completion (only the readiness checks)."""
        return self.curve[0][1]

    @property
    def warm_mb(self) -> float:
        """RSS after the warm-up: where the measured window starts."""
        return next(rss for n, rss in self.curve if n >= self.warmup)

    @property
    def end_mb(self) -> float:
        return self.curve[-1][1]

    @property
    def growth(self) -> float:
        """Relative RSS growth over the measured requests (warm-up to end)."""
        return (self.end_mb - self.warm_mb) / self.warm_mb


def run_memory(log_dir: Path, total: int, batches: int = 10) -> MemoryRun:
    """A warm-up (`warmup_requests`), then `total` requests in `batches`
    batches; every request distinct, half the batches streamed, concurrency
    16."""
    table_mib = full_table_mib()
    procs: list[Proc] = []
    try:
        gateway = start_instant_citadel(log_dir, "memory", procs)
        chat = gateway.url + "/v1/chat/completions"
        per_batch = max(1, total // batches)
        warmup = warmup_requests(per_batch)

        async def batch(index: int) -> loadgen.Run:
            first, stream = index * per_batch, index % 2 == 1

            def make(i: int) -> dict[str, Any]:
                return memory_body(first + i, stream)

            return await loadgen.closed_loop(
                chat, make, CONCURRENCY, per_batch, 600, gateway.headers
            )

        curve = [(0, gateway.proc.rss_bytes() / 2**20)]
        sent, errors, wall = 0, 0, 0.0
        for index in range(warmup // per_batch + batches):
            run = asyncio.run(batch(index))
            sent += len(run.samples)
            errors += run.errors
            if sent > warmup:
                wall += run.wall_s
            curve.append((sent, gateway.proc.rss_bytes() / 2**20))
            print(f"memory after {sent} requests: {curve[-1][1]:.1f} MiB", flush=True)
        return MemoryRun(
            requests=sent - warmup,
            errors=errors,
            curve=curve,
            warmup=warmup,
            wall_s=wall,
            blocks_per_request=blocks_per_request(),
            table_capacity=table_capacity(),
            table_mib=table_mib,
        )
    finally:
        for proc in reversed(procs):
            stop(proc)
