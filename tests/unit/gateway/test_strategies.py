"""Routing strategies and the router."""

from __future__ import annotations

import os
import subprocess
import sys
from collections import Counter
from typing import Any

import orjson
import pytest
import xxhash

from citadel.gateway.routes import RoutingStrategy
from citadel.gateway.services.prefix import (
    BLOCK_CHARS,
    MAX_BLOCKS,
    BlockTable,
    block_hashes,
    prefix_text,
    prompt_text,
    rendezvous,
)
from citadel.gateway.services.replicas import LoadReport, Replica
from citadel.gateway.services.scraper import parse_vllm_metrics
from citadel.gateway.services.strategies import (
    KvAware,
    LeastLoad,
    PrefixAware,
    RoundRobin,
    RouteRequest,
    SessionAffinity,
    make_strategy,
)

pytestmark = pytest.mark.unit


def pool(n: int = 3) -> list[Replica]:
    return [Replica(f"http://10.0.0.{i}:8000") for i in range(n)]


def chat(*contents: str) -> RouteRequest:
    messages = [{"role": "user", "content": c} for c in contents]
    return RouteRequest({"messages": messages})


def test_round_robin_visits_each_in_turn() -> None:
    replicas, rr = pool(), RoundRobin()
    picks = [rr.choose(replicas, chat("x"))[0] for _ in range(6)]
    assert Counter(r.url for r in picks) == {r.url: 2 for r in replicas}


def test_least_load_prefers_fewest_in_flight_and_shares_ties() -> None:
    replicas, strategy = pool(), LeastLoad()
    replicas[0].in_flight, replicas[1].in_flight = 4, 1
    assert strategy.choose(replicas, chat("x"))[0] is replicas[2]
    replicas[2].in_flight = 1
    picks = {strategy.choose(replicas, chat("x"))[0].url for _ in range(4)}
    assert picks == {replicas[1].url, replicas[2].url}


def test_prefix_aware_keeps_a_growing_conversation_on_one_replica() -> None:
    replicas, strategy = pool(4), PrefixAware()
    system = "You are a helpful assistant. " * 20
    first, how = strategy.choose(replicas, chat(system, "question one"))
    assert how == "hash"
    turn2, how2 = strategy.choose(
        replicas, chat(system, "question one", "answer " * 60, "question two")
    )
    assert turn2 is first and how2 == "cache"


def test_prefix_aware_spreads_distinct_prefixes() -> None:
    replicas, strategy = pool(4), PrefixAware()
    picks = {
        strategy.choose(replicas, chat(f"user {i} " + "x" * 300))[0].url
        for i in range(40)
    }
    assert len(picks) == 4


def test_prefix_aware_overflows_to_least_loaded_when_bound_is_passed() -> None:
    replicas, strategy = pool(4), PrefixAware()
    request = chat("shared system prompt " * 30)  # 2 blocks: a lead of 1 will do
    home, _ = strategy.choose(replicas, request)
    home.in_flight = 3  # average 0.75: bound 1.25 * 0.75 + 1 < 3
    other, how = strategy.choose(replicas, request)
    assert other is not home and how == "overflow"


def test_a_long_known_prefix_stays_until_its_replica_leads_by_more() -> None:
    replicas, strategy = pool(4), PrefixAware()
    # Every replica had its share of late: none is left out (the cold bound).
    for user in range(64):
        strategy.choose(replicas, chat(f"another conversation {user} " * 20))
    history = ["context of this conversation " * 600]  # over 64 blocks
    home, _ = strategy.choose(replicas, chat(*history))
    request = chat(*history, "and then?")
    # Little load everywhere: 3 against 1 passes the relative bound (2.875) but
    # not the lead that 64 held blocks are worth (8 blocks per request).
    for replica in replicas:
        replica.in_flight = 1
    home.in_flight = 3
    same, how = strategy.choose(replicas, request)
    assert (same, how) == (home, "cache")
    home.in_flight = 8  # a lead of 7
    same, how = strategy.choose(replicas, request)
    assert (same, how) == (home, "cache")
    home.in_flight = 9  # a lead of 8
    other, how = strategy.choose(replicas, request)
    assert other is not home and how == "overflow"


def test_a_new_prefix_overflows_at_the_relative_bound_alone() -> None:
    replicas, strategy = pool(4), PrefixAware()
    prompt = "a prompt nobody sent before " * 30
    urls = [r.url for r in replicas]
    home = replicas[urls.index(rendezvous(block_hashes(prompt)[0], urls))]
    home.in_flight = 3  # average 0.75: bound 1.25 * 0.75 + 1 < 3
    # Nothing is cached for it anywhere, so nothing is lost by moving it.
    chosen, how = strategy.choose(replicas, RouteRequest({"prompt": prompt}))
    assert chosen is not home and how == "overflow"


def test_prefix_aware_balances_new_conversations_sharing_only_a_system_prompt() -> None:
    replicas, strategy = pool(4), PrefixAware()
    system = "shared system prompt " * 50  # ~4 blocks
    picks = []
    for user in range(8):
        document = f"user {user} document " * 200  # ~15 blocks of its own
        replica, how = strategy.choose(replicas, chat(system, document))
        replica.in_flight += 1
        picks.append((replica.url, how))
    # Each replica takes two: the system prompt alone does not decide.
    assert Counter(url for url, _ in picks) == {r.url: 2 for r in replicas}
    assert {how for _, how in picks[1:]} == {"balance"}
    # The next turn of each conversation stays where its document is.
    for user in range(8):
        document = f"user {user} document " * 200
        turn2, how = strategy.choose(replicas, chat(system, document, "and then?"))
        assert (turn2.url, how) == (picks[user][0], "cache")


def test_a_prefix_sent_to_several_replicas_goes_to_the_least_loaded() -> None:
    replicas, strategy = pool(4), PrefixAware()
    system = "shared system prompt " * 50
    # Two conversations on the same system prompt went to two replicas (the
    # second overflowed), so both hold the prompt.
    a, _ = strategy.choose(replicas, chat(system, "first"))
    a.in_flight = 5
    b, how = strategy.choose(replicas, chat(system, "second"))
    assert b is not a and how == "overflow"
    # A third conversation on that prompt: both hold it, the idle one takes it.
    a.in_flight, b.in_flight = 2, 0
    c, how = strategy.choose(replicas, chat(system, "third"))
    assert (c, how) == (b, "cache")
    b.in_flight = 3
    d, how = strategy.choose(replicas, chat(system, "fourth"))
    assert (d, how) == (a, "cache")
    # A conversation's own history is on one replica only: it stays there, even
    # when another replica holding the system prompt is idler.
    a.in_flight = b.in_flight = 0
    history = [system, "fifth", "answer " * 100]
    home, _ = strategy.choose(replicas, chat(*history))
    home.in_flight = 1
    again, how = strategy.choose(replicas, chat(*history, "and then?"))
    assert (again, how) == (home, "cache")


