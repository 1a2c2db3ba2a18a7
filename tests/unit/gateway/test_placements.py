"""Placements shared between gateway replicas: marks, learning, the message
format, the exchange and the router's part."""

from __future__ import annotations

import asyncio
import struct
from typing import Any

import pytest

from citadel.gateway.routes import RoutingDocument
from citadel.gateway.services import prefix
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.placements import (
    MAGIC,
    MAX_RECORDS,
    Placement,
    PlacementExchange,
    PlacementFormatError,
    channel_name,
    decode,
    encode,
)
from citadel.gateway.services.prefix import (
    MAX_BLOCKS,
    Mark,
    block_hashes,
    continues,
    prefix_text,
    prefix_window,
    prompt_mark,
    rendezvous,
)
from citadel.gateway.services.replicas import Endpoint, Replica
from citadel.gateway.services.routing import Router
from citadel.gateway.services.strategies import PrefixAware, RouteRequest
from citadel.gateway.settings import GatewaySettings
from citadel.gateway.wiring import build_deps

pytestmark = pytest.mark.unit


def mark_of(body: dict[str, Any]) -> Mark | None:
    """The mark `PrefixAware` takes of a request."""
    return prompt_mark(body, in_window=prefix_window(body)[1])


def chat(*contents: str) -> dict[str, Any]:
    return {"messages": [{"role": "user", "content": c} for c in contents]}


def pool(n: int) -> list[Replica]:
    return [Replica(f"http://10.0.0.{i}:8000") for i in range(n)]


# Marks: where a prompt ends, and what continues it.


def test_a_chat_s_next_turn_and_the_same_request_continue_it() -> None:
    mark = mark_of(chat("system", "question"))
    assert mark is not None
    assert continues(chat("system", "question"), mark)
    assert continues(chat("system", "question", "answer", "more"), mark)


def test_another_conversation_or_an_edited_turn_does_not_continue_a_chat() -> None:
    mark = mark_of(chat("system", "question"))
    assert mark is not None
    assert not continues(chat("system", "another question"), mark)
    assert not continues(chat("system", "question edited", "answer"), mark)
    assert not continues(chat("system"), mark)  # shorter
    assert not continues({"prompt": "system question"}, mark)


def turns(*messages: dict[str, Any]) -> dict[str, Any]:
    return {"messages": list(messages)}


def user(text: str, **extra: Any) -> dict[str, Any]:
    return {"role": "user", "content": text, **extra}


