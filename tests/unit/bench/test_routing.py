"""The routing benchmark's reference placement: warming the replicas' caches, and
counting only what came after."""

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from aiohttp.typedefs import Handler
from citadel_bench import loadgen, peers
from citadel_bench.relay import BareRelay, StickyLeastLoaded
from citadel_bench.routing import (
    BARE_RELAY,
    PINNED_WARM,
    PLAIN_RR,
    ReplicaCounters,
    drive,
    plain_picker,
    replica_counters,
    targets,
    warm_up,
)
from citadel_bench.stats import Summary
from citadel_bench.workload import ChatWorkload, conversation
from simulator.params import SimParams
from simulator.server import make_app

from citadel.gateway.upstream import UpstreamClient, UpstreamSettings

pytestmark = pytest.mark.unit

BLOCK = 4
WORKLOAD = ChatWorkload(
    users=2, system_prompts=2, system_chars=400, user_chars=40, max_tokens=4
)


@pytest.fixture
async def replicas() -> AsyncIterator[list[str]]:
    params = SimParams(decode_base_s=0.001, decode_per_seq_s=0.0, block_size=BLOCK)
    servers = [TestServer(make_app(params, peers.MODEL)) for _ in range(2)]
    for server in servers:
        await server.start_server()
    yield [str(server.make_url("")).rstrip("/") for server in servers]
    for server in servers:
        await server.close()


async def test_warming_caches_every_system_prompt_on_every_replica_uncounted(
    replicas: list[str],
) -> None:
    await warm_up(WORKLOAD, replicas)
    # The counters are read by blocking HTTP: off the loop the servers run on.
    before = await asyncio.to_thread(replica_counters, replicas)
    assert before.cache_queries > 0
    async with loadgen.session(1) as client:
        for user in range(WORKLOAD.users):
            for url in replicas:
                body = conversation(WORKLOAD, user, 0).next_request(
                    WORKLOAD, peers.MODEL
                )
                async with client.post(
                    url + "/v1/chat/completions", json={**body, "stream": False}
                ) as response:
                    usage = (await response.json())["usage"]
                # The whole system prompt was there before the first turn, on
                # whichever replica the conversation starts.
                cached = usage["prompt_tokens_details"]["cached_tokens"]
                assert cached >= WORKLOAD.system_chars // 4 - BLOCK
    after = await asyncio.to_thread(replica_counters, replicas)
    # Only the requests after the warm-up are in the difference.
    counted = after.since(before)
    assert counted.ttft_count == WORKLOAD.users * len(replicas)
    assert 0 < counted.cache_hits < counted.cache_queries


def test_counters_since_subtract_every_series() -> None:
    later = ReplicaCounters(10.0, 6.0, 2.5, 5.0)
    assert later.since(ReplicaCounters(4.0, 1.0, 0.5, 1.0)) == ReplicaCounters(
        6.0, 5.0, 2.0, 4.0
    )


def test_the_reference_runs_with_or_without_the_peer() -> None:
    for reference in (PINNED_WARM, BARE_RELAY):
        assert reference in targets(False) and reference in targets(True)
    assert targets(False)[0] == "citadel:prefix-aware"


def test_pinned_keeps_each_user_on_one_replica_and_round_robin_rotates() -> None:
    backends = ["a", "b", "c"]
    pinned = plain_picker(PINNED_WARM, backends)
    assert [pinned(user) for user in (0, 1, 2, 3, 4, 0, 3)] == list("abcabaa")
    rotation = plain_picker(PLAIN_RR, backends)
    # Whoever asks: the next replica in turn.
    assert [rotation(user) for user in (0, 0, 0, 5, 1)] == list("abcab")
    with pytest.raises(ValueError, match="plain:random"):
        plain_picker("plain:random", backends)