def agent_turn(user: int, *more: str) -> RouteRequest:
    """An agent's request whose tool schemas (20 KB) fill the whole hashed
    window: every user's is the same prefix as far as it is hashed; `more`
    are the messages of its later turns."""
    schemas = [tool(f"tool_{i}", "Does one thing. " * 25) for i in range(40)]
    messages = [{"role": "user", "content": c} for c in (f"user {user} asks", *more)]
    return RouteRequest({"messages": messages, "tools": schemas})


def _holding_the_window(strategy: PrefixAware, replicas: list[Replica]) -> None:
    """Sends an agent's request to each replica, so that all hold its window."""
    for replica in replicas:
        assert strategy.choose([replica], agent_turn(-1))[0] is replica


@pytest.mark.parametrize(
    ("old", "load", "new_load"), [(3, 8, 0), (4, 8, 0), (8, 8, 0), (4, 1000, 1)]
)
def test_a_new_replica_takes_a_window_the_others_all_hold(
    old: int, load: int, new_load: int
) -> None:
    """Every request is a whole match for the replicas holding the window, so
    only an overflow brings it to a new one. The bound was 1.25 x the average
    + 1, and a new replica at 0 among n at L leaves the average at
    n / (n + 1) x L: from four replicas on, the new one never got a request
    (with three, not below 17 each), and scaling up added nothing."""
    replicas, strategy = pool(old), PrefixAware()
    assert len(block_hashes(prefix_text(agent_turn(0).body))) == MAX_BLOCKS
    _holding_the_window(strategy, replicas)
    for replica in replicas:
        replica.in_flight = load
    new = Replica("http://10.0.1.1:8000", in_flight=new_load)
    replicas.append(new)
    # A whole window held is worth a lead of 8 to the hot bound, which a
    # closed loop of 16 users on 2 holders never reached (7 at most): the new
    # replica, left out, takes it at less (a soak with real processes).
    for replica in replicas[:-1]:
        replica.in_flight = new_load + 7
    chosen, how = strategy.choose(replicas, agent_turn(0))
    assert (chosen, how) == (new, "overflow")
    chosen.in_flight += 1
    for replica in replicas[:-1]:
        replica.in_flight = load
    chosen, how = strategy.choose(replicas, agent_turn(1))
    assert (chosen, how) == (new, "cache" if new_load + 1 < load else "overflow")
    # Now it holds the window too: the least loaded of its holders takes the
    # next requests, until the loads are even.
    for user in range(2, 1 + load - new_load):
        chosen.in_flight += 1
        chosen, how = strategy.choose(replicas, agent_turn(user))
        assert how == "cache"
    assert new.in_flight == load


def test_a_rolling_update_s_every_new_pod_takes_a_shared_window() -> None:
    """With maxSurge 1, each new pod joins 7 busy ones holding the window, one
    at a time; the last one stayed idle for good."""
    replicas, strategy = pool(8), PrefixAware()
    _holding_the_window(strategy, replicas)
    for replica in replicas:
        replica.in_flight = 10
    for i in range(8):
        pod = Replica(f"http://10.0.1.{i}:8000")
        replicas = [*replicas[1:], pod]  # the surge pod is ready, an old one goes
        for user in range(10):
            chosen, _ = strategy.choose(replicas, agent_turn(user))
            chosen.in_flight += 1
        assert pod.in_flight == 10, i


def test_even_or_busy_loads_keep_each_request_where_its_prefix_is() -> None:
    replicas, strategy = pool(4), PrefixAware()
    conversations = [[f"conversation {c} " * 400] for c in range(8)]  # 64 blocks
    homes = [replicas[c % 4] for c in range(8)]
    for history, home in zip(conversations, homes, strict=True):
        _sent_to(strategy, replicas, home, chat(*history))
    _holding_the_window(strategy, replicas)
    for load in (0, 1, 20, 1000):
        for replica in replicas:
            replica.in_flight = load
        for history, home in zip(conversations, homes, strict=True):
            again = strategy.choose(replicas, chat(*history, "and then?"))
            assert again == (home, "cache")
        assert strategy.choose(replicas, agent_turn(load))[1] == "cache"
    # All busy, a small imbalance next to the load: even a request worth a
    # lead of one stays, as the average kept it before.
    system = "shared system prompt " * 50  # ~4 blocks
    home, _ = strategy.choose(replicas, chat(system, "first"))
    for replica in replicas:
        replica.in_flight = 40 if replica is home else 33
    assert strategy.choose(replicas, chat(system, "second")) == (home, "cache")


@pytest.mark.parametrize(
    "loads", [(2, 2, 2, 0), (4, 4, 4, 1), (5, 5, 5, 2), (12, 12, 12, 7)]
)
def test_a_dip_of_a_replica_holding_the_prompt_moves_nothing(
    loads: tuple[int, ...],
) -> None:
    """The cold bound is for a replica left out of late (a new pod). At small
    loads it is a request or two below the average: a replica that holds the
    prompt's first block (a shared system prompt) and dipped a moment took
    conversations off their replicas, each to prefill its history again (5x
    the moves of a steady chat load over four replicas, for no balance)."""
    replicas, strategy = pool(4), PrefixAware()
    system = "shared system prompt " * 30  # 3 blocks
    for replica in replicas:
        assert strategy.choose([replica], chat(system, "hello"))[0] is replica
    home, dipped = replicas[0], replicas[-1]
    history = [system, "a question " * 60, "an answer " * 120]  # ~10 blocks
    _sent_to(strategy, replicas, home, chat(*history))
    request = chat(*history, "and then?")
    first = block_hashes(prefix_text(request.body))[0]
    assert strategy._owners.owners(first) & strategy._bits[dipped.url]
    for replica, load in zip(replicas, loads, strict=True):
        replica.in_flight = load
    assert strategy.choose(replicas, request) == (home, "cache")
    # The same loads, the least-loaded replica a new one, never chosen: it
    # takes the request, as a new pod among busy ones must.
    new = Replica("http://10.0.1.1:8000", in_flight=loads[-1])
    assert strategy.choose([*replicas[:-1], new], request) == (new, "overflow")


