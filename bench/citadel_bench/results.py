"""Aggregating the raw results into the report's rows and the targets' verdicts."""

from __future__ import annotations

import math
from dataclasses import dataclass

from citadel_bench.gateways import ONE, GatewaysResult
from citadel_bench.memory import MemoryRun
from citadel_bench.operator_scale import ScaleRun
from citadel_bench.overhead import Point
from citadel_bench.report import DASH, Verdict, fmt, spread
from citadel_bench.routing import (
    BARE_RELAY,
    DEFAULT_STRATEGY,
    PINNED_WARM,
    PLAIN_RR,
    RoutingResult,
    RoutingRun,
)
from citadel_bench.stats import median, percentile, ratio


@dataclass(frozen=True)
class OverheadRow:
    """One target at one mode and concurrency, over all rounds."""

    mode: str
    concurrency: int
    target: str
    rps: float
    median_ms: float
    p99_ms: float
    added_median_ms: float
    added_p99_ms: float
    first_chunk_ms: float
    spread_ms: tuple[float, float]
    """Lowest and highest per-round median (drift)."""
    round_rps: list[float]
    """Each round's RPS."""
    cpu_cores: float
    rss_mb: float
    errors: int


def overhead_rows(points: list[Point]) -> list[OverheadRow]:
    """Medians over rounds; added latency is per round against `direct`."""
    keys = sorted(
        {(p.mode, p.concurrency, p.target) for p in points},
        key=lambda k: (k[0], k[1], _target_order(k[2])),
    )
    rows = []
    for mode, level, target in keys:
        mine = [
            p
            for p in points
            if (p.mode, p.concurrency, p.target) == (mode, level, target)
        ]
        direct = {
            p.round: p
            for p in points
            if (p.mode, p.concurrency, p.target) == (mode, level, "direct")
        }
        added = [
            p.median_ms - direct[p.round].median_ms for p in mine if p.round in direct
        ]
        added99 = [p.p99_ms - direct[p.round].p99_ms for p in mine if p.round in direct]
        medians = [p.median_ms for p in mine]
        rows.append(
            OverheadRow(
                mode=mode,
                concurrency=level,
                target=target,
                rps=median([p.rps for p in mine]),
                median_ms=median(medians),
                p99_ms=median([p.p99_ms for p in mine]),
                added_median_ms=median(added),
                added_p99_ms=median(added99),
                first_chunk_ms=median([p.first_chunk_ms for p in mine]),
                spread_ms=(min(medians), max(medians)),
                round_rps=[p.rps for p in mine],
                cpu_cores=median([p.cpu_cores for p in mine]),
                rss_mb=max(p.rss_mb for p in mine),
                errors=sum(p.errors for p in mine),
            )
        )
    return rows


def _target_order(target: str) -> int:
    order = ["direct", "citadel", "vllm-router", "litellm"]
    return order.index(target) if target in order else len(order)


def _row(
    rows: list[OverheadRow], mode: str, level: int, target: str
) -> OverheadRow | None:
    return next(
        (r for r in rows if (r.mode, r.concurrency, r.target) == (mode, level, target)),
        None,
    )


def overhead_verdicts(
    rows: list[OverheadRow], skipped: dict[str, str]
) -> list[Verdict]:
    verdicts = []
    for mode in ("json", "stream"):
        row = _row(rows, mode, 1, "citadel")
        if row:
            verdicts.append(
                Verdict(
                    f"Citadel added median latency < 1 ms ({mode}, concurrency 1)",
                    f"{fmt(row.added_median_ms)} ms",
                    row.added_median_ms < 1.0,
                )
            )
    for peer, wanted, label in (
        ("vllm-router", 0.5, "at least half vllm-router's RPS"),
        ("vllm-router", 1.0, "RPS at least vllm-router's (design target)"),
        ("litellm", 1.0, "RPS at least LiteLLM's (design target)"),
    ):
        for mode in ("json", "stream"):
            ours = _row(rows, mode, 64, "citadel")
            theirs = _row(rows, mode, 64, peer)
            if ours is None or theirs is None:
                verdicts.append(
                    Verdict(
                        f"{label} ({mode}, c=64)", DASH, None, skipped.get(peer, "")
                    )
                )
                continue
            r = ratio(ours.rps, theirs.rps)
            verdicts.append(
                Verdict(
                    f"{label} ({mode}, concurrency 64)",
                    f"{fmt(ours.rps, 0)} vs {fmt(theirs.rps, 0)} RPS = {fmt(r)}x",
                    r >= wanted,
                    _joined(
                        ""
                        if r >= wanted
                        else f"short by {fmt(100 * (wanted - r) / wanted, 0)}%",
                        _rps_overlap(ours.round_rps, theirs.round_rps),
                    ),
                )
            )
    return verdicts


