import datetime as dt
from pathlib import Path

import pytest
from citadel_bench.config import FULL
from citadel_bench.document import (
    Results,
    gateways_part,
    routing_figure,
    routing_part,
    write_document,
)
from citadel_bench.gateways import (
    ONE,
    TWO,
    TWO_REDIS,
    GatewaysResult,
    GatewaysRun,
    Moves,
)
from citadel_bench.goprofile import ApiServerProfile
from citadel_bench.operator_scale import ScaleRun
from citadel_bench.overhead import Point
from citadel_bench.report import DASH, Verdict
from citadel_bench.results import (
    later_versus_one,
    overhead_rows,
    overhead_verdicts,
    routing_verdicts,
    scale_verdicts,
)
from citadel_bench.routing import RoutingResult, RoutingRun, merge_rounds
from citadel_bench.stats import Summary
from citadel_bench.workload import MULTI_ROUND_QA, SHORT_CHAT, ChatWorkload

pytestmark = pytest.mark.unit


def _run(target: str, ttft_ms: float) -> RoutingRun:
    return RoutingRun(
        target=target,
        requests=10,
        errors=0,
        ttft=Summary.of([ttft_ms]),
        wall_s=2.0,
        output_tokens=1000,
        cache_hits=1.0,
        cache_queries=2.0,
    )


def _result(workload: ChatWorkload, prefix_ms: float) -> RoutingResult:
    return RoutingResult(
        workload,
        [
            _run("citadel:prefix-aware", prefix_ms),
            _run("plain:round-robin", 100.0),
            _run("vllm-router:cache_aware", 60.0),
            _run("vllm-router:round_robin", 110.0),
        ],
    )


def _results() -> Results:
    return Results(
        config=FULL,
        started=dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
        load_start="1 1 1",
        machine={
            "cpu": "2 cores",
            "memory": "8 GiB",
            "os": "Linux",
            "python": "3.11",
            "commit": "abc",
        },
    )


def _write(r: Results, tmp_path: Path) -> str:
    path = tmp_path / "benchmarks.md"
    write_document(r, path, tmp_path)
    return path.read_text()


def test_routing_verdicts_are_named_after_the_workload() -> None:
    short = routing_verdicts(_result(SHORT_CHAT, 82.0))
    assert [v.ok for v in short] == [False, False]
    assert all(v.target.endswith("(short chat)") for v in short)
    assert "best cache_aware 60.0 ms" in short[1].measured
    qa = routing_verdicts(_result(MULTI_ROUND_QA, 30.0))
    assert [v.ok for v in qa] == [True, True]
    assert qa[0].measured == "30.0 vs 100.0 ms = 0.30x"


def test_document_reports_each_workload(tmp_path: Path) -> None:
    r = _results()
    r.routing = [_result(SHORT_CHAT, 82.0), _result(MULTI_ROUND_QA, 30.0)]
    doc = _write(r, tmp_path)
    targets = doc.split("## Targets")[1].split("\n## ")[0]
    # Both routing targets for each workload, so a miss on one stays visible.
    rows = [line for line in targets.splitlines() if "prefix-aware" in line]
    assert len(rows) == 4
    assert sum("(short chat)" in row and "| miss |" in row for row in rows) == 2
    assert sum("(multi-round QA)" in row and "| pass |" in row for row in rows) == 2
    routing = doc.split("## Routing quality")[1].split("\n## ")[0]
    short, qa = routing.split("### Short chat")[1].split("### Multi-round QA")
    # A table, a method paragraph and a plot per workload.
    assert short.count("| citadel:prefix-aware |") == 1
    assert qa.count("| citadel:prefix-aware |") == 1
    assert f"benchmarks/{routing_figure(SHORT_CHAT)}" in short
    assert f"benchmarks/{routing_figure(MULTI_ROUND_QA)}" in qa
    assert "one of 4 shared system prompts of 6,000 characters" in short
    assert "user-specific context" not in short
    assert "each holding 2 conversations one after another of 10 turns" in short
    assert "each holding one conversation of 10 turns" in qa
    assert "user-specific context of 16,000 characters" in qa
    assert "production-stack" in qa and "production-stack" not in short
    assert SHORT_CHAT.about in short
    assert "All 16 conversations need 37,360 tokens, 1.1x a replica" in short
    # The sizing: all users do not fit one replica, a quarter of them do.
    assert "All 16 conversations need 84,200 tokens, 2.6x a replica" in qa
    assert "a quarter of them (4, one replica's share" in qa
    assert "need 21,800, which fits." in qa