MINE = "my system prompt " * 40


def _other_prompt_on_last() -> tuple[list[Replica], PrefixAware]:
    """Four replicas: the first three hold MINE, the last another system
    prompt only."""
    replicas, strategy = pool(4), PrefixAware()
    for replica in replicas[:-1]:
        assert strategy.choose([replica], chat(MINE, "hello"))[0] is replica
    theirs = "their system prompt " * 40
    assert strategy.choose([replicas[-1]], chat(theirs, "hello"))[0] is replicas[-1]
    return replicas, strategy


@pytest.mark.parametrize("loads", [(2, 2, 2, 0), (5, 5, 5, 2), (12, 12, 12, 7)])
def test_a_conversation_stays_though_a_replica_holds_none_of_it(
    loads: tuple[int, ...],
) -> None:
    """A replica holding other system prompts than this conversation's is no
    new pod: moving a conversation to it at each dip prefilled its history
    again (short chat, four system prompts: mean TTFT 34.0 -> 37.2 ms with
    "holds none of this prompt" alone as the test). A growing conversation's
    prompt is never known whole (its new turn is new), which keeps it."""
    replicas, strategy = _other_prompt_on_last()
    home, other, mine = replicas[0], replicas[-1], MINE
    history = [mine, "a question " * 60, "an answer " * 120]
    _sent_to(strategy, replicas, home, chat(*history))
    request = chat(*history, "and then? " * 40)
    hashes = block_hashes(prefix_text(request.body))
    assert not strategy._owners.owners(hashes[0]) & strategy._bits[other.url]
    for replica, load in zip(replicas, loads, strict=True):
        replica.in_flight = load
    assert strategy.choose(replicas, request) == (home, "cache")


def test_a_new_pod_first_sent_another_prompt_takes_a_shared_window() -> None:
    """A new pod whose first request was something else (a warm-up, another
    tool set) holds none of the window every other request shares: with
    "never sent anything" as the test it was never cold again and stayed
    idle while the others ran 100 each."""
    replicas, strategy = pool(4), PrefixAware()
    _holding_the_window(strategy, replicas)
    for user in range(PrefixAware.RECENT):  # the old replicas' share of late
        strategy.choose(replicas, agent_turn(1000 + user))[0].in_flight += 1
    new = Replica("http://10.0.1.1:8000")
    assert strategy.choose([new], chat("warm-up", "hello"))[0] is new
    for replica in replicas:
        replica.in_flight = 100
    replicas.append(new)
    chosen, how = strategy.choose(replicas, agent_turn(0))
    assert (chosen, how) == (new, "overflow")
    for user in range(1, 100):
        chosen.in_flight += 1
        chosen, how = strategy.choose(replicas, agent_turn(user))
        assert how == "cache"
    assert new.in_flight == 99 and chosen is new


def test_a_new_pod_takes_its_share_of_a_shared_system_prompt() -> None:
    """Each request a shared system prompt and a question of its own: the
    prompt is never known whole, and the replicas holding the system prompt
    are a match for every request. With "known whole" as the cold test the
    new pod stayed at 0 while the others ran 20 each."""
    replicas, strategy = pool(4), PrefixAware()
    system = "a long shared system prompt " * 300  # 32 blocks
    for user, replica in enumerate(replicas):
        request = chat(system, f"user {user} asks " * 20)
        assert strategy.choose([replica], request)[0] is replica
        replica.in_flight = 20
    new = Replica("http://10.0.1.1:8000")
    replicas.append(new)
    for user in range(4, 4 + 19):
        chosen, _ = strategy.choose(replicas, chat(system, f"user {user} asks " * 20))
        chosen.in_flight += 1
    assert new.in_flight >= 15


@pytest.mark.parametrize("follow_up", ["ok", "and then? " * 40])
def test_a_long_conversation_stays_at_a_dip(follow_up: str) -> None:
    """Past 64 blocks (16 KiB) a conversation's hashed prompt stops growing,
    so it is known whole at every turn, as is a short follow-up that fills
    no new block: with "known whole" as the cold test, a dip moved it to a
    replica holding another system prompt, to prefill 16 KiB again."""
    replicas, strategy = _other_prompt_on_last()
    home = replicas[0]
    history = [MINE, "a long question " * 600, "a long answer " * 600]
    _sent_to(strategy, replicas, home, chat(*history))
    request = chat(*history, follow_up)
    assert len(block_hashes(prefix_text(request.body))) == MAX_BLOCKS
    for replica, load in zip(replicas, (12, 12, 12, 3), strict=True):
        replica.in_flight = load
    assert strategy.choose(replicas, request) == (home, "cache")


def test_a_new_pod_takes_requests_of_prefixes_one_replica_each_holds() -> None:
    """Tenants with tool schemas of their own, each on one replica: a test
    by what two replicas hold never found the new pod cold (0 of 400 where
    the others ran 120)."""
    replicas, strategy = pool(4), PrefixAware()
    tools = [f"tenant {t} tool schema " * 400 for t in range(8)]  # ~35 blocks
    for t, text in enumerate(tools):
        home = replicas[t % 4]
        assert strategy.choose([home], chat(text, "hello"))[0] is home
    for user in range(PrefixAware.RECENT):
        strategy.choose(replicas, chat(tools[user % 8], f"user {user} " * 3))
    for replica in replicas:
        replica.in_flight = 100
    new = Replica("http://10.0.1.1:8000")
    replicas.append(new)
    for user in range(200):
        chosen, _ = strategy.choose(replicas, chat(tools[user % 8], f"u{user} " * 3))
        chosen.in_flight += 1
    assert new.in_flight >= 60


