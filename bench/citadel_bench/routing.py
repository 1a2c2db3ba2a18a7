"""Routing quality: a multi-turn chat workload over simulated replicas, through
each Citadel strategy, each vllm-router policy, plain round robin (the load
generator itself rotating over the replicas, no proxy), and a reference placement
without a proxy (`PINNED_WARM`)."""

from __future__ import annotations

import asyncio
import itertools
import re
import statistics
import sys
import time
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from citadel_bench import loadgen, peers
from citadel_bench.procs import (
    Proc,
    bench_env,
    free_port,
    simulator_argv,
    start,
    stop,
    wait_http,
    wait_listening,
)
from citadel_bench.pyspy import (
    PROXY_CATEGORIES,
    categorize,
    start_sampling,
    stop_sampling,
)
from citadel_bench.stats import Summary
from citadel_bench.workload import ChatWorkload, conversation, system_prompts

REPLICAS = 4
CITADEL_STRATEGIES = (
    "prefix-aware",
    "round-robin",
    "least-load",
    "kv-aware",
    "session-affinity",
)
# kv_aware needs vLLM's KV-cache event stream (ZMQ), which the simulator lacks.
ROUTER_POLICIES = (
    "cache_aware",
    "round_robin",
    "random",
    "power_of_two",
    "consistent_hash",
    "sticky_least_loaded",
)
# A KV cache of 32k tokens per replica: the conversations alive at once fit when
# each stays on one replica, not when every replica sees all of them (the
# workloads are sized against it, see ChatWorkload.footprint). A chunk per 8
# tokens spares the CPU (TTFT is unchanged: the first token has its own chunk).
KV_CAPACITY_TOKENS = 32_768
SIM_OPTIONS = (
    "--kv-capacity-tokens",
    str(KV_CAPACITY_TOKENS),
    "--stream-every",
    "8",
)


@dataclass
class RoutingRun:
    """One target's results on the workload."""

    target: str
    requests: int
    errors: int
    ttft: Summary
    wall_s: float
    output_tokens: int
    cache_hits: float
    """Prompt tokens found in the replicas' prefix caches."""
    cache_queries: float
    """Prompt tokens looked up in them."""
    replica_ttft_sum_s: float = 0.0
    """The replicas' `vllm:time_to_first_token_seconds` sum: from each request's
    arrival at a replica to its first token, so without the proxy's own time."""
    replica_ttft_count: float = 0.0
    ttfts_ms: list[float] = field(default_factory=list, repr=False)
    later_ttfts_ms: list[float] = field(default_factory=list, repr=False)
    """TTFTs of every turn but each conversation's first: its cold prefill of the
    system prompt and context is due wherever it goes, so these show what routing
    decides."""
    round_means_ms: list[float] = field(default_factory=list)
    """Mean TTFT of each round on its own (the spread between rounds)."""
    proxy_cpu_s: float = 0.0
    """CPU time of the proxy's processes over the workload (0 without a proxy)."""
    profile: dict[str, int] = field(default_factory=dict)
    """py-spy samples of the proxy per kind of work (`pyspy.PROXY_CATEGORIES`),
    for a run made to be profiled; empty otherwise."""

    @property
    def hit_rate(self) -> float:
        """Prefix-cache hits / queries over all replicas (tokens)."""
        return self.cache_hits / self.cache_queries if self.cache_queries else 0.0

    @property
    def replica_ttft_ms(self) -> float:
        """Mean TTFT at the replicas (what routing decides, without the proxy)."""
        if not self.replica_ttft_count:
            return 0.0
        return 1000 * self.replica_ttft_sum_s / self.replica_ttft_count

    @property
    def later_mean_ms(self) -> float:
        """Mean TTFT after each conversation's first turn."""
        return statistics.fmean(self.later_ttfts_ms) if self.later_ttfts_ms else 0.0

    @property
    def front_ms(self) -> float:
        """Mean time in front of the replicas: client TTFT minus replica TTFT
        (the proxy's, the load generator's and the network's; 0 when the
        replicas' TTFT is unknown)."""
        return self.ttft.mean - self.replica_ttft_ms if self.replica_ttft_count else 0.0

    @property
    def proxy_cpu_ms(self) -> float:
        """The proxy's CPU time per request sent, failed ones included: they
        cost it too (0 without a proxy)."""
        sent = self.requests + self.errors
        return 1000 * self.proxy_cpu_s / sent if sent else 0.0

    @property
    def rps(self) -> float:
        return self.requests / self.wall_s

    @property
    def tokens_per_s(self) -> float:
        return self.output_tokens / self.wall_s


