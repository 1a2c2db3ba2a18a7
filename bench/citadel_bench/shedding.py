"""Priorities under overload: what load shedding buys interactive users when a
batch job fills a model's replicas.

Two simulated replicas that each run `MAX_NUM_SEQS` requests at once (the rest
wait in their queue, as vLLM's `--max-num-seqs` makes them) sit behind one
Citadel gateway at its defaults (`prefix-aware`, a 2 s scrape period, a replica
full at more than 5 requests waiting). Interactive users hold short streamed
chats with a pause between them (`USERS`, `THINK_S`); a batch job keeps
`BATCH_WORKERS` long requests going (`BATCH_TOKENS` each), more than the
replicas run at once.
Each phase runs on fresh processes:

- `interactive alone`: the users without the batch, the latency the replicas
  give them when nothing else runs;
- `batch as standard`: the batch's requests sent as every request is without
  priorities: all of them queue, and so do the users' behind them;
- `batch as sheddable`: the batch's requests sent with `x-citadel-priority:
  sheddable`: refused (503 `model_overloaded`) while both replicas are full,
  each refused worker waiting the answer's `Retry-After` before its next;
- `batch as sheddable, queue depth 0`: the same with
  `CITADEL_GATEWAY_SHED_QUEUE_DEPTH=0`, a replica full as soon as one request
  waits there: the users' latency for less of the batch's throughput;
- `batch as standard, queued at the gateway`: the route's
  `maxRequestsPerReplica` at `MAX_NUM_SEQS`, so that what the replicas cannot
  run waits at the gateway (in arrival order, every request standard) and
  goes to the first replica that frees: what that alone changes;
- `batch as sheddable, queued at the gateway`: the same with the batch
  sheddable: the users' requests go before every queued batch request;
- `batch as sheddable, queued, places kept`: the same with the route's
  `reservedPerReplica` at `RESERVED`: the batch takes at most
  `MAX_NUM_SEQS` - `RESERVED` places of each replica, and a user's request
  finds one free rather than wait for a batch request to end.

The batch starts first and runs `BATCH_HEAD_S` alone so its queue stands when
the users start; the users' requests are the measured ones.
"""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import orjson

from citadel.gateway.services.shedding import PRIORITY_HEADER
from citadel_bench import loadgen, peers
from citadel_bench.procs import simulator_argv, start, stop, wait_listening
from citadel_bench.stats import Summary

REPLICAS = 2
MAX_NUM_SEQS = 8
USERS = 8
THINK_S = 0.5
USER_TOKENS = 64
BATCH_WORKERS = 32
BATCH_TOKENS = 256
BATCH_HEAD_S = 8.0
RESERVED = 2
_QUESTION = "Explain in a few sentences how a load balancer picks a server. " * 12
_DOCUMENT = "Summarise this report on quarterly capacity planning for GPUs. " * 60

_QUEUED: dict[str, object] = {"maxRequestsPerReplica": MAX_NUM_SEQS}
_KEPT: dict[str, object] = {**_QUEUED, "reservedPerReplica": RESERVED}

PHASES: tuple[tuple[str, str | None, dict[str, str], dict[str, object]], ...] = (
    ("interactive alone", None, {}, {}),
    ("batch as standard", "standard", {}, {}),
    ("batch as sheddable", "sheddable", {}, {}),
    (
        "batch as sheddable, queue depth 0",
        "sheddable",
        {"CITADEL_GATEWAY_SHED_QUEUE_DEPTH": "0"},
        {},
    ),
    ("batch as standard, queued at the gateway", "standard", {}, _QUEUED),
    ("batch as sheddable, queued at the gateway", "sheddable", {}, _QUEUED),
    ("batch as sheddable, queued, places kept", "sheddable", {}, _KEPT),
)
"""Each phase: its name, the batch's priority (None: no batch), the gateway's
settings besides its defaults, the route's fields besides its defaults."""


@dataclass(frozen=True)
class Phase:
    """What one phase measured.

    Attributes:
        name: as in `PHASES`.
        ttft_ms: the users' time to first token, answered requests.
        user_errors: the users' requests that failed (none is sheddable).
        batch_answered: batch requests answered within the phase.
        batch_shed: batch requests refused with 503 `model_overloaded`.
        batch_errors: batch requests that failed otherwise.
        seconds: how long the users ran.
    """

    name: str
    ttft_ms: Summary
    user_errors: int
    batch_answered: int
    batch_shed: int
    batch_errors: int
    seconds: float

    @property
    def batch_tokens_per_s(self) -> float:
        """The batch's generated tokens a second over the users' run."""
        return self.batch_answered * BATCH_TOKENS / self.seconds


@dataclass(frozen=True)
class SheddingResult:
    """Every phase, in the order of `PHASES`."""

    phases: list[Phase]