def test_a_conversation_moved_once_does_not_follow_dips() -> None:
    """A long conversation (its 64 hashed blocks frozen) moved once, by a
    retry or a hot spot, is held by two replicas: a test by what two
    replicas hold took it for a shared prefix and sent it to every replica
    that dipped, each to prefill 16 KiB again."""
    replicas, strategy = pool(4), PrefixAware()
    system = "shared system prompt " * 40
    for user in range(PrefixAware.RECENT):  # every replica's share of late
        strategy.choose(replicas, chat(f"user {user} " * 100))
    assert min(strategy._recent_counts.values()) > PrefixAware.RECENT / 8
    first, second = replicas[0], replicas[1]
    history = [system, "a long question " * 600, "a long answer " * 600]
    _sent_to(strategy, replicas, first, chat(*history))
    _sent_to(strategy, replicas, second, chat(*history, "ok"))
    for turn, dipped in enumerate([replicas[2], replicas[3]] * 3):
        for replica in replicas:
            replica.in_flight = 3 if replica is dipped else 12
        chosen, how = strategy.choose(replicas, chat(*history, f"turn {turn}"))
        assert chosen in (first, second), (turn, how)


def test_a_conversation_past_the_window_stays_with_the_replica_it_went_to() -> None:
    """Moved once (a retry, a bound), a conversation longer than the window is
    held whole by two replicas: the least loaded of them, taken at each turn,
    sent it back and forth as their loads crossed, each time to prefill again
    the turns the other had served."""
    replicas, strategy = pool(4), PrefixAware()
    history = ["a long question " * 600, "a long answer " * 600]
    assert len(block_hashes(prefix_text(chat(*history).body))) == MAX_BLOCKS
    first, second = replicas[0], replicas[1]
    _sent_to(strategy, replicas, first, chat(*history))
    # A retry: the first failed, the second is the one left to try.
    history.append("ok")
    assert strategy.choose([second], chat(*history))[0] is second
    for turn in range(6):
        # The loads cross at every turn, by less than the lead.
        first.in_flight, second.in_flight = (0, 2) if turn % 2 else (2, 0)
        replicas[2].in_flight = replicas[3].in_flight = 2
        history += [f"answer {turn}", f"turn {turn}"]
        chosen, how = strategy.choose(replicas, chat(*history))
        assert (chosen, how) == (second, "cache"), turn
    # Leading the other holder by HOLDER_LEAD, it gives the conversation up.
    first.in_flight, second.in_flight = 0, PrefixAware.HOLDER_LEAD
    history += ["an answer", "and now?"]
    chosen, how = strategy.choose(replicas, chat(*history))
    assert (chosen, how) == (first, "cache")
    second.in_flight = 0
    history += ["another answer", "and then?"]
    chosen, _ = strategy.choose(replicas, chat(*history))
    assert chosen is first
    # The same request again (a client's retry) continues it too.
    first.in_flight = 1
    assert strategy.choose(replicas, chat(*history))[0] is first


def test_a_conversation_a_new_pod_took_stays_there_as_loads_cross() -> None:
    """The cold bound moves a long conversation to a new pod; the window is
    remembered where it went after the bound, not where the prefix sent it."""
    replicas, strategy = pool(4), PrefixAware()
    for user in range(PrefixAware.RECENT):  # every replica's share of late
        strategy.choose(replicas, chat(f"user {user} " * 100))
    history = ["a long question " * 600, "a long answer " * 600]
    home = replicas[0]
    _sent_to(strategy, replicas, home, chat(*history))
    new = Replica("http://10.0.1.1:8000")
    replicas.append(new)
    for replica in replicas[:-1]:
        replica.in_flight = 8
    history.append("ok")
    chosen, how = strategy.choose(replicas, chat(*history))
    assert (chosen, how) == (new, "overflow")
    for turn in range(6):
        for replica in replicas:
            replica.in_flight = 3
        (new if turn % 2 else home).in_flight = 2
        history += [f"answer {turn}", f"turn {turn}"]
        chosen, how = strategy.choose(replicas, chat(*history))
        assert (chosen, how) == (new, "cache"), turn


def test_holders_of_a_window_every_request_shares_stay_within_the_lead() -> None:
    """Where every request shares the whole window, the gateway cannot tell
    conversations apart: its requests spread over every holder."""
    replicas, strategy = pool(4), PrefixAware()
    _holding_the_window(strategy, replicas)
    for user in range(40):
        chosen, how = strategy.choose(replicas, agent_turn(user))
        assert how == "cache"
        chosen.in_flight += 1
        loads = [r.in_flight for r in replicas]
        assert max(loads) - min(loads) <= 1, (user, loads)
    assert [r.in_flight for r in replicas] == [10, 10, 10, 10]


def test_a_window_conversations_share_goes_to_its_least_loaded_holder() -> None:
    """Another conversation's request does not continue the window's last one:
    it goes to the least loaded holder, as a user's own request just done
    leaves its replica the least loaded (keeping the last replica sent turns
    elsewhere); a turn that continues the last request stays with it."""
    replicas, strategy = pool(4), PrefixAware()
    _holding_the_window(strategy, replicas)
    last = replicas[-1]
    last.in_flight = 1
    chosen, how = strategy.choose(replicas, agent_turn(0))
    assert chosen is not last and how == "cache"
    # The same user's next turn continues it: it stays, within the lead.
    for replica in replicas:
        replica.in_flight = 0 if replica is last else 2
    chosen.in_flight = 2
    follow_up = agent_turn(0, "the tool's answer", "and then?")
    assert strategy.choose(replicas, follow_up)[0] is chosen


def test_a_turn_continues_only_what_ended_the_last_request() -> None:
    """A conversation's turn after another conversation's request on the
    window goes to the least loaded holder: the gateway keeps where the
    window's last request ended, not every conversation's."""
    replicas, strategy = pool(2), PrefixAware()
    history = ["a long shared document " * 800]
    _sent_to(strategy, replicas, replicas[0], chat(*history, "mine"))
    _sent_to(strategy, replicas, replicas[1], chat(*history, "yours"))
    replicas[0].in_flight, replicas[1].in_flight = 1, 0
    # "yours" ended the window's last request; "mine" is continued.
    chosen, _ = strategy.choose(replicas, chat(*history, "mine", "answer", "more"))
    assert chosen is replicas[1]
    replicas[0].in_flight, replicas[1].in_flight = 0, 1
    chosen, _ = strategy.choose(replicas, chat(*history, "mine", "answer", "more"))
    assert chosen is replicas[1]  # continued now: it stays