PLAIN_RR = "plain:round-robin"
"""The load generator rotating over the replicas itself, no proxy."""
PINNED_WARM = "plain:pinned-warm"
"""A reference, not a router and not a bound: each user kept on one replica (user
mod replicas) whose cache held every system prompt before the run, no proxy in
front. One fixed, even placement that starts warm, as no router does."""


BARE_RELAY = "python:bare-relay"
"""A reference: Citadel's HTTP stack relaying with none of its request work, sticky
sessions placed as `sticky_least_loaded` places them (`citadel_bench.relay`)."""

DEFAULT_STRATEGY = "citadel:prefix-aware"
"""Citadel's default strategy, the one the targets are about."""

PROFILED = (DEFAULT_STRATEGY, BARE_RELAY)
"""The targets whose proxy is profiled on each workload (in an extra run): the
default strategy, and the relay that shows what its HTTP stack alone costs."""

PROFILE_RATE = 1000
"""py-spy's samples a second on a profiled proxy: it is on the CPU for a few
percent of the run, and only those samples count."""


def plain_picker(target: str, backends: list[str]) -> Callable[[int], str]:
    """The replica for user N's next request on a target without a proxy.

    Raises:
        ValueError: not one of those targets.
    """
    if target == PINNED_WARM:
        return lambda user: backends[user % len(backends)]
    if target == PLAIN_RR:
        rotation = itertools.cycle(backends)
        return lambda _: next(rotation)
    raise ValueError(f"no proxy-less target {target!r}")


def turn_request_id(session: str, turn: int) -> str:
    """The `x-request-id` of a conversation's turn (from 0): the gateway logs
    it as sent, so its log says where each turn went."""
    return f"{session}.{turn}"


async def drive(
    workload: ChatWorkload,
    url_for: Callable[[int], str],
    deadline_s: float,
    headers: Mapping[str, str] | None = None,
    request_ids: bool = False,
) -> tuple[list[tuple[int, loadgen.Sample]], float]:
    """Every user holds its conversations turn by turn; bounded by `deadline_s`.

    Args:
        workload: what the users send.
        url_for: the base URL for a request of user N (asked once per request,
            in the order of that user's requests).
        deadline_s: no new request after this long.
        headers: what every request carries besides its session (a key).
        request_ids: each request also carries its conversation and turn as
            `x-request-id` (`turn_request_id`).

    Returns:
        (turn in its conversation from 0, sample) per request, and the wall time.
    """
    samples: list[tuple[int, loadgen.Sample]] = []
    deadline = time.perf_counter() + deadline_s
    async with loadgen.session(workload.users, timeout_s=120) as client:

        async def user(u: int) -> None:
            for c in range(workload.conversations_per_user):
                conv = conversation(workload, u, c)
                for turn in range(workload.turns):
                    if time.perf_counter() > deadline:
                        return
                    body = conv.next_request(workload, peers.MODEL)
                    url = url_for(u) + "/v1/chat/completions"
                    sent = {**(headers or {}), "x-session-id": conv.session}
                    if request_ids:
                        sent["x-request-id"] = turn_request_id(conv.session, turn)
                    sample = await loadgen.send(client, url, body, sent, keep_text=True)
                    samples.append((turn, sample))
                    if not sample.ok:
                        return
                    conv.add_answer(sample.text)

        began = time.perf_counter()
        await asyncio.gather(*(user(u) for u in range(workload.users)))
        return samples, time.perf_counter() - began