def assistant(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


SYSTEM = {"role": "system", "content": "you help. " * 1700}
"""A system prompt past the hashed window (17,000 characters)."""


@pytest.mark.parametrize(
    ("sent", "next_turn"),
    [
        # Retrieved context kept on the newest message only.
        (
            [SYSTEM, user("q1"), assistant("a1"), user("context\n\nq2")],
            [
                SYSTEM,
                user("q1"),
                assistant("a1"),
                user("q2"),
                assistant("a2"),
                user("context\n\nq3"),
            ],
        ),
        # A cache_control marker moved to the newest message.
        (
            [SYSTEM, user("q1"), assistant("a1"), user("q2", cache_control=1)],
            [
                SYSTEM,
                user("q1"),
                assistant("a1"),
                user("q2"),
                assistant("a2"),
                user("q3", cache_control=1),
            ],
        ),
        # The last message edited and sent again.
        (
            [SYSTEM, user("q1"), assistant("a1"), user("q2")],
            [SYSTEM, user("q1"), assistant("a1"), user("q2, rather")],
        ),
    ],
)
def test_a_turn_that_changes_the_last_message_continues_by_the_answer_before(
    sent: list[dict[str, Any]], next_turn: list[dict[str, Any]]
) -> None:
    """Clients change the last message when they send it again; the answer
    before it comes back as it was."""
    mark = mark_of(turns(*sent))
    assert mark is not None
    assert continues(turns(*next_turn), mark)


def test_only_the_assistant_s_message_before_the_last_counts() -> None:
    """Before a first question is a system prompt other conversations share."""
    mark = mark_of(turns(SYSTEM, user("mine")))
    assert mark is not None
    assert not continues(turns(SYSTEM, user("yours"), assistant("a"), user("q")), mark)
    mark = mark_of(turns(SYSTEM, user("example"), user("mine")))
    assert mark is not None
    assert not continues(turns(SYSTEM, user("example"), user("yours")), mark)


def test_the_same_answer_in_another_conversation_does_not_continue_it() -> None:
    """Two conversations may get the same answer at the same turn (a greeting,
    a template's); the question before it tells them apart."""
    mark = mark_of(turns(SYSTEM, user("mine"), assistant("Sure."), user("q")))
    assert mark is not None
    other = turns(SYSTEM, user("yours"), assistant("Sure."), user("q2"))
    assert not continues(other, mark)


def test_a_pair_within_the_hashed_window_is_no_sign_of_a_conversation() -> None:
    """A few-shot prompt's example question and answer (or an agent's
    preamble) fill the window every request shares: taken as the pair before
    the last message, they made every conversation continue every other."""
    short = {"role": "system", "content": "you help"}
    example = [user("an example question " * 900), assistant("its answer")]
    mark = mark_of(turns(short, *example, user("mine")))
    assert mark is not None and mark[2] == 0
    assert not continues(turns(short, *example, user("yours")), mark)
    # Past the window, the pair counts.
    mark = mark_of(turns(short, *example, user("mine"), assistant("a"), user("q")))
    assert mark is not None and mark[2] != 0


def test_the_window_s_messages_are_counted_in_bytes() -> None:
    """The window is 16,384 bytes: 6,000 CJK characters (18,000 bytes) fill
    it, and the messages after them are past it."""
    cjk = {"role": "system", "content": "漢" * 6000}
    body = turns(cjk, *[user(f"q{i}") for i in range(17)])
    assert prefix_window(body)[1] == 1


def test_a_pair_two_conversations_share_past_the_window_stops_counting() -> None:
    """Tools filling the window put a few-shot example past it: its pair is
    every conversation's. Seen before two different questions, it no longer
    makes one conversation continue another."""
    schemas = [
        {
            "type": "function",
            "function": {"name": f"tool_{i}", "description": "Does one thing. " * 25},
        }
        for i in range(40)
    ]
    example = [user("an example question"), assistant("its answer")]

    def request(*messages: dict[str, Any]) -> RouteRequest:
        return RouteRequest({"messages": list(messages), "tools": schemas})

    replicas, strategy = pool(2), PrefixAware()
    short = {"role": "system", "content": "you help"}
    for replica in replicas:  # both hold the window
        strategy.choose([replica], request(short, *example, user("warm-up")))
    assert strategy.choose([replicas[0]], request(short, *example, user("alice")))
    # Bob's first request looks like Alice's next (once), and shows the pair
    # shared; Carol's, after it, goes to the least loaded.
    strategy.choose([replicas[0]], request(short, *example, user("bob")))
    replicas[0].in_flight = 1
    chosen, how = strategy.choose(replicas, request(short, *example, user("carol")))
    assert (chosen, how) == (replicas[1], "cache")


def test_a_long_message_is_hashed_by_its_length_and_ends(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Its whole JSON cost 2.9 ms for 7 MiB, on every request of the window."""
    written: list[int] = []
    dumps = prefix.orjson.dumps

    def spy(value: Any, option: int = 0) -> bytes:
        data = dumps(value, option=option)
        written.append(len(data))
        return data

    monkeypatch.setattr(prefix.orjson, "dumps", spy)
    long = "x" * 1_000_000
    mark = mark_of(turns(user(long)))
    assert mark is not None and max(written) < 9000
    assert continues(turns(user(long), assistant("a"), user("q")), mark)
    assert not continues(turns(user(long + "y")), mark)
    assert not continues(turns(user("y" + long[1:])), mark)


def test_a_message_s_media_and_fields_count_in_its_mark() -> None:
    def image(url: str) -> dict[str, Any]:
        part = {"type": "image_url", "image_url": {"url": url}}
        return {"messages": [{"role": "user", "content": [part]}]}

    mark = mark_of(image("https://a/1.png"))
    assert mark is not None
    assert continues(image("https://a/1.png"), mark)
    assert not continues(image("https://a/2.png"), mark)
    # Keys in another order are the same message.
    reordered = {"messages": [{"content": "x", "role": "user"}]}
    mark = mark_of({"messages": [{"role": "user", "content": "x"}]})
    assert mark is not None and continues(reordered, mark)


def test_a_prompt_string_is_continued_by_a_longer_one_that_starts_with_it() -> None:
    prompt = "context " * 100
    mark = mark_of({"prompt": prompt})
    assert mark is not None and mark[0] == len(prompt)
    assert continues({"prompt": prompt}, mark)
    assert continues({"prompt": prompt + " and more"}, mark)
    assert not continues({"prompt": prompt[:-1] + "X and more"}, mark)
    assert not continues({"prompt": prompt[:-1]}, mark)
    short = mark_of({"prompt": "hi"})
    assert short is not None and continues({"prompt": "hi there"}, short)


def test_what_cannot_be_marked_has_no_mark_and_nothing_continues_it() -> None:
    assert mark_of({"messages": []}) is None
    assert mark_of({"prompt": [1, 2, 3]}) is None
    assert mark_of({"input": "embed me"}) is None
    assert not continues(chat("x"), (0, 0, 0))
    assert not continues({"input": "x"}, (1, 0, 0))


# The strategy: what it tells, and what it learns.


def test_a_choice_tells_the_blocks_new_to_the_replica_and_the_deepest() -> None:
    told: list[tuple[str, list[int], Mark | None]] = []
    strategy = PrefixAware(on_placed=lambda *p: told.append(p))
    replicas = pool(2)
    body = chat("system prompt " * 40, "question " * 40)
    hashes = block_hashes(prefix_text(body))
    chosen, _ = strategy.choose(replicas, RouteRequest(body))
    assert told == [(chosen.url, hashes, None)]
    chosen, _ = strategy.choose(replicas, RouteRequest(body))  # all known there
    assert told[-1] == (chosen.url, [hashes[-1]], None)
    longer = chat("system prompt " * 40, "question " * 40, "answer " * 60)
    more = block_hashes(prefix_text(longer))
    chosen, _ = strategy.choose(replicas, RouteRequest(longer))
    assert more[: len(hashes)] == hashes
    assert told[-1] == (chosen.url, more[len(hashes) :], None)


def test_a_choice_of_a_whole_window_tells_where_the_prompt_ends() -> None:
    told: list[tuple[str, list[int], Mark | None]] = []
    strategy = PrefixAware(on_placed=lambda *p: told.append(p))
    body = chat("a long document " * 1200, "question")
    assert len(block_hashes(prefix_text(body))) == MAX_BLOCKS
    strategy.choose(pool(2), RouteRequest(body))
    assert told[-1][2] == mark_of(body)


def test_a_gateway_that_learned_a_placement_sends_the_next_turn_there() -> None:
    """The second gateway never saw the conversation: without the placement
    it sends the next turn where its own loads say."""
    told: list[tuple[str, list[int], Mark | None]] = []
    first = PrefixAware(on_placed=lambda *p: told.append(p))
    second = PrefixAware()
    replicas = pool(4)
    system = "shared system prompt " * 30
    for user in range(8):  # both know the system prompt everywhere
        for strategy in (first, second):
            strategy.choose(replicas, RouteRequest(chat(system, f"user {user}")))
    history = [system, "my own long context " * 200]
    home, _ = first.choose(replicas, RouteRequest(chat(*history)))
    for replica in replicas:
        replica.in_flight = 0 if replica is not home else 1
    turn = RouteRequest(chat(*history, "answer", "next question"))
    assert second.choose(replicas, turn)[0] is not home  # no placement shared
    fresh = PrefixAware()
    for user in range(8):
        fresh.choose(replicas, RouteRequest(chat(system, f"user {user}")))
    url, blocks, window = told[-1]
    assert fresh.learn(url, blocks, window, replicas)
    assert fresh.choose(replicas, turn) == (home, "cache")


def test_a_learned_window_keeps_a_conversation_on_its_last_replica() -> None:
    """Two replicas hold a long conversation; the gateway that did not route its
    last turn learns where that went and where its prompt ended, and keeps the
    next turn there although another holder is idler."""
    told: list[tuple[str, list[int], Mark | None]] = []
    first = PrefixAware(on_placed=lambda *p: told.append(p))
    second = PrefixAware()
    replicas = pool(2)
    history = ["a long question " * 600, "a long answer " * 600]
    for strategy in (first, second):
        for replica in replicas:  # both replicas hold the window
            strategy.choose([replica], RouteRequest(chat(*history)))
    history.append("ok")
    # This gateway sent the turn to replicas[0] (a retry went on elsewhere)...
    second.choose([replicas[0]], RouteRequest(chat(*history)))
    # ... and the other gateway sent it again to replicas[1], which served it.
    first.choose([replicas[1]], RouteRequest(chat(*history)))
    url, blocks, window = told[-1]
    assert window is not None and url == replicas[1].url
    assert second.learn(url, blocks, window, replicas)
    replicas[0].in_flight, replicas[1].in_flight = 0, 1
    history += ["answer", "next"]
    assert second.choose(replicas, RouteRequest(chat(*history)))[0] is replicas[1]


def test_every_block_learned_counts_not_only_the_deepest() -> None:
    """A request that shares the placement's prompt only partly (another
    branch of the conversation) goes where that part was sent."""
    told: list[tuple[str, list[int], Mark | None]] = []
    first = PrefixAware(on_placed=lambda *p: told.append(p))
    second, replicas = PrefixAware(), pool(4)
    history = ["my own long context " * 200]
    request = chat(*history, "a question " * 60)
    # Not where its first block hashes to, where a gateway that knows nothing
    # of it would send it too.
    hashed = rendezvous(
        block_hashes(prefix_text(request))[0], [r.url for r in replicas]
    )
    home = next(r for r in replicas if r.url != hashed)
    assert first.choose([home], RouteRequest(request))[0] is home
    assert second.learn(*told[-1], replicas)
    branch = RouteRequest(chat(*history, "another question " * 30))
    assert second.choose(replicas, branch) == (home, "cache")


def test_placements_learned_are_not_this_gateway_s_choices() -> None:
    """The cold bound reads this gateway's own recent choices: another's would
    make a replica it never sends to look served."""
    strategy, replicas = PrefixAware(), pool(2)
    for i in range(10):
        assert strategy.learn(replicas[0].url, [i], None, replicas)
    assert strategy._recent_counts == {}


def test_a_placement_on_a_replica_not_known_here_is_not_learned() -> None:
    strategy, replicas = PrefixAware(), pool(2)
    assert not strategy.learn("http://10.9.9.9:8000", [1, 2], None, replicas)
    assert not strategy.learn(replicas[0].url, [], None, replicas)
    assert strategy._bits == {}
    assert strategy.learn(replicas[0].url, [1, 2], None, replicas)


# The router: which model's strategy learns.


def _document(strategy: str = "prefix-aware") -> RoutingDocument:
    return RoutingDocument.model_validate(
        {
            "models": [
                {
                    "name": "m",
                    "namespace": "llm",
                    "servedName": "m",
                    "service": "m",
                    "strategy": strategy,
                    "aliases": ["alias"],
                }
            ]
        }
    )


def _router(
    strategy: str = "prefix-aware",
) -> tuple[Router, list[Placement], RoutingDocument]:
    catalog = Catalog()
    document = _document(strategy)
    catalog.set_document(document)
    catalog.set_endpoints("llm", "m", [Endpoint("http://a"), Endpoint("http://b")])
    shared: list[Placement] = []
    return Router(catalog, lambda: 0.0, on_placed=shared.append), shared, document


def test_the_router_shares_each_prefix_aware_choice_with_the_model_s_name() -> None:
    router, shared, document = _router()
    body = chat("hello " * 100)
    replica = router.choose(document.models[0], RouteRequest(body))
    assert shared == [
        Placement("m", replica.url, tuple(block_hashes(prefix_text(body))))
    ]


def test_the_router_learns_for_prefix_aware_models_it_routes_only() -> None:
    router, _, document = _router()
    body = chat("hello " * 100)
    blocks = tuple(block_hashes(prefix_text(body)))
    assert not router.learn(Placement("other", "http://a", blocks))
    assert not router.learn(Placement("alias", "http://a", blocks))
    assert not router.learn(Placement("m", "http://gone", blocks))
    assert router.learn(Placement("m", "http://b", blocks))
    for _ in range(4):
        chosen = router.choose(document.models[0], RouteRequest(body))
        assert chosen.url == "http://b"
    other, _, _ = _router("round-robin")
    assert not other.learn(Placement("m", "http://b", blocks))


# The message format.


def test_placements_go_through_a_message_unchanged() -> None:
    placements = [
        Placement("m", "http://10.0.0.1:8000", (1, 2**64 - 1)),
        Placement("modèle", "http://[fd00::1]:8000", (7,), (12, 2**63, 5)),
    ]
    assert decode(encode(b"12345678", placements)) == (b"12345678", placements)
    assert decode(encode(b"12345678", [])) == (b"12345678", [])


@pytest.mark.parametrize(
    ("message", "why"),
    [
        (b"", "malformed"),
        (b"XXXX" + bytes(10), "not a placements message"),
        (encode(b"s" * 8, [Placement("m", "u", (1,))])[:-1], "malformed"),
        (encode(b"s" * 8, [Placement("m", "u", (1,))]) + b"x", "past its end"),
        (
            struct.pack("<4s8sH", MAGIC, b"s" * 8, 1)
            + struct.pack("<BBHH", 0, 1, 1, 1)
            + b"\xff"
            + b"u"
            + bytes(8),
            "malformed",
        ),
        (
            struct.pack("<4s8sH", MAGIC, b"s" * 8, 1)
            + struct.pack("<BBHH", 0, 0, 1, 1)
            + b"mu",
            "no block",
        ),
        (encode(b"s" * 8, [Placement("m", "u", (1,), (1, 2, 3))])[:-3], "malformed"),
    ],
)
def test_a_message_not_encode_s_is_refused(message: bytes, why: str) -> None:
    with pytest.raises(PlacementFormatError, match=why):
        decode(message)


def test_a_message_is_kept_within_the_format_s_bounds() -> None:
    with pytest.raises(ValueError, match="at most"):
        encode(b"s" * 8, [Placement("m", "u", (1,))] * (MAX_RECORDS + 1))
    with pytest.raises(ValueError, match="too large"):
        encode(b"s" * 8, [Placement("m", "u", tuple(range(256)))])


def test_each_namespace_s_gateways_have_a_channel_of_their_own() -> None:
    assert channel_name("a") != channel_name("b")


# The exchange.


class Counts:
    def __init__(self) -> None:
        self.seen: dict[str, int] = {}

    def published(self, count: int) -> None:
        self.seen["published"] = self.seen.get("published", 0) + count

    def learned(self, count: int) -> None:
        self.seen["learned"] = self.seen.get("learned", 0) + count

    def dropped(self, reason: str, count: int) -> None:
        self.seen[reason] = self.seen.get(reason, 0) + count


class FakeRedis:
    """What the exchange uses of a client: publish (and it may fail)."""

    def __init__(self, fail: bool = False) -> None:
        self.sent: list[tuple[str, bytes]] = []
        self.fail = fail

    async def publish(self, channel: str, message: bytes) -> int:
        if self.fail:
            from redis.exceptions import ConnectionError

            raise ConnectionError("down")
        self.sent.append((channel, message))
        return 1


def _exchange(
    client: FakeRedis, learned: list[Placement], counts: Counts, **options: Any
) -> PlacementExchange:
    def learn(placement: Placement) -> bool:
        learned.append(placement)
        return placement.model == "m"

    return PlacementExchange(
        client,  # type: ignore[arg-type]
        "channel",
        learn,
        counts,
        sender=b"me" * 4,
        **options,
    )


async def test_placements_offered_together_go_out_in_one_message() -> None:
    client, counts = FakeRedis(), Counts()
    exchange = _exchange(client, [], counts, flush_s=0.001)
    placements = [Placement("m", "u", (i,)) for i in range(3)]
    for placement in placements:
        exchange.offer(placement)
    task = asyncio.create_task(exchange._publish())
    await _until(lambda: client.sent)
    task.cancel()
    assert client.sent == [("channel", encode(b"me" * 4, placements))]
    assert counts.seen == {"published": 3}


async def test_a_failed_publish_is_counted_and_ends_the_run() -> None:
    client, counts = FakeRedis(fail=True), Counts()
    exchange = _exchange(client, [], counts, flush_s=0.001)
    exchange.offer(Placement("m", "u", (1,)))
    from redis.exceptions import ConnectionError

    with pytest.raises(ConnectionError):
        await asyncio.wait_for(exchange._publish(), 1)
    assert counts.seen == {"redis": 1}


async def test_the_outbox_drops_its_oldest_past_its_bound() -> None:
    client, counts = FakeRedis(), Counts()
    exchange = _exchange(client, [], counts, max_pending=2, flush_s=0.001)
    for i in range(5):
        exchange.offer(Placement("m", "u", (i,)))
    assert counts.seen == {"outbox": 3}
    task = asyncio.create_task(exchange._publish())
    await _until(lambda: client.sent)
    task.cancel()
    [(_, message)] = client.sent
    assert [p.blocks for p in decode(message)[1]] == [(3,), (4,)]


async def test_other_gateways_placements_are_learned_and_its_own_skipped() -> None:
    learned: list[Placement] = []
    counts = Counts()
    exchange = _exchange(FakeRedis(), learned, counts)
    placements = [Placement("m", "u", (1,)), Placement("gone", "u", (2,))]
    await exchange.receive(encode(b"me" * 4, placements))
    assert learned == [] and counts.seen == {}
    await exchange.receive(encode(b"other!!!", placements))
    assert learned == placements
    assert counts.seen == {"learned": 1, "unknown": 1}
    await exchange.receive(b"not a message")
    assert counts.seen["malformed"] == 1


# Wiring: shared when Redis is there, unless turned off.


def _settings(tmp_path: Any, **extra: Any) -> GatewaySettings:
    return GatewaySettings(
        routes_source="file",
        routes_file=tmp_path / "routes.json",
        auth="disabled",
        **extra,
    )


def test_gateways_with_redis_share_placements_on_their_namespace_s_channel(
    tmp_path: Any,
) -> None:
    deps = build_deps(
        _settings(tmp_path, redis_url="redis://127.0.0.1:1/0", namespace="ns"), {}
    )
    exchanges = [s for s in deps.sources if isinstance(s, PlacementExchange)]
    assert len(exchanges) == 1
    exchange = exchanges[0]
    assert exchange._channel == channel_name("ns")
    # One client for the limits and the placements, closed at shutdown.
    client = exchange._client
    assert deps.proxy._limiter._store._client is client
    assert client.aclose in deps.shutdown
    # The router tells the exchange, and the exchange the router.
    router = deps.proxy._router
    assert router._on_placed == exchange.offer
    assert exchange.learn == router.learn


@pytest.mark.parametrize(
    "extra",
    [{}, {"redis_url": "redis://127.0.0.1:1/0", "share_placements": False}],
)
def test_placements_stay_in_process_without_redis_or_when_turned_off(
    tmp_path: Any, extra: dict[str, Any]
) -> None:
    deps = build_deps(_settings(tmp_path, **extra), {})
    assert not any(isinstance(s, PlacementExchange) for s in deps.sources)
    assert deps.proxy._router._on_placed is None


def test_a_channel_set_is_used_as_it_is(tmp_path: Any) -> None:
    settings = _settings(
        tmp_path, redis_url="redis://127.0.0.1:1/0", placements_channel="mine"
    )
    deps = build_deps(settings, {})
    exchange = next(s for s in deps.sources if isinstance(s, PlacementExchange))
    assert exchange._channel == "mine"


class FakePubSub:
    def __init__(self, owner: FakeChannel) -> None:
        self.owner = owner

    async def __aenter__(self) -> FakePubSub:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def subscribe(self, channel: str) -> None:
        self.owner.check()
        self.owner.subscriptions += 1

    async def get_message(
        self, ignore_subscribe_messages: bool, timeout: float
    ) -> dict[str, Any] | None:
        self.owner.check()
        if self.owner.inbox:  # buffered: returned without waiting, as redis-py
            return {"type": "message", "data": self.owner.inbox.pop(0)}
        await asyncio.sleep(0.001)
        return None


class FakeChannel(FakeRedis):
    """A client whose Redis can go down: subscribing, reading and publishing
    fail while it is."""

    def __init__(self) -> None:
        super().__init__()
        self.subscriptions = 0
        self.inbox: list[bytes] = []
        self.publish_denied = False

    async def publish(self, channel: str, message: bytes) -> int:
        if self.publish_denied:
            from redis.exceptions import NoPermissionError

            raise NoPermissionError("no permissions to run the 'publish' command")
        return await super().publish(channel, message)

    def check(self) -> None:
        if self.fail:
            from redis.exceptions import ConnectionError

            raise ConnectionError("down")

    def pubsub(self) -> FakePubSub:
        return FakePubSub(self)


async def _until(check: Any) -> None:
    for _ in range(400):
        if check():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("not reached")


async def test_an_outage_drops_what_waits_warns_once_and_shares_again_after(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    from citadel.gateway.services import placements

    caplog.set_level("INFO", logger=placements.__name__)
    monkeypatch.setattr(placements, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(placements, "LISTEN_S", 0.01)
    client, counts = FakeChannel(), Counts()
    exchange = _exchange(client, [], counts, flush_s=0.001)  # type: ignore[arg-type]
    task = asyncio.create_task(exchange.run())
    await _until(lambda: client.subscriptions == 1)
    exchange.offer(Placement("m", "u", (1,)))
    await _until(lambda: counts.seen.get("published") == 1)
    client.fail = True
    for i in range(3):
        exchange.offer(Placement("m", "u", (i,)))
    await _until(lambda: counts.seen.get("redis") == 3)
    await asyncio.sleep(0.1)  # failing again and again
    client.fail = False
    await _until(lambda: client.subscriptions == 2)
    exchange.offer(Placement("m", "u", (9,)))
    await _until(lambda: counts.seen.get("published") == 2)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    messages = [r.getMessage() for r in caplog.records]
    assert messages.count("placements not shared: Redis failed; subscribing again") == 1
    assert messages.count("sharing placements again") == 1


async def test_malformed_messages_are_logged_at_most_once_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    counts = Counts()
    exchange = PlacementExchange(
        FakeRedis(),  # type: ignore[arg-type]
        "channel",
        counts=counts,
        clock=lambda: now[0],
    )
    for _ in range(3):
        await exchange.receive(b"junk")
    now[0] = 61.0
    await exchange.receive(b"junk")
    warnings = [r for r in caplog.records if r.getMessage().startswith("placements")]
    assert [getattr(r, "messages", None) for r in warnings] == [1, 3]
    assert counts.seen == {"malformed": 4}


async def test_a_long_message_is_learned_a_slice_at_a_time() -> None:
    """Other work runs between slices: 1,024 records of 64 blocks took 100 ms."""
    from citadel.gateway.services.placements import LEARN_SLICE

    order: list[str] = []

    def learn(placement: Placement) -> bool:
        order.append("learn")
        return True

    exchange = PlacementExchange(FakeRedis(), "c", learn)  # type: ignore[arg-type]

    async def other() -> None:
        order.append("other")

    message = encode(b"other!!!", [Placement("m", "u", (i,)) for i in range(100)])
    receiving = asyncio.create_task(exchange.receive(message))
    meanwhile = asyncio.create_task(other())
    await asyncio.gather(receiving, meanwhile)
    assert order.index("other") == LEARN_SLICE


async def test_a_publish_refused_after_each_subscription_is_one_outage(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Subscribing works, publishing does not (an ACL, a read-only replica of
    Redis): the pauses still grow, one warning, and no line says it shares."""
    from citadel.gateway.services import placements

    caplog.set_level("INFO", logger=placements.__name__)
    monkeypatch.setattr(placements, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(placements, "RETRY_MAX_S", 0.08)
    monkeypatch.setattr(placements, "LISTEN_S", 0.01)
    client, counts = FakeChannel(), Counts()
    client.publish_denied = True
    exchange = _exchange(client, [], counts, flush_s=0.001)  # type: ignore[arg-type]
    task = asyncio.create_task(exchange.run())
    for i in range(6):
        await _until(lambda i=i: client.subscriptions > i)
        exchange.offer(Placement("m", "u", (i,)))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert exchange._failures >= 5
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["placements not shared: Redis failed; subscribing again"]


async def test_the_first_sharing_is_not_called_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Redis down when the gateway starts: once it shares, it says so, not
    that it shares again."""
    from citadel.gateway.services import placements

    caplog.set_level("INFO", logger=placements.__name__)
    monkeypatch.setattr(placements, "RETRY_BASE_S", 0.01)
    client = FakeChannel()
    client.fail = True
    counts = Counts()
    exchange = _exchange(client, [], counts, flush_s=0.001)  # type: ignore[arg-type]
    task = asyncio.create_task(exchange.run())
    await asyncio.sleep(0.05)
    client.fail = False
    exchange.offer(Placement("m", "u", (1,)))
    await _until(lambda: counts.seen.get("published") == 1)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    messages = [r.getMessage() for r in caplog.records]
    assert messages[-1] == "sharing placements"
    assert "sharing placements again" not in messages


async def test_a_backlog_of_messages_lets_other_work_run_between_them(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """redis-py returns buffered messages without waiting: 20,000 small ones
    held the event loop 350 ms."""
    from citadel.gateway.services import placements

    monkeypatch.setattr(placements, "LISTEN_S", 0.01)
    order: list[str] = []

    def learn(placement: Placement) -> bool:
        order.append("learn")
        return True

    client = FakeChannel()
    client.inbox = [encode(b"other!!!", [Placement("m", "u", (i,))]) for i in range(5)]
    exchange = PlacementExchange(client, "c", learn)  # type: ignore[arg-type]

    async def ticking() -> None:
        while True:
            order.append("tick")
            await asyncio.sleep(0)

    ticker = asyncio.create_task(ticking())
    task = asyncio.create_task(exchange.run())
    await _until(lambda: not client.inbox)
    for running in (task, ticker):
        running.cancel()
    await asyncio.gather(task, ticker, return_exceptions=True)
    learned = [i for i, what in enumerate(order) if what == "learn"]
    assert len(learned) == 5
    assert "tick" in order[learned[0] : learned[-1]]


async def test_a_new_outage_after_a_lasting_subscription_warns_again(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A gateway that routes nothing shares nothing: its subscription having
    lasted says the last outage ended."""
    from citadel.gateway.services import placements

    now = [0.0]
    monkeypatch.setattr(placements, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(placements, "LISTEN_S", 0.01)
    client = FakeChannel()
    client.fail = True
    exchange = PlacementExchange(
        client,  # type: ignore[arg-type]
        "c",
        clock=lambda: now[0],
    )
    task = asyncio.create_task(exchange.run())
    await asyncio.sleep(0.05)  # failing, pauses growing
    client.fail = False
    await _until(lambda: client.subscriptions == 1)
    now[0] += placements.STABLE_S
    client.fail = True
    await asyncio.sleep(0.05)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 2


async def test_learning_while_publishing_fails_is_no_recovery(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Subscribing works and peers publish, but this gateway may not: what it
    learns does not reset its pauses."""
    from citadel.gateway.services import placements

    monkeypatch.setattr(placements, "RETRY_BASE_S", 0.01)
    monkeypatch.setattr(placements, "RETRY_MAX_S", 0.08)
    monkeypatch.setattr(placements, "LISTEN_S", 0.01)
    client = FakeChannel()
    client.publish_denied = True
    exchange = _exchange(client, [], Counts(), flush_s=0.001)  # type: ignore[arg-type]
    task = asyncio.create_task(exchange.run())
    for i in range(6):
        await _until(lambda i=i: client.subscriptions > i)
        client.inbox.append(encode(b"other!!!", [Placement("m", "u", (i,))]))
        await _until(lambda: not client.inbox)
        exchange.offer(Placement("m", "u", (i,)))
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert exchange._failures >= 5