def test_a_window_one_replica_holds_is_not_remembered() -> None:
    """A one-off long prompt (a document, a batch) leaves its place to the
    windows there is a choice for."""
    replicas, strategy = pool(2), PrefixAware()
    document = chat("a long document " * 1200)
    held = {strategy.choose(replicas, document)[0] for _ in range(3)}
    assert len(held) == 1 and not strategy._windows
    other = replicas[1] if replicas[0] in held else replicas[0]
    strategy.choose([other], document)  # a retry: now two hold it
    assert list(strategy._windows) == [block_hashes(prefix_text(document.body))[-1]]


def test_the_windows_remembered_are_bounded_least_recent_first() -> None:
    strategy = PrefixAware()
    strategy.WINDOWS = 4
    replicas = pool(2)
    windows = [chat(f"conversation {i} " * 1200) for i in range(6)]
    for request in windows:
        strategy.choose([replicas[0]], request)
        strategy.choose([replicas[1]], request)
    last = [block_hashes(prefix_text(r.body))[-1] for r in windows]
    assert list(strategy._windows) == last[2:]
    strategy.choose(replicas, windows[2])  # sent again: now the most recent
    assert list(strategy._windows) == [*last[3:], last[2]]


def test_after_a_scale_in_no_replica_left_is_cold() -> None:
    """The window of choices is sized for the largest pool seen: after 16
    replicas went down to 4, its length over 4 put each replica left under
    half its share, and a conversation followed every dip."""
    replicas, strategy = pool(16), PrefixAware()
    for user in range(64 * 16):
        strategy.choose(replicas, chat(f"user {user} " * 100))
    left = replicas[:4]
    home = left[0]
    history = ["shared system prompt " * 40, "a question " * 60, "an answer " * 120]
    _sent_to(strategy, left, home, chat(*history))
    for turn in range(6):
        dipped = left[1 + turn % 3]
        for replica in left:
            replica.in_flight = 7 if replica is dipped else 12
        assert strategy.choose(left, chat(*history, f"turn {turn} " * 40))[0] is home


def test_prefix_aware_ties_go_round_every_replica() -> None:
    replicas, strategy = pool(4), PrefixAware()
    system = "shared system prompt " * 50
    picks = [
        strategy.choose(replicas, chat(system, f"user {u} document " * 200))
        for u in range(8)
    ]
    balanced = [replica.url for replica, how in picks if how == "balance"]
    # Idle replicas: new conversations take them in turn, none is skipped.
    assert len(balanced) == 7
    assert set(balanced[:4]) == {r.url for r in replicas}


def test_prefix_table_is_bounded() -> None:
    strategy = PrefixAware(capacity=16)
    for i in range(50):
        strategy.choose(pool(), chat(f"{i}" * 600))
    assert strategy._owners.slots == 16
    assert 0 < len(strategy._owners) <= 16


def test_block_table_grows_with_use_then_stays_put() -> None:
    table = BlockTable(1 << 14)
    assert table.slots == 1024  # an idle model's table is small
    blocks = list(range(20_000))  # distinct slots up to the table's size
    table.add(blocks[:200], 1)
    assert table.slots == 1024 and len(table) == 200
    # Growing loses nothing: every hash moves to its slot in the new arrays.
    table.add(blocks[200:1000], 2)
    assert table.slots == 4096 and len(table) == 1000
    assert all(table.owners(b) == 1 for b in blocks[:200])
    assert all(table.owners(b) == 2 for b in blocks[200:1000])
    table.add(blocks, 4)
    assert table.slots == 1 << 14  # its cap: from here hashes displace others
    assert len(table) <= 1 << 14
    assert table.owners(blocks[-1]) == 4


def test_block_table_moves_or_displaces_when_both_slots_are_taken() -> None:
    table = BlockTable(1024)
    table.add([5], 1)
    table.add([5], 2)
    assert table.owners(5) == 3
    # Slots are named by a hash's low bits, then by its bits from 32 up.
    a, b, c = (7 << 32) | 5, (5 << 32) | 7, (5 << 32) | (5 + 1024)
    table.add([a], 4)  # slot 5 is taken: a takes its other one, 7
    # Both of b's are taken: a cannot move (5 is taken), 5's hash can (to 0).
    table.add([b], 8)
    assert [table.owners(h) for h in (5, a, b)] == [3, 4, 8]
    assert (table._keys[0], table._keys[5], len(table)) == (5, b, 3)
    # c's two slots are one, 5, and b cannot leave it (7 is taken): b goes.
    table.add([c], 16)
    assert [table.owners(h) for h in (5, a, b, c)] == [3, 4, 0, 16]
    assert len(table) == 3
    table.keep(1 | 16)
    assert [table.owners(h) for h in (5, a, c)] == [1, 0, 16]
    assert len(table) == 2
    with pytest.raises(ValueError, match="power of two"):
        BlockTable(1000)


def test_prefix_aware_keeps_placements_of_more_than_64_replicas() -> None:
    # Masks are 64-bit while a model has at most 64 replica URLs; the 65th
    # replica at once widens them rather than wiping what the others hold.
    strategy, replicas = PrefixAware(), pool(70)
    prompts = [chat(f"conversation {i} " * 60) for i in range(400)]
    placed = [strategy.choose(replicas, request)[0] for request in prompts]
    assert len(set(map(id, placed))) > 64
    assert strategy._owners.width > 64
    for replica, request in zip(placed, prompts, strict=True):
        assert strategy.choose(replicas, request) == (replica, "cache")


def test_prefix_aware_takes_back_bits_of_pods_gone_before_widening() -> None:
    strategy = PrefixAware()
    stay = Replica("http://10.0.0.1:8000")
    conversation = chat("system prompt " * 40, "a question " * 40)
    _sent_to(strategy, [stay], stay, conversation)
    for i in range(100):  # pods replaced one by one: never more than two
        pod = Replica(f"http://10.0.1.{i}:8000")
        _sent_to(strategy, [stay, pod], pod, chat(f"pod {i} conversation " * 50))
    assert strategy._owners.width == 64
    assert strategy.choose([stay, pod], conversation) == (stay, "cache")


def _sent_to(
    strategy: PrefixAware,
    replicas: list[Replica],
    target: Replica,
    request: RouteRequest,
) -> None:
    """Routes `request` while every replica but `target` is busy, so that it
    goes there wherever its prefix would."""
    for replica in replicas:
        replica.in_flight = 0 if replica is target else 100
    chosen, _ = strategy.choose(replicas, request)
    assert chosen is target
    for replica in replicas:
        replica.in_flight = 0


