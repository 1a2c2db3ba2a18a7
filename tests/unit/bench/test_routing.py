"""The routing benchmark's reference placement: warming the replicas' caches, and
counting only what came after."""

import asyncio
from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestServer
from citadel_bench import loadgen, peers
from citadel_bench.routing import (
    PINNED_WARM,
    PLAIN_RR,
    ReplicaCounters,
    plain_picker,
    replica_counters,
    targets,
    warm_up,
)
from citadel_bench.workload import ChatWorkload, conversation
from simulator.params import SimParams
from simulator.server import make_app

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
    assert PINNED_WARM in targets(False) and PINNED_WARM in targets(True)
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