async def warm_up(workload: ChatWorkload, backends: list[str]) -> None:
    """Puts every system prompt of `workload` into every replica's prefix cache:
    a one-token chat of the system message alone, whose rendered blocks every
    conversation on that prompt starts with.

    Raises:
        RuntimeError: a replica refused.
    """
    async with loadgen.session(1) as client:
        for backend in backends:
            for prompt in system_prompts(workload):
                body = {
                    "model": peers.MODEL,
                    "messages": [{"role": "system", "content": prompt}],
                    "max_tokens": 1,
                    "stream": True,
                }
                url = backend + "/v1/chat/completions"
                if not (await loadgen.send(client, url, body)).ok:
                    raise RuntimeError(f"warming {backend} failed")


@dataclass(frozen=True)
class ReplicaCounters:
    """What the replicas counted over a run, summed over all of them."""

    cache_queries: float = 0.0
    cache_hits: float = 0.0
    ttft_sum_s: float = 0.0
    ttft_count: float = 0.0

    def since(self, earlier: ReplicaCounters) -> ReplicaCounters:
        """What was counted after `earlier` was read."""
        return ReplicaCounters(
            cache_queries=self.cache_queries - earlier.cache_queries,
            cache_hits=self.cache_hits - earlier.cache_hits,
            ttft_sum_s=self.ttft_sum_s - earlier.ttft_sum_s,
            ttft_count=self.ttft_count - earlier.ttft_count,
        )


_SUMMED = (
    "prefix_cache_queries_total",
    "prefix_cache_hits_total",
    "time_to_first_token_seconds_sum",
    "time_to_first_token_seconds_count",
)
_COUNTER = re.compile(rf"^vllm:({'|'.join(_SUMMED)})\{{[^}}]*\}} (\S+)$")


def replica_counters(backends: list[str]) -> ReplicaCounters:
    """Summed prefix-cache queries and hits, and TTFT sum and count, of the
    replicas."""
    sums = dict.fromkeys(_SUMMED, 0.0)
    for backend in backends:
        with urllib.request.urlopen(backend + "/metrics", timeout=5) as response:
            for line in response.read().decode().splitlines():
                match = _COUNTER.match(line)
                if match:
                    sums[match.group(1)] += float(match.group(2))
    return ReplicaCounters(
        cache_queries=sums["prefix_cache_queries_total"],
        cache_hits=sums["prefix_cache_hits_total"],
        ttft_sum_s=sums["time_to_first_token_seconds_sum"],
        ttft_count=sums["time_to_first_token_seconds_count"],
    )


def start_relay(backends: list[str], log_dir: Path) -> peers.Target:
    """The bare relay (`BARE_RELAY`) in front of `backends`."""
    port = free_port()
    proc = start(
        "bare-relay",
        [sys.executable, "-m", "citadel_bench.relay", "--port", str(port), *backends],
        log_dir,
        env=bench_env(),
    )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_http(proc, url + "/")
    except RuntimeError:
        stop(proc)
        raise
    return peers.Target(proc, url)