def test_prefix_aware_makes_room_by_forgetting_only_the_replicas_gone() -> None:
    # Each new pod is a new URL with a bit of its own in the masks. Once every
    # bit was handed out the whole table was wiped: the conversations of the
    # replicas still serving lost their placement too, all at once.
    strategy = PrefixAware()
    strategy._MAX_REPLICAS = 2
    stay = Replica("http://10.0.0.1:8000")
    conversation = ["system prompt " * 40, "a question " * 40]
    _sent_to(strategy, [stay], stay, chat(*conversation))
    for i in range(5):  # a pod replaced by another, five times
        pod = Replica(f"http://10.0.1.{i}:8000")
        _sent_to(strategy, [stay, pod], pod, chat(f"pod {i} conversation " * 50))
    grown = chat(*conversation, "an answer " * 40, "and then?")
    assert strategy.choose([stay, pod], grown) == (stay, "cache")
    # The newest pod has the bit of the ones gone: what was sent to them is
    # not taken for its own.
    for i in range(4):
        _, how = strategy.choose([stay, pod], chat(f"pod {i} conversation " * 50))
        assert how != "cache"
    # As many replicas at once as there are bits: the table starts afresh.
    crowd = [stay, pod, Replica("http://10.0.2.1:8000")]
    _sent_to(strategy, crowd, crowd[2], chat("a new conversation " * 50))
    assert list(strategy._bits) == [crowd[2].url]


def test_kv_aware_prefers_idle_cache_and_short_queue() -> None:
    replicas, strategy = pool(), KvAware()
    replicas[0].load = LoadReport(2, waiting=3, kv_cache_usage=0.9, scraped_at=0)
    replicas[1].load = LoadReport(2, waiting=0, kv_cache_usage=0.2, scraped_at=0)
    replicas[2].load = LoadReport(1, waiting=0, kv_cache_usage=0.95, scraped_at=0)
    assert strategy.choose(replicas, chat("x"))[0] is replicas[1]


@pytest.mark.parametrize("bad", ["NaN", "+Inf", "-Inf"])
def test_kv_aware_never_picks_a_busy_replica_for_a_figure_that_is_not_finite(
    bad: str,
) -> None:
    """A replica exporting NaN won kv-aware's min() whenever the rotation put it
    first (nothing compares below NaN), and one exporting -Inf every time, busy
    as it was: such a figure reads as missing, and the busy one stays out."""
    healthy = "vllm:num_requests_running 1\nvllm:kv_cache_usage_perc 0.5\n"
    busy = f"""vllm:num_requests_running 6
vllm:num_requests_waiting 5
vllm:kv_cache_usage_perc {bad}
"""
    replicas, strategy = pool(), KvAware()
    for replica, text in zip(replicas, (busy, healthy, healthy), strict=True):
        replica.load = parse_vllm_metrics(text, 0.0)
    picks = [strategy.choose(replicas, chat("x")) for _ in range(6)]
    assert {how for _, how in picks} == {"score"}
    assert {r.url for r, _ in picks} == {replicas[1].url, replicas[2].url}


REPORTING = """vllm:num_requests_running 4
vllm:num_requests_waiting 2
vllm:kv_cache_usage_perc 0.7
"""


@pytest.mark.parametrize(
    "silent",
    [
        "",
        "# HELP http_requests_total Not vLLM.\nhttp_requests_total 5\n",
        "vllm:num_requests_running NaN\nvllm:num_requests_waiting NaN\n"
        "vllm:kv_cache_usage_perc NaN\n",
    ],
    ids=["empty", "not-vllm", "only-nan"],
)
def test_kv_aware_does_not_favour_a_replica_that_reports_no_figure(
    silent: str,
) -> None:
    """A replica whose /metrics answered without the figures (or with NaN
    alone) scored 0 on each and took every request, busier as it was than the
    one reporting them: the two are compared on their requests in flight."""
    replicas, strategy = pool(2), KvAware()
    quiet, reporting = replicas
    quiet.load = parse_vllm_metrics(silent, 0.0)
    quiet.in_flight = 2
    reporting.load = parse_vllm_metrics(REPORTING, 0.0)
    reporting.in_flight = 1
    picks = [strategy.choose(replicas, chat("x")) for _ in range(4)]
    assert picks == [(reporting, "least")] * 4


def test_kv_aware_leaves_out_a_figure_one_replica_does_not_report() -> None:
    """A replica without the KV-cache figure scored 0 on it against another's
    0.5: the figure now counts for neither, and the rest decide."""
    replicas, strategy = pool(2), KvAware()
    lacking, reporting = replicas
    lacking.load = parse_vllm_metrics(
        "vllm:num_requests_running 2\nvllm:num_requests_waiting 0\n", 0.0
    )
    reporting.load = parse_vllm_metrics(
        "vllm:num_requests_running 0\nvllm:num_requests_waiting 0\n"
        "vllm:kv_cache_usage_perc 0.5\n",
        0.0,
    )
    picks = [strategy.choose(replicas, chat("x")) for _ in range(4)]
    assert picks == [(reporting, "score")] * 4
    # Reported by both, the figure counts again.
    lacking.load.kv_cache_usage = 0.0
    assert strategy.choose(replicas, chat("x")) == (lacking, "score")


def test_session_affinity_pins_sessions_and_survives_other_replicas_leaving() -> None:
    replicas, strategy = pool(4), SessionAffinity()
    pinned = {
        s: strategy.choose(replicas, RouteRequest({}, s))[0].url for s in "abcdefgh"
    }
    again = {s: strategy.choose(replicas, RouteRequest({}, s))[0].url for s in pinned}
    assert again == pinned
    survivors = [r for r in replicas if r.url != replicas[0].url]
    after = {s: strategy.choose(survivors, RouteRequest({}, s))[0].url for s in pinned}
    assert all(after[s] == u for s, u in pinned.items() if u != replicas[0].url)
    _no_session, how = strategy.choose(replicas, RouteRequest({}))
    assert how == "least"


@pytest.mark.parametrize("kind", list(RoutingStrategy))
def test_every_strategy_kind_has_an_implementation(kind: RoutingStrategy) -> None:
    replica, _ = make_strategy(kind).choose(pool(), chat("x"))
    assert isinstance(replica, Replica)