def test_document_says_which_workload_did_not_run(tmp_path: Path) -> None:
    r = _results()
    r.routing = [_result(SHORT_CHAT, 82.0)]
    r.failures[routing_part(MULTI_ROUND_QA)] = "RuntimeError: no simulator"
    doc = _write(r, tmp_path)
    qa = doc.split("### Multi-round QA")[1].split("\n## ")[0]
    assert "Not run: RuntimeError: no simulator" in qa
    targets = doc.split("## Targets")[1].split("\n## ")[0]
    assert "(multi-round QA)" not in targets and "(short chat)" in targets


def _scale() -> ScaleRun:
    return ScaleRun(
        models=1000,
        nodes=100,
        apply_s=10.0,
        all_deployments_s=50.0,
        all_ready_s=75.0,
        latencies_s=[0.5] * 50 + [20.0] * 50,
        steady_latencies_s=[0.02] * 19 + [0.3],
        ready_latencies_s=[30.0] * 99 + [70.0],
        cpu_by_process={"kube-apiserver": 60.0, "citadel-operator": 20.0},
        wall_s=80.0,
        floor_ready_s=55.0,
        floor_cpu_by_process={"kube-apiserver": 40.0},
    )


def test_scale_verdicts_separate_one_model_from_the_burst() -> None:
    one, burst, ready = scale_verdicts(_scale())
    assert one.ok is True and "one at a time" in one.target
    assert one.measured.startswith("p50 0.020 s, p99 0.2")
    assert burst.ok is False
    assert ready.ok is False and "took 55.0 s" in ready.note
    late = _scale()
    late.steady_latencies_s = [1.5] * 20
    assert scale_verdicts(late)[0].ok is False


def test_document_reports_the_floor_and_cpu_per_process(tmp_path: Path) -> None:
    r = _results()
    r.scale = _scale()
    doc = _write(r, tmp_path)
    scale = doc.split("## Operator scale")[1].split("\n## ")[0]
    assert "| floor: the same Deployments and Services, no operator" in scale
    assert "55.0 s" in scale
    assert "| apply-to-Ready during the burst, p50 / p99 / max | 30.00 / " in scale
    assert "citadel-operator 20.0, kube-apiserver 60.0; total 80.0 s" in scale
    assert "(1.00 of 2 cores)" in scale
    assert "### API requests" not in scale and "py-spy" not in scale


def test_document_shows_requests_per_model_and_the_operators_profile(
    tmp_path: Path,
) -> None:
    r = _results()
    r.scale = _scale()
    r.scale.requests = {"APPLY llmmodels/status": 2300.0, "GET services": 1000.0}
    r.scale.floor_requests = {"GET services": 10.0}
    r.scale.profile = ["  9.0% self,  9.0% incl  raw_decode (json/decoder.py:353)"]
    scale = _write(r, tmp_path).split("## Operator scale")[1].split("\n## ")[0]
    assert "| APPLY llmmodels/status | 2.30 | 0.00 |" in scale
    assert "| GET services | 1.00 | 0.01 |" in scale
    assert "| all requests | 3.30 | 0.01 |" in scale
    assert scale.index("APPLY llmmodels") < scale.index("GET services")
    assert "raw_decode (json/decoder.py:353)" in scale


