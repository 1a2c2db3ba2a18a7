"""Routing across replica processes, ejection, failover, and a kill under load."""

from __future__ import annotations

import asyncio
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import openai
import pytest

pytestmark = pytest.mark.integration


@pytest.fixture
def three(
    tmp_path: Path, start_backend: Any, start_gateway: Any, helpers: Any
) -> Iterator[dict[str, Any]]:
    backends = [start_backend(name) for name in ("a", "b", "c")]
    keys = tmp_path / "keys.json"
    key = helpers.create_key(keys, "load")
    models = [
        helpers.route("rr", backends, strategy="round-robin"),
        helpers.route("prefix", backends, strategy="prefix-aware"),
        helpers.route("sticky", backends, strategy="session-affinity"),
        helpers.route("kv", backends, strategy="kv-aware"),
        helpers.route("least", backends, strategy="least-load"),
    ]
    gateway = start_gateway(models, keys)
    with openai.OpenAI(
        base_url=gateway.url + "/v1", api_key=key, max_retries=0
    ) as client:
        yield {"backends": backends, "gateway": gateway, "client": client, "key": key}


def replica_of(client: openai.OpenAI, model: str, **extra: Any) -> str:
    answer = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "hi"}], **extra
    )
    assert answer.system_fingerprint is not None
    return str(answer.system_fingerprint)


def test_round_robin_and_least_load_share_the_replicas(three: dict[str, Any]) -> None:
    client = three["client"]
    assert Counter(replica_of(client, "rr") for _ in range(9)) == dict.fromkeys(
        "abc", 3
    )
    assert {replica_of(client, "least") for _ in range(6)} == set("abc")


def test_prefix_aware_keeps_a_conversation_on_one_replica(
    three: dict[str, Any],
) -> None:
    client: openai.OpenAI = three["client"]
    homes = set()
    for user in range(6):
        messages: list[Any] = [
            {"role": "system", "content": f"You help user {user}. " * 40}
        ]
        for turn in range(3):
            messages.append({"role": "user", "content": f"question {turn}"})
            answer = client.chat.completions.create(model="prefix", messages=messages)
            messages.append({"role": "assistant", "content": "answer " * 50})
            homes.add((user, answer.system_fingerprint))
    by_user = Counter(user for user, _ in homes)
    assert all(count == 1 for count in by_user.values())  # one replica per user
    assert len({replica for _, replica in homes}) > 1  # users are spread


def test_session_affinity_by_header(three: dict[str, Any]) -> None:
    client = three["client"]
    for session in ("s1", "s2", "s3", "s4"):
        headers = {"x-session-id": session}
        seen = {replica_of(client, "sticky", extra_headers=headers) for _ in range(3)}
        assert len(seen) == 1


def test_kv_aware_reads_replica_metrics(three: dict[str, Any]) -> None:
    client, gateway = three["client"], three["gateway"]

    def scored() -> float:
        return gateway.metric(
            'citadel_gateway_routing_decisions_total{kind="score",model="kv"'
        )

    # Until every replica's /metrics has been read once, kv-aware compares
    # requests in flight alone (decisions `least`): wait for the first scrape.
    deadline = time.monotonic() + 15
    while not scored() and time.monotonic() < deadline:
        replica_of(client, "kv")
        time.sleep(0.2)
    before = scored()
    assert before, "no kv-aware decision by score within 15 s"
    assert {replica_of(client, "kv") for _ in range(6)} <= set("abc")
    assert scored() - before == 6


def test_dead_replica_is_ejected_and_requests_fail_over(
    three: dict[str, Any],
) -> None:
    client, gateway = three["client"], three["gateway"]
    three["backends"][1].kill()
    served = Counter(replica_of(client, "rr") for _ in range(12))
    assert set(served) == {"a", "c"} and sum(served.values()) == 12
    assert gateway.metric("citadel_gateway_replica_ejections_total") >= 1
    assert gateway.metric('citadel_gateway_backend_errors_total{kind="connect"') >= 3


async def test_killing_a_replica_under_load_loses_no_request(
    three: dict[str, Any],
) -> None:
    gateway, victim = three["gateway"], three["backends"][2]
    client = openai.AsyncOpenAI(
        base_url=gateway.url + "/v1", api_key=three["key"], max_retries=0
    )
    messages: Any = [{"role": "user", "content": "hi"}]

    async def one(i: int) -> str | None:
        answer = await client.chat.completions.create(
            model="least", messages=messages, extra_body={"fake_delay_s": 0.3}
        )
        return str(answer.system_fingerprint)

    tasks = [asyncio.create_task(one(i)) for i in range(60)]
    deadline = time.monotonic() + 60
    while not victim.received() and time.monotonic() < deadline:
        await asyncio.sleep(0.05)
    victim.kill()  # with requests in flight at it
    results = await asyncio.gather(*tasks, return_exceptions=True)
    await client.close()
    failures = [r for r in results if isinstance(r, BaseException)]
    assert failures == []
    assert len(results) == 60
    # Requests were in flight at the victim and were retried elsewhere.
    assert gateway.metric("citadel_gateway_backend_errors_total") >= 1