def test_block_hashes_share_exactly_the_common_prefix() -> None:
    a = block_hashes("x" * 600 + "tail a")
    b = block_hashes("x" * 600 + "other tail")
    c = block_hashes("y" + "x" * 599)
    assert a[:2] == b[:2] and len(a) == 2
    # The second blocks hold the same text; only what came before differs.
    assert c[0] != a[0] and c[1] != a[1]
    assert block_hashes("short") == block_hashes("short") != []
    assert block_hashes("") == []


def test_the_base_model_s_block_hashes_are_as_before_adapters() -> None:
    """Placements of existing traffic stay put: the base model's hashes are
    the unseeded xxh3 of each prefix, as before adapters came (values taken
    from the code before them)."""
    text = "p" * 700 + "\u00e9" * 300
    before = [
        4362046760042216546,
        14478944429796467017,
        10314844114981282061,
        10452520119061177617,
        17897469456989021566,
    ]
    assert block_hashes(text) == block_hashes(text, adapter=None) == before
    data = text.encode()
    assert before == [
        xxhash.xxh3_64_intdigest(data[: BLOCK_CHARS * (i + 1)]) for i in range(5)
    ]


def test_an_adapter_s_block_hashes_are_its_own() -> None:
    """vLLM caches an adapter's blocks apart from the base's and from every
    other adapter's: none of their hashes may meet, while each still chains
    (a shared prefix under one adapter is a shared prefix)."""
    text = "p" * 700
    base = block_hashes(text)
    sql = block_hashes(text, adapter="sql")
    bot = block_hashes(text, adapter="bot")
    assert len(base) == len(sql) == len(bot) == 2
    assert not {*base} & {*sql} and not {*base} & {*bot} and not {*sql} & {*bot}
    assert sql == block_hashes(text, adapter="sql")
    assert block_hashes(text + "more", adapter="sql")[:2] == sql


def test_prefix_aware_takes_no_base_prefix_for_an_adapter_s() -> None:
    strategy = PrefixAware()
    replicas = pool(4)
    body = {"messages": [{"role": "user", "content": "x" * 2000}]}
    first, _ = strategy.choose(replicas, RouteRequest(body))
    again, how = strategy.choose(replicas, RouteRequest(body))
    assert (again, how) == (first, "cache")
    _, how = strategy.choose(replicas, RouteRequest(body, adapter="sql"))
    assert how == "hash"
    _, how = strategy.choose(replicas, RouteRequest(body, adapter="sql"))
    assert how == "cache"


