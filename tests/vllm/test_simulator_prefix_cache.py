"""The bench's vLLM simulator counts its prefix cache as the real CPU vLLM does.

The routing benchmark's verdicts rest on the simulator's prefix cache behaving like
vLLM's, so the comparison `make bench` reports (bench/simulator/MODEL.md, "Checked
against the real vLLM") is also a test: a change to either side that makes them
disagree fails here, not only in the next benchmark document.
"""

from pathlib import Path

import pytest
from citadel_bench.procs import stop
from citadel_bench.vllm_check import compare, start_simulator
from vllm_server import TINY_RANDOM, VLLMServer

pytestmark = pytest.mark.vllm


def test_prefix_cache_counters_match_vllm(
    tiny_random_server: VLLMServer, tmp_path: Path
) -> None:
    sim, sim_url = start_simulator(tmp_path)
    try:
        rows = compare(tiny_random_server.base_url, TINY_RANDOM, sim_url)
    finally:
        stop(sim)
    table = "\n".join(
        f"{row.what}: vLLM queries/hits {row.vllm}, simulator {row.sim}" for row in rows
    )
    print(table)
    # The scenarios must exercise hits at all, or agreement proves nothing.
    assert any(row.vllm[1] > 0 for row in rows), table
    assert all(row.match for row in rows), table