def run_target(
    target: str,
    workload: ChatWorkload,
    log_dir: Path,
    deadline_s: float,
    py_spy: Path | None = None,
) -> RoutingRun:
    """Fresh replicas (cold caches) and a fresh proxy for one target; with
    `py_spy`, the proxy is sampled over the workload (`RoutingRun.profile`)."""
    procs: list[Proc] = []
    proxy: peers.Target | None = None
    collapsed = ""
    try:
        sim = start(
            f"routing-sim-{target}", simulator_argv(REPLICAS, *SIM_OPTIONS), log_dir
        )
        procs.append(sim)
        backends = [f"http://127.0.0.1:{p}" for p in wait_listening(sim)]
        kind, _, variant = target.partition(":")
        url_for: Callable[[int], str]
        headers: Mapping[str, str] = {}
        if kind == "plain":
            url_for = plain_picker(target, backends)
            if target == PINNED_WARM:
                asyncio.run(warm_up(workload, backends))
        else:
            if kind == "citadel":
                proxy = peers.start_citadel(
                    backends, log_dir, variant, name=f"citadel-{variant}"
                )
            elif target == BARE_RELAY:
                proxy = start_relay(backends, log_dir)
            else:
                proxy = peers.start_vllm_router(backends, log_dir, variant)
            procs.append(proxy.proc)
            url, headers = proxy.url, proxy.headers
            url_for = lambda _: url  # noqa: E731
        # Read for every target, not only after a warm-up: whatever reached the
        # replicas before the workload (the reference's warm-up, a proxy's
        # probes) stays out of the hit rate and the replicas' TTFT.
        before = replica_counters(backends)
        cpu_before = proxy.proc.cpu_seconds() if proxy else 0.0
        out = log_dir / f"py-spy-{target.replace(':', '-')}.txt"
        spy = (
            start_sampling(py_spy, proxy.proc.pid, out, log_dir, PROFILE_RATE)
            if proxy
            else None
        )
        try:
            samples, wall = asyncio.run(drive(workload, url_for, deadline_s, headers))
        finally:
            collapsed = stop_sampling(spy, out)
        proxy_cpu_s = proxy.proc.cpu_seconds() - cpu_before if proxy else 0.0
        counted = replica_counters(backends).since(before)
    finally:
        for proc in reversed(procs):
            stop(proc)
    return routing_run(
        target,
        workload,
        samples,
        wall,
        counted,
        proxy_cpu_s,
        categorize(collapsed, PROXY_CATEGORIES) if collapsed else {},
    )


def routing_run(
    target: str,
    workload: ChatWorkload,
    samples: list[tuple[int, loadgen.Sample]],
    wall: float,
    counted: ReplicaCounters,
    proxy_cpu_s: float,
    profile: dict[str, int] | None = None,
) -> RoutingRun:
    """One round of a target as a `RoutingRun`: the answered requests' TTFTs,
    the replicas' counters over the round, the proxy's CPU time.

    Args:
        target: the target's name.
        workload: what was sent.
        samples: (turn in its conversation from 0, sample) per request (`drive`).
        wall: the round's wall time.
        counted: the replicas' counters over the round.
        proxy_cpu_s: CPU time of the proxy's processes over the round.
        profile: py-spy samples per kind of work, for a profiled round.
    """
    ok = [(turn, s) for turn, s in samples if s.ok]
    ttfts = [s.first_chunk * 1000 for _, s in ok]
    summary = Summary.of(ttfts)
    return RoutingRun(
        target=target,
        requests=len(ok),
        errors=len(samples) - len(ok),
        ttft=summary,
        wall_s=wall,
        output_tokens=len(ok) * workload.max_tokens,
        cache_hits=counted.cache_hits,
        cache_queries=counted.cache_queries,
        replica_ttft_sum_s=counted.ttft_sum_s,
        replica_ttft_count=counted.ttft_count,
        ttfts_ms=ttfts,
        later_ttfts_ms=[s.first_chunk * 1000 for turn, s in ok if turn > 0],
        round_means_ms=[summary.mean],
        proxy_cpu_s=proxy_cpu_s,
        profile=profile or {},
    )