def test_the_bare_relay_keeps_each_session_where_it_first_went() -> None:
    placement = StickyLeastLoaded(["a", "b", "c"])
    # Equal loads: new sessions are spread in turn.
    assert [placement.choose(s) for s in (b"s1", b"s2", b"s3", b"s4")] == list("abca")
    # Otherwise a new session goes to the replica with the fewest in flight...
    placement.in_flight.update(a=2, b=0, c=1)
    assert placement.choose(b"s5") == "b"
    # ...and every session stays where it first went, whatever the load.
    assert [placement.choose(s) for s in (b"s1", b"s3", b"s5")] == list("acb")
    # A request without a session is placed each time, never kept.
    assert placement.choose(b"") == "b"
    placement.in_flight.update(b=9)
    assert placement.choose(b"") == "c"


async def test_the_bare_relay_streams_the_replicas_answer_as_it_came(
    replicas: list[str],
) -> None:
    upstream = UpstreamClient(UpstreamSettings())
    placement = StickyLeastLoaded(replicas)
    relay = BareRelay(placement, upstream)
    body = conversation(WORKLOAD, 0, 0).next_request(WORKLOAD, peers.MODEL)
    request = orjson.dumps({**body, "stream": True})
    pending = [{"type": "http.request", "body": request, "more_body": False}]
    sent: list[dict[str, object]] = []

    async def receive() -> dict[str, object]:
        return pending.pop(0)

    async def send(message: dict[str, object]) -> None:
        sent.append(message)

    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "headers": [(b"x-session-id", b"u0")],
    }
    await relay(scope, receive, send)  # type: ignore[arg-type]
    await upstream.close()
    start, *chunks = sent
    assert start["status"] == 200
    assert start["headers"] == [(b"content-type", b"text/event-stream")]
    stream = b"".join(m["body"] for m in chunks)  # type: ignore[misc]
    # Relayed untouched: no usage chunk asked for, and the end as vLLM sends it.
    assert b'"usage"' not in stream and stream.endswith(b"data: [DONE]\n\n")
    assert chunks[-1] == {"type": "http.response.body", "body": b"", "more_body": False}
    assert placement.in_flight == dict.fromkeys(replicas, 0)


async def test_every_turn_carries_the_targets_headers_and_its_session(
    replicas: list[str],
) -> None:
    seen: list[tuple[str | None, str | None]] = []

    @web.middleware
    async def record(request: web.Request, handler: Handler) -> web.StreamResponse:
        if request.path == "/v1/chat/completions":
            seen.append(
                (
                    request.headers.get("authorization"),
                    request.headers.get("x-session-id"),
                )
            )
        return await handler(request)

    app = make_app(SimParams(decode_base_s=0.001, decode_per_seq_s=0.0), peers.MODEL)
    app.middlewares.append(record)
    server = TestServer(app)
    await server.start_server()
    try:
        url = str(server.make_url("")).rstrip("/")
        workload = replace(WORKLOAD, turns=2)
        samples, _ = await drive(
            workload, lambda _: url, 30.0, {"authorization": "Bearer ctd-k"}
        )
    finally:
        await server.close()
    assert len(samples) == workload.requests and all(s.ok for _, s in samples)
    assert sorted(seen) == [
        ("Bearer ctd-k", f"user{u}-conv{c}")
        for u in range(workload.users)
        for c in range(workload.conversations_per_user)
        for _ in range(workload.turns)
    ]


def test_a_profile_that_fails_keeps_the_measured_rounds(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The profiled runs come after the rounds; one that raised anything but a
    RuntimeError (py-spy not executable: PermissionError) lost the workload's
    measured results."""
    from citadel_bench import routing

    def run_target(
        target: str,
        workload: ChatWorkload,
        log_dir: Path,
        deadline_s: float,
        py_spy: Path | None = None,
    ) -> routing.RoutingRun:
        if py_spy is not None:
            raise PermissionError(13, "Permission denied")
        return routing.RoutingRun(
            target=target,
            requests=1,
            errors=0,
            ttft=Summary.of([10.0]),
            wall_s=1.0,
            output_tokens=4,
            cache_hits=0.0,
            cache_queries=1.0,
        )

    monkeypatch.setattr(routing, "run_target", run_target)
    monkeypatch.setattr(routing.peers, "peer_problem", lambda name: "absent")
    result = routing.run_routing(WORKLOAD, tmp_path, 1.0, 1, tmp_path / "py-spy")
    assert [run.target for run in result.runs] == targets(False)
    assert result.profiled == []