def test_scale_shows_requests_and_cpu_at_rest(tmp_path: Path) -> None:
    r = _results()
    r.scale = _scale()
    scale = _write(r, tmp_path).split("## Operator scale")[1].split("\n## ")[0]
    assert "### At rest" not in scale
    r.scale.rest_s = 120.0
    r.scale.rest_requests = {"GET services": 1200.0, "PUT leases": 2400.0}
    r.scale.rest_cpu_by_process = {"kube-apiserver": 12.0, "citadel-operator": 6.0}
    scale = _write(r, tmp_path).split("## Operator scale")[1].split("\n## ")[0]
    rest = scale.split("### At rest")[1].split("###")[0]
    assert "| PUT leases | 20.00 |" in rest and "| GET services | 10.00 |" in rest
    assert rest.index("PUT leases") < rest.index("GET services")
    assert "| all | 30.0 |" in rest
    assert "citadel-operator 0.050, kube-apiserver 0.100" in rest


def test_scale_shows_the_api_servers_cpu_by_category(tmp_path: Path) -> None:
    r = _results()
    r.scale = _scale()
    r.scale.apiserver = ApiServerProfile(
        {"LLMModel status writes": 3.0, "creates (POST)": 1.0}
    )
    r.scale.floor_apiserver = ApiServerProfile(problem="no Go toolchain")
    scale = _write(r, tmp_path).split("## Operator scale")[1].split("\n## ")[0]
    assert "| LLMModel status writes | 3.0 s (75%) | \N{EN DASH} |" in scale
    assert "| creates (POST) | 1.0 s (25%) | \N{EN DASH} |" in scale
    assert "| all samples | 4.0 s | \N{EN DASH} |" in scale
    assert scale.index("LLMModel status writes") < scale.index("creates (POST)")


def _round(
    target: str,
    ttfts: list[float],
    hits: float,
    queries: float,
    later: list[float] | None = None,
) -> RoutingRun:
    return RoutingRun(
        target=target,
        requests=len(ttfts),
        errors=0,
        ttft=Summary.of(ttfts),
        wall_s=1.0,
        output_tokens=10 * len(ttfts),
        cache_hits=hits,
        ttfts_ms=ttfts,
        later_ttfts_ms=later or [],
        cache_queries=queries,
        round_means_ms=[sum(ttfts) / len(ttfts)],
    )


def test_rounds_pool_requests_and_keep_each_rounds_mean() -> None:
    merged = merge_rounds(
        [
            _round("citadel:prefix-aware", [10.0, 30.0], hits=1, queries=4),
            _round("citadel:prefix-aware", [50.0], hits=3, queries=4),
        ]
    )
    assert merged.requests == 3 and merged.wall_s == 2.0
    assert merged.ttft.mean == 30.0
    assert merged.round_means_ms == [20.0, 50.0]
    # Hit rates pool by the tokens they are over, not by round.
    assert merged.hit_rate == 0.5 and merged.cache_queries == 8


def test_a_win_within_the_rounds_spread_says_so() -> None:
    def run(target: str, means: list[float]) -> RoutingRun:
        return merge_rounds([_round(target, [m], 1, 1) for m in means])

    def verdict(ours: list[float], theirs: list[float]) -> Verdict:
        result = RoutingResult(
            MULTI_ROUND_QA,
            [
                run("citadel:prefix-aware", ours),
                run("plain:round-robin", [200.0, 210.0]),
                run("vllm-router:sticky_least_loaded", theirs),
            ],
        )
        return routing_verdicts(result)[1]

    close = verdict([80.0, 90.0], [84.0, 88.0])
    assert close.ok is True
    assert close.note == (
        "within the spread between rounds (round means 80.0-90.0 vs 84.0-88.0 ms)"
    )
    clear = verdict([60.0, 70.0], [84.0, 88.0])
    assert clear.ok is True and clear.note == ""


def test_later_turns_are_pooled_and_compared_in_the_verdict() -> None:
    ours = merge_rounds(
        [
            _round("citadel:prefix-aware", [700.0, 20.0], 1, 1, later=[20.0]),
            _round("citadel:prefix-aware", [600.0, 30.0], 1, 1, later=[30.0]),
        ]
    )
    assert ours.later_ttfts_ms == [20.0, 30.0] and ours.later_mean_ms == 25.0
    theirs = _round(
        "vllm-router:sticky_least_loaded", [500.0, 40.0], 1, 1, later=[40.0]
    )
    result = RoutingResult(
        MULTI_ROUND_QA, [ours, _round("plain:round-robin", [900.0], 1, 1), theirs]
    )
    half, below = routing_verdicts(result)
    assert half.ok is True and half.note == ""
    assert below.ok is False
    assert below.note == "after each conversation's first turn: 25.0 vs 40.0 ms"
    plain = _round("plain:round-robin", [500.0, 50.0], 1, 1, later=[50.0])
    result = RoutingResult(MULTI_ROUND_QA, [ours, plain, theirs])
    half = routing_verdicts(result)[0]
    assert half.ok is False
    assert half.note == (
        "2.45x the allowed ratio; after each conversation's first turn: "
        "25.0 vs 50.0 ms = 0.50x"
    )


