"""The two-gateway part's pure pieces: the choice of gateway, the placements read
from the gateways' logs, the moves counted from them, and the turns' ids."""

from collections.abc import AsyncIterator
from pathlib import Path

import orjson
import pytest
from aiohttp import web
from aiohttp.test_utils import TestServer
from citadel_bench import peers
from citadel_bench.gateways import (
    ONE,
    SHARE_ENV,
    TWO,
    TWO_REDIS,
    TWO_REDIS_UNSHARED,
    Moves,
    Placement,
    count_moves,
    gateway_picker,
    placements,
)
from citadel_bench.routing import drive, turn_request_id
from citadel_bench.workload import ChatWorkload

pytestmark = pytest.mark.unit


def _line(request_id: str, session: str | None, replica: str | None) -> str:
    entry = {
        "ts": "2026-12-07T04:32:12.476889+00:00",
        "level": "info",
        "logger": "citadel.gateway.access",
        "msg": "request",
        "request_id": request_id,
        "session": session,
        "replica": replica,
        "status": 200,
    }
    return orjson.dumps(entry).decode()


def test_placements_are_the_request_lines_of_a_conversations_turns() -> None:
    lines = [
        '{"ts":"x","msg":"Application startup complete."}',
        "Traceback (most recent call last):",
        "{not json",
        _line(turn_request_id("user1-conv0", 0), "user1-conv0", "http://a"),
        # A request id of the gateway's own, or another session's: not a turn.
        _line("8f2c0a", "user1-conv0", "http://b"),
        _line(turn_request_id("user2-conv0", 1), "user1-conv0", "http://b"),
        # Refused before any replica was chosen.
        _line(turn_request_id("user1-conv0", 1), "user1-conv0", None),
        _line(turn_request_id("user1-conv1", 12), "user1-conv1", "http://c"),
    ]
    assert placements(lines) == [
        Placement("user1-conv0", 0, "http://a"),
        Placement("user1-conv1", 12, "http://c"),
    ]


def test_moves_count_each_turn_placed_apart_from_the_turn_before() -> None:
    # Two gateways' logs, concatenated: not in turn order.
    placed = [
        Placement("s1", 2, "b"),
        Placement("s1", 0, "a"),
        Placement("s2", 0, "a"),
        Placement("s1", 1, "a"),
        Placement("s2", 1, "a"),
        Placement("s1", 3, "a"),
        # Its turn before is not placed (it failed): not a later turn counted.
        Placement("s3", 4, "c"),
    ]
    # s1: a a b a -> 2 moves in 3; s2: a a -> 0 in 1.
    assert count_moves(placed) == Moves(moved=2, followed=4)
    assert count_moves(placed).per_1000 == 500.0
    assert Moves(1, 4) + Moves(2, 6) == Moves(3, 10)


def test_moves_refuse_a_turn_placed_twice() -> None:
    with pytest.raises(ValueError, match="turn 1 of s1 placed twice"):
        count_moves([Placement("s1", 1, "a"), Placement("s1", 1, "b")])
    assert count_moves([]).followed == 0
    assert count_moves([]).per_1000 != count_moves([]).per_1000  # NaN


def test_the_picker_gives_each_user_the_same_gateways_whatever_the_interleaving() -> (
    None
):
    urls = ["http://gw1", "http://gw2"]
    first, second = gateway_picker(urls, 2), gateway_picker(urls, 2)
    one_by_one = {u: [first(u) for _ in range(40)] for u in range(3)}
    interleaved: dict[int, list[str]] = {u: [] for u in range(3)}
    for _ in range(40):
        for u in (2, 0, 1):
            interleaved[u].append(second(u))
    assert one_by_one == interleaved
    # Each request on its own: both gateways, and users apart from each other.
    assert set(one_by_one[0]) == set(urls)
    assert one_by_one[0] != one_by_one[1]
    # Another seed, another sequence.
    other = gateway_picker(urls, 3)
    assert [other(0) for _ in range(40)] != one_by_one[0]


def test_the_picker_needs_a_gateway_and_one_is_always_it() -> None:
    with pytest.raises(ValueError, match="no gateway"):
        gateway_picker([], 2)
    only = gateway_picker(["http://gw1"], 2)
    assert {only(u) for u in range(5)} == {"http://gw1"}


def test_the_targets_set_redis_and_the_sharing_as_named() -> None:
    url = "redis://127.0.0.1:1/0"
    assert ONE.env(None) == TWO.env(None) == {}
    # The default target leaves the setting unset: the gateway's default.
    assert TWO_REDIS.env(url) == {"CITADEL_GATEWAY_REDIS_URL": url}
    assert TWO_REDIS_UNSHARED.env(url) == {
        "CITADEL_GATEWAY_REDIS_URL": url,
        SHARE_ENV: "false",
    }
    with pytest.raises(ValueError, match="needs a Redis URL"):
        TWO_REDIS.env(None)
    env = peers.citadel_env(8000, Path("r"), Path("k"), {SHARE_ENV: "1"})
    assert env[SHARE_ENV] == "1" and env["CITADEL_GATEWAY_PORT"] == "8000"


SEEN: web.AppKey[list[tuple[str, str, str]]] = web.AppKey("seen", list)


async def _chat(request: web.Request) -> web.StreamResponse:
    request.app[SEEN].append(
        (
            request.host,
            request.headers["x-session-id"],
            request.headers.get("x-request-id", ""),
        )
    )
    response = web.StreamResponse(headers={"content-type": "text/event-stream"})
    await response.prepare(request)
    chunk = {"choices": [{"delta": {"content": "ok"}}]}
    await response.write(b"data: " + orjson.dumps(chunk) + b"\n\ndata: [DONE]\n\n")
    return response


@pytest.fixture
async def gateways() -> AsyncIterator[tuple[list[str], list[tuple[str, str, str]]]]:
    app = web.Application()
    app[SEEN] = []
    app.router.add_post("/v1/chat/completions", _chat)
    servers = [TestServer(app) for _ in range(2)]
    for server in servers:
        await server.start_server()
    yield [str(s.make_url("")).rstrip("/") for s in servers], app[SEEN]
    for server in servers:
        await server.close()


async def test_each_turn_carries_its_id_to_the_gateway_picked_for_it(
    gateways: tuple[list[str], list[tuple[str, str, str]]],
) -> None:
    urls, seen = gateways
    workload = ChatWorkload(
        users=2, conversations_per_user=1, turns=6, system_chars=40, user_chars=8
    )
    samples, _ = await drive(workload, gateway_picker(urls, 2), 30.0, request_ids=True)
    assert all(s.ok for _, s in samples) and len(samples) == 12
    replay = gateway_picker(urls, 2)
    for user in range(2):
        session = f"user{user}-conv0"
        mine = [(host, rid) for host, s, rid in seen if s == session]
        # In turn order, each to the gateway the picker gives for it.
        assert [rid for _, rid in mine] == [f"{session}.{t}" for t in range(6)]
        hosts = [replay(user).removeprefix("http://") for _ in range(6)]
        assert [host for host, _ in mine] == hosts
    # Without request ids the gateway makes its own.
    seen.clear()
    await drive(workload, gateway_picker(urls, 2), 30.0)
    assert {rid for _, _, rid in seen} == {""}
