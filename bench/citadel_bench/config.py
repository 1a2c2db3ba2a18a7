"""How big each benchmark is: the full run and the quick smoke run."""

from __future__ import annotations

from dataclasses import dataclass, replace

from citadel_bench.workload import MULTI_ROUND_QA, SHORT_CHAT, ChatWorkload


@dataclass(frozen=True)
class BenchConfig:
    """Sizes and bounds of one `make bench`."""

    quick: bool
    overhead_rounds: int
    overhead_seconds: float
    profile_seconds: float
    routing: tuple[ChatWorkload, ...]
    """The routing benchmark's workloads, each through every target."""
    routing_deadline_s: float
    routing_rounds: int
    """How many times every routing target runs each workload (the first turns'
    cold prefills dominate a mean, and vary from run to run)."""
    gateways: tuple[ChatWorkload, ...]
    """The two-gateway part's workloads, each through every target."""
    gateways_deadline_s: float
    gateways_rounds: int
    """How many times every two-gateway target runs each workload."""
    memory_requests: int
    shedding_seconds: float
    """How long the interactive users run in each phase of the shedding part."""
    scale_models: int
    scale_nodes: int
    scale_timeout_s: float
    vllm_check: bool


FULL = BenchConfig(
    quick=False,
    overhead_rounds=3,
    overhead_seconds=4.0,
    profile_seconds=6.0,
    routing=(SHORT_CHAT, MULTI_ROUND_QA),
    routing_deadline_s=120.0,
    routing_rounds=3,
    gateways=(MULTI_ROUND_QA, SHORT_CHAT),
    gateways_deadline_s=120.0,
    gateways_rounds=2,
    memory_requests=100_000,
    shedding_seconds=30.0,
    scale_models=1000,
    scale_nodes=100,
    scale_timeout_s=420.0,
    vllm_check=True,
)

_QUICK_CHAT = replace(SHORT_CHAT, users=8, conversations_per_user=1, turns=6)
_QUICK_QA = replace(MULTI_ROUND_QA, users=8, turns=4)

QUICK = BenchConfig(
    quick=True,
    overhead_rounds=1,
    overhead_seconds=1.0,
    profile_seconds=3.0,
    routing=(_QUICK_CHAT, _QUICK_QA),
    routing_deadline_s=40.0,
    routing_rounds=1,
    gateways=(_QUICK_QA, _QUICK_CHAT),
    gateways_deadline_s=40.0,
    gateways_rounds=1,
    memory_requests=10_000,
    shedding_seconds=6.0,
    scale_models=100,
    scale_nodes=10,
    scale_timeout_s=120.0,
    vllm_check=False,
)