def test_block_hashes_are_the_same_in_every_process() -> None:
    # Gateway replicas route a prefix alike only if no per-process seed enters.
    code = (
        "from citadel.gateway.services.prefix import block_hashes;"
        "print(block_hashes('p' * 700))"
    )
    seen = {
        subprocess.run(
            [sys.executable, "-c", code],
            env={**os.environ, "PYTHONHASHSEED": seed},
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        for seed in ("1", "2")
    }
    assert seen == {str(block_hashes("p" * 700))}


def test_prompt_text_reads_chat_completion_and_embedding_bodies() -> None:
    parts = {"role": "user", "content": [{"type": "text", "text": "hi"}]}
    assert "hi" in prompt_text({"messages": [parts]})
    assert prompt_text({"prompt": "p"}) == "p"
    assert prompt_text({"input": ["a", "b"]}) == "a"
    assert prompt_text({}) == ""


def test_prompt_text_reads_plain_string_parts() -> None:
    """vLLM takes a string among a message's content parts as text: it is
    part of the prompt, to route by and to charge for."""
    parts = {"role": "user", "content": ["hi ", {"type": "text", "text": "there"}]}
    assert prompt_text({"messages": [parts]}) == "user\x1fhi there\x1e"


def test_a_batch_of_token_ids_is_written_out_only_as_far_as_it_is_hashed() -> None:
    """A first prompt of a million ids was written out whole (megabytes, on
    the event loop) to hash its first 64 blocks."""
    short = list(range(100))
    assert prompt_text({"prompt": [short, [1]]}) == str(short)
    long = [7] * 1_000_000
    text = prompt_text({"prompt": [long]})
    assert len(text) <= 3 * BLOCK_CHARS * MAX_BLOCKS
    assert block_hashes(text) == block_hashes(str(long))
    assert prompt_text({"prompt": [[[7] * 1_000_000]]}) == ""  # no token ids
    assert prompt_text({"prompt": [{"a": [7] * 1_000_000}]}) == ""


def tool(name: str, description: str = "Looks things up.") -> dict[str, Any]:
    return {
        "type": "function",
        "function": {
            "name": name,
            "description": description,
            "parameters": {"type": "object", "properties": {"q": {"type": "string"}}},
        },
    }


AGENT = [
    {"role": "system", "content": "You are an agent with tools. " * 30},
    {"role": "user", "content": "Find the release notes."},
]


def image(payload: str) -> dict[str, Any]:
    return {"type": "image_url", "image_url": {"url": payload}}


def test_a_chat_s_tools_lead_its_prefix() -> None:
    """Chat templates write the tool schemas at the head of the prompt: the
    same messages with another tool set share no KV prefix in vLLM."""
    plain = block_hashes(prefix_text({"messages": AGENT}))
    search = block_hashes(prefix_text({"messages": AGENT, "tools": [tool("search")]}))
    fetch = block_hashes(prefix_text({"messages": AGENT, "tools": [tool("fetch")]}))
    assert len({plain[0], search[0], fetch[0]}) == 3
    # vLLM does not read `functions`, OpenAI's older name: no part of the prompt.
    legacy = {"messages": AGENT, "functions": [tool("search")["function"]]}
    assert block_hashes(prefix_text(legacy)) == plain
    # The same tools are the same prefix, however the client ordered the keys.
    function = dict(reversed(tool("search")["function"].items()))
    reordered = [{"function": function, "type": "function"}]
    again = block_hashes(prefix_text({"messages": AGENT, "tools": reordered}))
    assert again == search
    assert block_hashes(prefix_text({"messages": AGENT, "tools": []})) == plain


def test_prefix_aware_routes_a_new_tool_set_as_a_new_prefix() -> None:
    replicas, strategy = pool(4), PrefixAware()
    first, _ = strategy.choose(
        replicas, RouteRequest({"messages": AGENT, "tools": [tool("search")]})
    )
    same, how = strategy.choose(
        replicas, RouteRequest({"messages": AGENT, "tools": [tool("search")]})
    )
    assert (same, how) == (first, "cache")
    _, how = strategy.choose(
        replicas, RouteRequest({"messages": AGENT, "tools": [tool("fetch")]})
    )
    assert how == "hash"


@pytest.mark.parametrize("description", ["ascii " * 400, "多字节描述 " * 400])
def test_only_the_hashed_head_of_the_tools_is_written(description: str) -> None:
    """500 schemas of 2 KB (more than a megabyte) hash as their whole JSON
    would, from a text no longer than the hashed blocks, whatever bytes each
    character takes."""
    tools = [tool(f"tool_{i}", description[:2000]) for i in range(500)]
    body = {"messages": AGENT, "tools": tools}
    whole = orjson.dumps(tools, option=orjson.OPT_SORT_KEYS).decode()
    text = prefix_text(body)
    assert len(text) <= BLOCK_CHARS * MAX_BLOCKS + 3
    assert block_hashes(text) == block_hashes(f"{whole}\x1d{prompt_text(body)}")
    # Tools that fill fewer blocks are followed by the messages.
    few = {"messages": AGENT, "tools": tools[:2]}
    whole = orjson.dumps(tools[:2], option=orjson.OPT_SORT_KEYS)
    reference = f"{whole.decode()}\x1d{prompt_text(few)}"
    assert block_hashes(prefix_text(few)) == block_hashes(reference)


def test_a_media_part_stands_in_its_place_as_a_hash_of_its_payload() -> None:
    """vLLM keys a media part's KV blocks by a hash of the media: two images
    after the same text share the blocks before them and none after."""
    before = "Compare this picture with the last one. " * 20  # 3 blocks
    after = "Then describe the differences in detail. " * 20

    def hashes(*parts: dict[str, Any]) -> list[int]:
        content = [{"type": "text", "text": before}, *parts]
        content.append({"type": "text", "text": after})
        return block_hashes(
            prefix_text({"messages": [{"role": "user", "content": content}]})
        )

    png = "data:image/png;base64,"
    a, b = hashes(image(png + "A" * 5000)), hashes(image(png + "B" + "A" * 4999))
    assert a[:3] == b[:3] and a[3] != b[3] and len(a) == len(b)
    assert hashes(image(png + "A" * 5000)) == a
    audio = {"type": "input_audio", "input_audio": {"data": "UklGR", "format": "wav"}}
    other = {"type": "input_audio", "input_audio": {"data": "UklGS", "format": "wav"}}
    assert hashes(audio)[3] != hashes(other)[3] != a[3]
    # vLLM takes a client's uuid as the media's identity, not its bytes.
    named = [{**image(png + c), "uuid": "sku-1"} for c in "AB"]
    assert hashes(named[0]) == hashes(named[1]) != a
    # A text type without text is no media (as `prompt_text` reads it).
    assert hashes({"type": "refusal", "refusal": "no"}) == hashes()


def test_prefix_aware_routes_a_new_image_as_a_new_prefix() -> None:
    replicas, strategy = pool(4), PrefixAware()

    def request(payload: str) -> RouteRequest:
        content = [image(payload), {"type": "text", "text": "Describe it. " * 100}]
        return RouteRequest({"messages": [{"role": "user", "content": content}]})

    first, _ = strategy.choose(replicas, request("https://img.example/a.png"))
    same, how = strategy.choose(replicas, request("https://img.example/a.png"))
    assert (same, how) == (first, "cache")
    _, how = strategy.choose(replicas, request("https://img.example/b.png"))
    assert how == "hash"


def test_a_large_base64_image_is_hashed_not_written() -> None:
    payload = "data:image/png;base64," + "iVBORw0KGgo" * 400_000  # 4.4 MB
    content = [{"type": "text", "text": "What is this?"}, image(payload)]
    text = prefix_text({"messages": [{"role": "user", "content": content}]})
    assert "iVBORw0KGgo" not in text and len(text) < 100


@pytest.mark.parametrize(
    "messages",
    [
        AGENT,
        [{"role": "user", "content": "turn " * 10_000}],  # one message, 50 KB
        [{"role": "user", "content": "turn " * 100_000}],  # 500 KB
        [{"role": r, "content": f"turn {i} " * 300} for i, r in enumerate("ab" * 20)],
        [{"role": "user", "content": ["hi ", {"type": "text", "text": "there"}]}],
        [{"role": "user", "content": [{"type": "input_text", "text": "é" * 20_000}]}],
    ],
)
def test_a_plain_chat_hashes_as_its_prompt_text(messages: list[Any]) -> None:
    """Without tools or media a chat routes as it did, from a text cut after
    the hashed blocks (a message a few times longer than they hold is kept
    whole: cutting it would copy more than it saves)."""
    body = {"messages": messages}
    assert block_hashes(prefix_text(body)) == block_hashes(prompt_text(body))
    assert len(prefix_text(body)) <= 5 * BLOCK_CHARS * MAX_BLOCKS


def test_prefix_text_of_a_completion_or_embedding_is_its_prompt_text() -> None:
    for body in ({"prompt": "p" * 20_000}, {"input": ["a", "b"]}, {"prompt": [[1, 2]]}):
        assert prefix_text(body) == prompt_text(body)


def test_rendezvous_is_stable() -> None:
    urls = [f"http://h{i}" for i in range(5)]
    assert rendezvous("k", urls) == rendezvous("k", list(reversed(urls)))


def test_kv_aware_uses_in_flight_alone_while_a_report_is_stale_or_missing() -> None:
    """A replica whose /metrics stopped answering kept its last, low figures for
    ever: the busiest replica looked idle and took every request."""
    now = [100.0]
    replicas, strategy = pool(2), KvAware(lambda: now[0], max_age_s=10.0)
    busy, other = replicas
    busy.load = LoadReport(running=0, waiting=0, scraped_at=50.0)  # stale
    busy.in_flight = 3
    other.load = LoadReport(running=8, waiting=0, scraped_at=99.0)
    other.in_flight = 1
    picks = [strategy.choose(replicas, chat("x")) for _ in range(4)]
    assert picks == [(other, "least")] * 4
    busy.load = LoadReport()  # what a failed scrape leaves: no report at all
    assert strategy.choose(replicas, chat("x")) == (other, "least")
    busy.load = LoadReport(running=0, waiting=0, scraped_at=95.0)  # fresh again
    assert strategy.choose(replicas, chat("x")) == (busy, "score")