def test_replica_ttft_is_pooled_and_shown_beside_the_clients() -> None:
    def at_replicas(target: str, sum_s: float, count: float) -> RoutingRun:
        run = _round(target, [100.0], 1, 1)
        run.replica_ttft_sum_s, run.replica_ttft_count = sum_s, count
        return run

    ours = merge_rounds(
        [
            at_replicas("citadel:prefix-aware", 0.5, 5),
            at_replicas("citadel:prefix-aware", 1.5, 5),
        ]
    )
    assert ours.replica_ttft_ms == 200.0
    theirs = at_replicas("vllm-router:sticky_least_loaded", 0.9, 10)
    result = RoutingResult(
        MULTI_ROUND_QA, [ours, _round("plain:round-robin", [900.0], 1, 1), theirs]
    )
    below = routing_verdicts(result)[1]
    assert below.note.endswith(
        "at the replicas (vllm:time_to_first_token_seconds): 200.0 vs 90.0 ms"
    )
    # A run without the histogram (no replica TTFT) adds no note.
    assert _round("x", [1.0], 1, 1).replica_ttft_ms == 0.0


def test_a_missed_half_of_round_robin_names_the_reference() -> None:
    ours = _round("citadel:prefix-aware", [36.0], 1, 1)
    plain = _round("plain:round-robin", [42.0], 1, 1)
    pinned = _round("plain:pinned-warm", [29.0], 1, 1)
    half = routing_verdicts(RoutingResult(SHORT_CHAT, [ours, plain, pinned]))[0]
    assert half.ok is False
    assert half.note == (
        "1.71x the allowed ratio; plain:pinned-warm (a reference: pinned, warm "
        "caches, no proxy) 29.0 ms = 0.69x, also above half"
    )
    below = _round("plain:pinned-warm", [20.0], 1, 1)
    within = routing_verdicts(RoutingResult(SHORT_CHAT, [ours, plain, below]))[0]
    assert within.ok is False and within.note.endswith("= 0.48x, within half")
    # Without the reference, the note stays as it was; a met target has none.
    assert routing_verdicts(RoutingResult(SHORT_CHAT, [ours, plain]))[0].note == (
        "1.71x the allowed ratio"
    )
    fast = _round("citadel:prefix-aware", [20.0], 1, 1)
    met = routing_verdicts(RoutingResult(SHORT_CHAT, [fast, plain, pinned]))[0]
    assert met.ok is True and met.note == ""
    # The reference is not a router: it never stands in for vllm-router's best.
    peer = routing_verdicts(RoutingResult(SHORT_CHAT, [ours, plain, pinned]))[1]
    assert peer.ok is None and peer.measured == DASH


def test_the_bare_relay_is_named_beside_the_best_peer_policy() -> None:
    ours = _round("citadel:prefix-aware", [82.0], 1, 1)
    plain = _round("plain:round-robin", [220.0], 1, 1)
    best = _round("vllm-router:sticky_least_loaded", [80.0], 1, 1)
    relay = _round("python:bare-relay", [80.4], 1, 1)
    below = routing_verdicts(RoutingResult(MULTI_ROUND_QA, [ours, plain, best, relay]))
    assert below[1].ok is False
    assert below[1].note == (
        "python:bare-relay (a reference: Citadel's HTTP stack, none of its request "
        "work) 80.4 ms"
    )
    # Without it, no note; it is never the peer compared against.
    alone = routing_verdicts(RoutingResult(MULTI_ROUND_QA, [ours, plain, best]))
    assert alone[1].note == ""