def user_body(user: int, turn: int) -> dict[str, Any]:
    """A user's streamed chat: a prompt of its own (no shared prefix to hide
    the queue's wait behind a cache hit)."""
    return {
        "model": peers.MODEL,
        "messages": [{"role": "user", "content": f"{user}.{turn} {_QUESTION}"}],
        "max_tokens": USER_TOKENS,
        "stream": True,
    }


def batch_body(n: int) -> dict[str, Any]:
    """The batch's request `n`: a long document to summarise, at length."""
    return {
        "model": peers.MODEL,
        "messages": [{"role": "user", "content": f"{n} {_DOCUMENT}"}],
        "max_tokens": BATCH_TOKENS,
    }


@dataclass
class _Batch:
    answered: int = 0
    shed: int = 0
    errors: int = 0
    counting: bool = False


async def _batch_worker(
    client: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    tally: _Batch,
    numbers: Iterator[int],
    stop_at: float,
) -> None:
    """Sends batch requests one after another until `stop_at`; a refused one
    waits the answer's `Retry-After`, as the OpenAI client does."""
    while time.perf_counter() < stop_at:
        wait = 0.0
        try:
            async with client.post(
                url, data=orjson.dumps(batch_body(next(numbers))), headers=headers
            ) as response:
                body = await response.read()
                if response.status == 200:
                    tally.answered += tally.counting
                elif response.status == 503 and b"model_overloaded" in body:
                    tally.shed += tally.counting
                    wait = float(response.headers.get("retry-after", "1"))
                else:
                    tally.errors += tally.counting
                    wait = 1.0
        except (TimeoutError, aiohttp.ClientError):
            tally.errors += tally.counting
            wait = 1.0
        if wait:
            await asyncio.sleep(min(wait, max(0.0, stop_at - time.perf_counter())))


async def _user(
    client: aiohttp.ClientSession,
    url: str,
    headers: dict[str, str],
    user: int,
    stop_at: float,
    samples: list[loadgen.Sample],
) -> None:
    turn = 0
    while time.perf_counter() < stop_at:
        samples.append(await loadgen.send(client, url, user_body(user, turn), headers))
        turn += 1
        await asyncio.sleep(THINK_S)


async def _drive(
    url: str, key: dict[str, str], priority: str | None, seconds: float
) -> tuple[list[loadgen.Sample], _Batch, float]:
    chat = url + "/v1/chat/completions"
    tally = _Batch()
    numbers = itertools.count()
    began = time.perf_counter()
    head = BATCH_HEAD_S if priority else 0.0
    stop_at = began + head + seconds
    batch_headers = {**key, PRIORITY_HEADER: priority} if priority else key
    samples: list[loadgen.Sample] = []
    async with (
        loadgen.session(BATCH_WORKERS, timeout_s=600) as batch_client,
        loadgen.session(USERS, timeout_s=600) as user_client,
    ):
        workers = [
            asyncio.create_task(
                _batch_worker(
                    batch_client, chat, batch_headers, tally, numbers, stop_at
                )
            )
            for _ in range(BATCH_WORKERS if priority else 0)
        ]
        await asyncio.sleep(head)
        tally.counting = True
        users_began = time.perf_counter()
        await asyncio.gather(
            *(_user(user_client, chat, key, u, stop_at, samples) for u in range(USERS))
        )
        users_s = time.perf_counter() - users_began
        tally.counting = False
        for worker in workers:
            worker.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return samples, tally, users_s


def run_phase(
    name: str,
    priority: str | None,
    env: dict[str, str],
    route: dict[str, object],
    log_dir: Path,
    seconds: float,
) -> Phase:
    """One phase on fresh replicas and a fresh gateway."""
    slug = name.replace(" ", "-").replace(",", "")
    sim = start(
        f"shed-sim-{slug}",
        simulator_argv(REPLICAS, "--max-num-seqs", str(MAX_NUM_SEQS)),
        log_dir,
    )
    procs = [sim]
    try:
        backends = [f"http://127.0.0.1:{p}" for p in wait_listening(sim)]
        files = peers.citadel_files(
            backends, log_dir, name=f"shed-{slug}", route_options=route
        )
        [gateway] = peers.start_gateways(files, log_dir, [f"shed-{slug}"], env)
        procs.append(gateway.proc)
        samples, tally, users_s = asyncio.run(
            _drive(gateway.url, dict(files.headers), priority, seconds)
        )
    finally:
        for proc in reversed(procs):
            stop(proc)
    answered = [s.first_chunk * 1000 for s in samples if s.ok]
    return Phase(
        name=name,
        ttft_ms=Summary.of(answered),
        user_errors=sum(1 for s in samples if not s.ok),
        batch_answered=tally.answered,
        batch_shed=tally.shed,
        batch_errors=tally.errors,
        seconds=users_s,
    )


def run_shedding(log_dir: Path, seconds: float) -> SheddingResult:
    """Every phase of `PHASES`, the users running `seconds` in each."""
    return SheddingResult(
        [
            run_phase(name, priority, env, route, log_dir, seconds)
            for name, priority, env, route in PHASES
        ]
    )