def routing_verdicts(result: RoutingResult) -> list[Verdict]:
    """The two routing targets on one workload, named after it."""
    on = f"({result.workload.name})"
    by = {r.target: r for r in result.runs}
    default = by.get(DEFAULT_STRATEGY)
    plain = by.get(PLAIN_RR)
    verdicts = []
    if default and plain:
        r = ratio(default.ttft.mean, plain.ttft.mean)
        verdicts.append(
            Verdict(
                f"prefix-aware mean TTFT <= 0.5 x round robin's {on}",
                f"{fmt(default.ttft.mean, 1)} vs {fmt(plain.ttft.mean, 1)} ms "
                f"= {fmt(r)}x",
                r <= 0.5,
                ""
                if r <= 0.5
                else _joined(
                    f"{fmt(r / 0.5)}x the allowed ratio",
                    _later(default, plain, ratio_too=True),
                    _reference(by.get(PINNED_WARM), plain),
                ),
            )
        )
    router = [r for r in result.runs if r.target.startswith("vllm-router:")]
    if default and router:
        best = min(router, key=lambda r: r.ttft.mean)
        verdicts.append(
            Verdict(
                f"prefix-aware mean TTFT below every vllm-router policy {on}",
                f"{fmt(default.ttft.mean, 1)} ms vs best {best.target.split(':')[1]} "
                f"{fmt(best.ttft.mean, 1)} ms",
                default.ttft.mean < best.ttft.mean,
                _joined(
                    _overlap(default.round_means_ms, best.round_means_ms),
                    _later(default, best),
                    _at_replicas(default, best),
                    _relay(by.get(BARE_RELAY)),
                    _in_front(default, best, by.get(BARE_RELAY)),
                ),
            )
        )
    elif default:
        verdicts.append(
            Verdict(
                f"prefix-aware below every vllm-router policy {on}",
                DASH,
                None,
                result.skipped.get("vllm-router", ""),
            )
        )
    return verdicts


def _later(ours: RoutingRun, theirs: RoutingRun, ratio_too: bool = False) -> str:
    """Both targets' mean TTFT after each conversation's first turn, as a note."""
    if not ours.later_ttfts_ms or not theirs.later_ttfts_ms:
        return ""
    a, b = ours.later_mean_ms, theirs.later_mean_ms
    ratio_note = f" = {fmt(ratio(a, b))}x" if ratio_too else ""
    return (
        f"after each conversation's first turn: {fmt(a, 1)} vs {fmt(b, 1)} ms"
        + ratio_note
    )


def _relay(relay: RoutingRun | None) -> str:
    """The bare relay's mean TTFT, as a note: where the gateway's HTTP stack
    alone stands, without its request work."""
    if relay is None:
        return ""
    return (
        f"{BARE_RELAY} (a reference: Citadel's HTTP stack, none of its request "
        f"work) {fmt(relay.ttft.mean, 1)} ms"
    )


def _reference(pinned: RoutingRun | None, plain: RoutingRun) -> str:
    """What the reference placement reached against round robin, as a note, and
    whether it would meet the target itself: a sign of how far this workload lets
    placement go, not a bound."""
    if pinned is None:
        return ""
    r = ratio(pinned.ttft.mean, plain.ttft.mean)
    return (
        f"{PINNED_WARM} (a reference: pinned, warm caches, no proxy) "
        f"{fmt(pinned.ttft.mean, 1)} ms = {fmt(r)}x, "
        + ("within" if r <= 0.5 else "also above")
        + " half"
    )


def _at_replicas(ours: RoutingRun, theirs: RoutingRun) -> str:
    """Both targets' mean TTFT as the replicas measured it (no proxy time), as a
    note."""
    if not ours.replica_ttft_count or not theirs.replica_ttft_count:
        return ""
    return (
        f"at the replicas (vllm:time_to_first_token_seconds): "
        f"{fmt(ours.replica_ttft_ms, 1)} vs {fmt(theirs.replica_ttft_ms, 1)} ms"
    )


