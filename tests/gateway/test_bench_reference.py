"""The routing benchmark's reference target end to end: the real simulator process,
the warm-up, the pinned users and the counters as `make bench` runs them."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
from citadel_bench.routing import BARE_RELAY, PINNED_WARM, PLAIN_RR, run_target
from citadel_bench.workload import ChatWorkload

pytestmark = pytest.mark.integration

# Small enough for seconds: 4 users, so one per simulated replica when pinned.
WORKLOAD = ChatWorkload(
    users=4,
    conversations_per_user=1,
    turns=3,
    system_prompts=2,
    system_chars=800,
    user_chars=40,
    max_tokens=4,
)


def test_the_reference_counts_only_the_workload_and_finds_its_prompts_warm(
    tmp_path: Path,
) -> None:
    pinned = run_target(PINNED_WARM, WORKLOAD, tmp_path, 60.0)
    rotated = run_target(PLAIN_RR, WORKLOAD, tmp_path, 60.0)
    for run in (pinned, rotated):
        assert run.requests == WORKLOAD.requests and run.errors == 0
        # One first token per request of the workload, none of the warm-up's.
        assert run.replica_ttft_count == WORKLOAD.requests
    # Same prompts both times; warm and pinned, every turn finds its system
    # prompt and its own conversation so far, which rotating does not.
    assert pinned.cache_queries == rotated.cache_queries
    assert pinned.cache_hits > rotated.cache_hits
    assert pinned.hit_rate > 0.8


def test_the_bare_relay_serves_the_workload_keeping_conversations_together(
    tmp_path: Path,
) -> None:
    # 3 users on 4 replicas: rotating moves each conversation at every turn (with
    # 4, each turn's requests would come round to the same replicas).
    workload = dataclasses.replace(WORKLOAD, users=3)
    relayed = run_target(BARE_RELAY, workload, tmp_path, 60.0)
    rotated = run_target(PLAIN_RR, workload, tmp_path, 60.0)
    assert relayed.requests == workload.requests and relayed.errors == 0
    assert relayed.replica_ttft_count == workload.requests
    # Each conversation stays on one replica: its later turns find what its
    # earlier ones left there, as rotating does not.
    assert relayed.cache_queries == rotated.cache_queries
    assert relayed.cache_hits > rotated.cache_hits
