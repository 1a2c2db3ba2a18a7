"""The memory benchmark's workload: every request distinct and several hash blocks
long, a warm-up that fills the prefix table, growth measured after it."""

import pytest
from citadel_bench import memory
from citadel_bench.memory import MemoryRun, memory_body
from citadel_bench.results import memory_verdict

from citadel.gateway.services.prefix import block_hashes, prefix_text

pytestmark = pytest.mark.unit


def _hashes(n: int) -> list[int]:
    return block_hashes(prefix_text(memory_body(n, n % 2 == 1)))


def test_every_request_is_distinct_and_spans_several_blocks() -> None:
    per_batch = 100
    # Requests of different batches (the warm-up's first, a measured one's).
    requests = [*range(0, 2 * per_batch), 40 * per_batch, 40 * per_batch + 1]
    seen: set[int] = set()
    for n in requests:
        hashes = _hashes(n)
        assert len(hashes) == memory.blocks_per_request() >= 4
        # Every block of every request is new to the prefix table.
        assert seen.isdisjoint(hashes)
        seen.update(hashes)


def test_the_warm_up_fills_the_prefix_table_and_one_batch_more() -> None:
    per_batch = 10_000
    warmup = memory.warmup_requests(per_batch)
    assert warmup % per_batch == 0
    capacity = memory.table_capacity()
    filled = warmup - per_batch
    assert filled * memory.blocks_per_request() >= capacity
    assert (filled - per_batch) * memory.blocks_per_request() < capacity


def test_growth_is_measured_from_the_end_of_the_warm_up() -> None:
    run = MemoryRun(
        requests=20,
        errors=0,
        curve=[(0, 60.0), (10, 90.0), (20, 100.0), (30, 104.0), (40, 105.0)],
        warmup=20,
        wall_s=1.0,
        blocks_per_request=8,
        table_capacity=160,
        table_mib=27.0,
    )
    assert (run.start_mb, run.warm_mb, run.end_mb) == (60.0, 100.0, 105.0)
    assert run.growth == pytest.approx(0.05)
    verdict = memory_verdict(run)
    assert verdict.ok
    assert "100.0 -> 105.0 MiB (5.0%)" in verdict.measured
    assert "60.0 MiB at start-up, before any completion" in verdict.note