def _in_front(ours: RoutingRun, theirs: RoutingRun, relay: RoutingRun | None) -> str:
    """The time in front of the replicas (`RoutingRun.front_ms`) and the proxy's
    CPU per request, ours against theirs (and the relay's), as a note: what the
    proxies themselves add where the replicas' TTFT is alike."""
    runs = [run for run in (ours, theirs, relay) if run is not None]
    if not all(run.replica_ttft_count and run.proxy_cpu_s for run in runs):
        return ""
    relay_front = f", relay {fmt(relay.front_ms, 1)}" if relay else ""
    relay_cpu = f", relay {fmt(relay.proxy_cpu_ms, 2)}" if relay else ""
    return (
        f"in front of the replicas (client minus replica TTFT): "
        f"{fmt(ours.front_ms, 1)} vs {fmt(theirs.front_ms, 1)}{relay_front} ms; "
        f"proxy CPU per request {fmt(ours.proxy_cpu_ms, 2)} vs "
        f"{fmt(theirs.proxy_cpu_ms, 2)}{relay_cpu} ms"
    )


def _joined(*notes: str) -> str:
    """The non-empty notes, as one."""
    return "; ".join(n for n in notes if n)


def _ranges_overlap(ours: list[float], theirs: list[float]) -> bool:
    """Whether two targets' per-round values (two rounds or more each) overlap:
    then which is ahead may change from run to run."""
    if len(ours) < 2 or len(theirs) < 2:
        return False
    return not (max(ours) < min(theirs) or max(theirs) < min(ours))


def _overlap(ours: list[float], theirs: list[float]) -> str:
    """A note when two targets' single-round means overlap, so the comparison of
    their pooled means is within the run-to-run spread."""
    if not _ranges_overlap(ours, theirs):
        return ""
    return (
        f"within the spread between rounds (round means {spread(ours)} vs "
        f"{spread(theirs)} ms)"
    )


def _rps_overlap(ours: list[float], theirs: list[float]) -> str:
    """A note when two targets' per-round RPS ranges overlap: the comparison of
    their medians is within the run-to-run noise."""
    if not _ranges_overlap(ours, theirs):
        return ""
    return (
        f"per-round RPS ranges overlap ({spread(ours, 0)} vs {spread(theirs, 0)}): "
        "within noise"
    )


def scale_verdicts(run: ScaleRun) -> list[Verdict]:
    n = f"{run.models} models on {run.nodes} nodes"
    if run.problem:
        return [Verdict(f"operator scale ({n})", DASH, None, run.problem[:200])]
    p99 = percentile(run.latencies_s, 99)
    steady99 = percentile(run.steady_latencies_s, 99)
    ready = run.all_ready_s
    floor = run.floor_ready_s
    return [
        Verdict(
            f"a new LLMModel has its Deployment within 1 s (p99, one at a time, "
            f"{run.models} present)",
            f"p50 {fmt(percentile(run.steady_latencies_s, 50), 3)} s, "
            f"p99 {fmt(steady99, 3)} s",
            not math.isnan(steady99) and steady99 <= 1.0,
        ),
        Verdict(
            f"the same during the burst of {run.models} (p99)",
            f"p50 {fmt(percentile(run.latencies_s, 50))} s, p99 {fmt(p99)} s",
            not math.isnan(p99) and p99 <= 1.0,
            "models arrive faster than the saturated machine turns them into "
            "Deployments, so they queue",
        ),
        Verdict(
            f"{n} Ready within 60 s",
            f"{fmt(ready, 1)} s" if ready is not None else "not all Ready",
            ready is not None and ready <= 60.0,
            f"creating them took {fmt(run.apply_s, 1)} s of that (kubectl); the "
            "cluster alone, with no operator, took "
            + (f"{fmt(floor, 1)} s" if floor is not None else "(not measured)")
            + " for the same Deployments and Services",
        ),
    ]


def memory_verdict(run: MemoryRun) -> Verdict:
    """RSS growth over the measured requests, from the end of the warm-up (the
    prefix table at its full size) to the end; the RSS at start-up is a note."""
    return Verdict(
        f"gateway RSS growth < 10% over {run.requests:,} requests",
        f"{fmt(run.warm_mb, 1)} -> {fmt(run.end_mb, 1)} MiB "
        f"({fmt(100 * run.growth, 1)}%)",
        run.growth < 0.10,
        f"after a warm-up of {run.warmup:,} requests that took the prefix "
        f"table to its full size; {fmt(run.start_mb, 1)} MiB at start-up, "
        "before any completion",
    )


def later_versus_one(result: GatewaysResult) -> dict[str, float]:
    """Each target's mean TTFT after the first turns over the one-gateway
    reference's (NaN for all without the reference): what the placements cost
    the turns that placement decides."""
    one = next((run for run in result.runs if run.target == ONE.target), None)
    return {
        run.target: ratio(run.run.later_mean_ms, one.run.later_mean_ms)
        if one and one.run.later_ttfts_ms and run.run.later_ttfts_ms
        else math.nan
        for run in result.runs
    }