def merge_rounds(runs: list[RoutingRun]) -> RoutingRun:
    """One target's rounds (in order) as one run: requests pooled, each round's
    mean kept."""
    ttfts = [t for run in runs for t in run.ttfts_ms]
    return RoutingRun(
        target=runs[0].target,
        requests=sum(run.requests for run in runs),
        errors=sum(run.errors for run in runs),
        ttft=Summary.of(ttfts),
        wall_s=sum(run.wall_s for run in runs),
        output_tokens=sum(run.output_tokens for run in runs),
        cache_hits=sum(run.cache_hits for run in runs),
        cache_queries=sum(run.cache_queries for run in runs),
        replica_ttft_sum_s=sum(run.replica_ttft_sum_s for run in runs),
        replica_ttft_count=sum(run.replica_ttft_count for run in runs),
        ttfts_ms=ttfts,
        later_ttfts_ms=[t for run in runs for t in run.later_ttfts_ms],
        round_means_ms=[m for run in runs for m in run.round_means_ms],
        proxy_cpu_s=sum(run.proxy_cpu_s for run in runs),
    )


def targets(router_available: bool) -> list[str]:
    """Every routing target, Citadel's default first."""
    names = [f"citadel:{s}" for s in CITADEL_STRATEGIES]
    names += [PLAIN_RR, PINNED_WARM, BARE_RELAY]
    if router_available:
        names += [f"vllm-router:{p}" for p in ROUTER_POLICIES]
    return names


@dataclass
class RoutingResult:
    """Every target's run on one workload.

    Attributes:
        workload: what ran.
        runs: one per target that ran, in the order of `targets`.
        skipped: target (or peer) -> why it did not run.
    """

    workload: ChatWorkload
    runs: list[RoutingRun] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)
    profiled: list[RoutingRun] = field(default_factory=list)
    """Runs of `PROFILED` targets made after the rounds with the proxy sampled
    by py-spy: not in `runs`, so the sampling disturbs no measured run."""


def run_routing(
    workload: ChatWorkload,
    log_dir: Path,
    deadline_s: float,
    rounds: int = 1,
    py_spy: Path | None = None,
) -> RoutingResult:
    """Every target, `rounds` times over, the order rotated each round so that
    drift on the shared machine does not always fall on the same targets; a
    target's rounds are pooled. Failures are recorded, not raised: a target that
    fails in any round is left out. With `py_spy`, each of `PROFILED` runs once
    more, sampled (`RoutingResult.profiled`)."""
    problem = peers.peer_problem("vllm-router")
    result = RoutingResult(workload)
    if problem:
        result.skipped["vllm-router"] = problem
    names = targets(problem is None)
    done: dict[str, list[RoutingRun]] = {name: [] for name in names}
    for n in range(rounds):
        # Each round's logs apart: the gateway's access log traces every request.
        round_dir = log_dir / f"routing-{workload.slug}-round-{n + 1}"
        round_dir.mkdir(parents=True, exist_ok=True)
        for target in names[n % len(names) :] + names[: n % len(names)]:
            if target in result.skipped:
                continue
            try:
                run = run_target(target, workload, round_dir, deadline_s)
            except RuntimeError as err:
                result.skipped[target] = f"did not run: {str(err)[-300:]}"
                continue
            done[target].append(run)
            print(
                f"routing {workload.slug} round {n + 1} {target:32} "
                f"n={run.requests} err={run.errors} "
                f"ttft mean={run.ttft.mean:7.1f}ms p90={run.ttft.p90:7.1f}ms "
                f"rps={run.rps:6.2f} hit={run.hit_rate:.2f} "
                f"replica ttft={run.replica_ttft_ms:6.1f}ms",
                flush=True,
            )
    result.runs = [
        merge_rounds(done[name])
        for name in names
        if done[name] and name not in result.skipped
    ]
    if py_spy is None:
        return result
    profile_dir = log_dir / f"routing-{workload.slug}-profiled"
    profile_dir.mkdir(parents=True, exist_ok=True)
    for target in PROFILED:
        if target not in names or target in result.skipped:
            continue
        try:
            result.profiled.append(
                run_target(target, workload, profile_dir, deadline_s, py_spy)
            )
        except Exception as err:
            # A profile is an extra: its failure (py-spy refused, say) must not
            # lose the workload's measured results.
            print(f"routing {workload.slug} profile of {target} failed: {err!r}")
    return result