def _in_front(
    target: str, client_ms: float, replica_ms: float, cpu_s: float
) -> RoutingRun:
    run = _round(target, [client_ms], 1, 1)
    run.replica_ttft_sum_s, run.replica_ttft_count = replica_ms / 1000, 1
    run.proxy_cpu_s = cpu_s
    return run


def test_the_peer_verdict_splits_the_time_in_front_of_the_replicas() -> None:
    ours = merge_rounds(
        [
            _in_front("citadel:prefix-aware", 82.0, 74.0, 0.001),
            _in_front("citadel:prefix-aware", 82.0, 74.0, 0.002),
        ]
    )
    # CPU pools over the rounds' requests: 3 ms over 2 requests.
    assert ours.proxy_cpu_s == 0.003 and ours.proxy_cpu_ms == 1.5
    # Failed requests cost the proxy too: the CPU is per request sent.
    failing = _in_front("citadel:prefix-aware", 82.0, 74.0, 0.003)
    failing.errors = 2
    assert failing.proxy_cpu_ms == 1.0
    assert ours.front_ms == 8.0
    best = _in_front("vllm-router:sticky_least_loaded", 79.0, 74.0, 0.0008)
    relay = _in_front("python:bare-relay", 79.5, 74.0, 0.0005)
    plain = _round("plain:round-robin", [220.0], 1, 1)
    below = routing_verdicts(RoutingResult(MULTI_ROUND_QA, [ours, plain, best, relay]))
    assert below[1].note.endswith(
        "in front of the replicas (client minus replica TTFT): 8.0 vs 5.0, "
        "relay 5.5 ms; proxy CPU per request 1.50 vs 0.80, relay 0.50 ms"
    )
    without = routing_verdicts(RoutingResult(MULTI_ROUND_QA, [ours, plain, best]))
    assert without[1].note.endswith(
        "8.0 vs 5.0 ms; proxy CPU per request 1.50 vs 0.80 ms"
    )
    # Without the replicas' TTFT or the proxies' CPU there is nothing to split.
    bare = routing_verdicts(
        RoutingResult(
            MULTI_ROUND_QA, [_round("citadel:prefix-aware", [82.0], 1, 1), plain, best]
        )
    )
    assert "in front" not in bare[1].note


def test_document_shows_where_each_profiled_proxy_spends_its_cpu(
    tmp_path: Path,
) -> None:
    from citadel_bench.pyspy import OTHER, PROXY_CATEGORIES

    def profiled(target: str, cpu_s: float, samples: dict[str, int]) -> RoutingRun:
        run = _in_front(target, 80.0, 74.0, cpu_s)
        run.profile = dict.fromkeys([c.name for c in PROXY_CATEGORIES] + [OTHER], 0)
        run.profile.update(samples)
        return run

    r = _results()
    result = _result(MULTI_ROUND_QA, 80.0)
    result.profiled = [
        profiled("citadel:prefix-aware", 0.002, {"log lines": 1, "upstream client": 3}),
        profiled("python:bare-relay", 0.001, {"upstream client": 2, OTHER: 2}),
    ]
    r.routing = [result]
    doc = _write(r, tmp_path)
    qa = doc.split("### Multi-round QA")[1]
    assert "| kind of work | citadel:prefix-aware ms | python:bare-relay ms |" in qa
    # A kind's share of the samples, of the CPU per request (2 ms and 1 ms).
    assert "| log lines | 0.500 | 0.000 |" in qa
    assert "| upstream client | 1.500 | 0.500 |" in qa
    assert "| other | 0.000 | 0.500 |" in qa
    assert "| all (CPU ms per request) | 2.000 | 1.000 |" in qa
    assert "| samples | 4 | 4 |" in qa
    # The measured table gets the CPU column; targets without a proxy a dash.
    assert "| proxy CPU ms/req |" in qa
    # No profiled runs, no section.
    r.routing = [_result(MULTI_ROUND_QA, 80.0)]
    assert "kind of work" not in _write(r, tmp_path)


def _points(target: str, rps: list[float]) -> list[Point]:
    return [
        Point(target, "json", 64, n, 100, 0, r, 1.0, 2.0, 1.0, 0.5, 90.0)
        for n, r in enumerate(rps)
    ]


def test_an_rps_verdict_within_the_rounds_noise_says_so() -> None:
    points = [
        *_points("direct", [5000.0, 5100.0, 5200.0]),
        *_points("citadel", [2400.0, 2600.0, 2500.0]),
        *_points("vllm-router", [2450.0, 2550.0, 2480.0]),
        *_points("litellm", [900.0, 1000.0, 950.0]),
    ]
    verdicts = {
        v.target: v for v in overhead_verdicts(overhead_rows(points), skipped={})
    }
    close = verdicts[
        "RPS at least vllm-router's (design target) (json, concurrency 64)"
    ]
    assert close.ok
    assert close.note == (
        "per-round RPS ranges overlap (2,400-2,600 vs 2,450-2,550): within noise"
    )
    apart = verdicts["RPS at least LiteLLM's (design target) (json, concurrency 64)"]
    assert apart.ok and apart.note == ""


def test_routing_method_says_what_was_tuned_and_what_the_relay_compares(
    tmp_path: Path,
) -> None:
    r = _results()
    r.routing = [_result(SHORT_CHAT, 82.0)]
    method = " ".join(_write(r, tmp_path).split("## Routing quality")[1].split())
    # Which of prefix-aware's parameters were tuned on which workload, and that
    # the peer's were not.
    for commit in ("1f4ae66", "ededc39", "6f1b9ab"):
        assert commit in method
    assert "`cache_aware` included, run at their command-line defaults" in method
    # The relay compares stacks at the same placement only.
    assert "splits a gap" not in method
    assert "compares HTTP stacks only where the placement is the same" in method
    assert "client TTFT minus replica TTFT" in method


def _gateways_run(target: str, later_ms: float, moves: Moves) -> GatewaysRun:
    run = _run(target, 50.0)
    run.later_ttfts_ms = [later_ms]
    return GatewaysRun(run, moves)


def _gateways(workload: ChatWorkload) -> GatewaysResult:
    # Out of order: the table follows the targets' order.
    return GatewaysResult(
        workload,
        [
            _gateways_run(TWO.target, 45.0, Moves(86, 288)),
            _gateways_run(ONE.target, 18.0, Moves(0, 288)),
        ],
        skipped={TWO_REDIS.target: "did not run: redis-server is not installed"},
    )


def test_later_turns_are_compared_with_one_gateway() -> None:
    result = _gateways(MULTI_ROUND_QA)
    assert later_versus_one(result) == {TWO.target: 2.5, ONE.target: 1.0}
    result.runs = result.runs[:1]
    assert all(v != v for v in later_versus_one(result).values())  # NaN


def test_document_shows_each_workload_through_two_gateways(tmp_path: Path) -> None:
    r = _results()
    r.gateways = [_gateways(MULTI_ROUND_QA)]
    r.failures[gateways_part(SHORT_CHAT)] = "RuntimeError: no simulator"
    doc = _write(r, tmp_path)
    part = doc.split("## Routing through two gateway replicas")[1].split("\n## ")[0]
    qa = part.split("### Two gateways, multi-round QA")[1].split("###")[0]
    rows = [line for line in qa.splitlines() if line.startswith("| citadel:")]
    assert [row.split(" | ")[0] for row in rows] == [
        f"| {ONE.target}",
        f"| {TWO.target}",
    ]
    # Moves as counted and per 1,000 later turns, the later turns against one.
    assert "| 0 / 288 | 0 |" in rows[0] and "| 1.00 |" in rows[0]
    assert "| 86 / 288 | 299 |" in rows[1] and "| 2.50 |" in rows[1]
    assert f"- {TWO_REDIS.target}: did not run: redis-server" in qa
    assert "16 users, 160 requests a round (16 conversations of 10 turns)" in qa
    short = part.split("### Two gateways, short chat")[1]
    assert "Not run: RuntimeError: no simulator" in short
    # The part is a measurement: no target of its own.
    targets = doc.split("## Targets")[1].split("\n## ")[0]
    assert "gateway" not in targets
