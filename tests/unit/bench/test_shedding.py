"""The shedding part's report (`citadel_bench.shedding`, `document._shedding`)."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import pytest
from citadel_bench.config import FULL
from citadel_bench.document import Results, write_document
from citadel_bench.shedding import (
    BATCH_TOKENS,
    PHASES,
    Phase,
    SheddingResult,
    batch_body,
    user_body,
)
from citadel_bench.stats import Summary

from citadel.gateway.services.prefix import block_hashes, prefix_text

pytestmark = pytest.mark.unit


def _results() -> Results:
    machine = {"cpu": "2 cores", "memory": "8 GiB", "os": "Linux"}
    machine.update(python="3.11", commit="abc")
    started = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    return Results(config=FULL, started=started, load_start="", machine=machine)


def _phase(name: str, ttft_ms: float, shed: int) -> Phase:
    return Phase(
        name=name,
        ttft_ms=Summary.of([ttft_ms, ttft_ms * 3]),
        user_errors=0,
        batch_answered=30,
        batch_shed=shed,
        batch_errors=0,
        seconds=30.0,
    )


def test_the_document_shows_every_phase(tmp_path: Path) -> None:
    r = _results()
    r.shedding = SheddingResult(
        [_phase(name, 100.0 * (i + 1), 7 * i) for i, (name, *_) in enumerate(PHASES)]
    )
    path = tmp_path / "benchmarks.md"
    write_document(r, path, tmp_path)
    part = path.read_text().split("## Priorities under overload")[1].split("\n## ")[0]
    rows = [line for line in part.splitlines() if line.startswith("| batch as")]
    assert len(rows) == 6
    # Mean of 300 and 900 ms; 30 answered of 256 tokens over 30 s.
    assert rows[1].startswith("| batch as sheddable | 2 | 0 | 600.00 |")
    assert rows[1].endswith(f"| 30 | 14 | 0 | {30 * BATCH_TOKENS // 30} |")
    assert "x-citadel-priority: sheddable" in part
    assert "users run 30 s in each phase" in part


def test_a_phase_that_did_not_run_says_why(tmp_path: Path) -> None:
    r = _results()
    r.failures["shedding"] = "RuntimeError: the simulator did not start"
    path = tmp_path / "benchmarks.md"
    write_document(r, path, tmp_path)
    assert "Not run: RuntimeError: the simulator did not start" in path.read_text()


def test_requests_share_no_prefix_a_cache_would_hide_the_queue_behind() -> None:
    """Each user turn and batch request is a prompt of its own from its first
    block: a prefix-cache hit would shorten its prefill, not its wait."""
    firsts = {
        block_hashes(prefix_text(body))[0]
        for body in [user_body(u, t) for u in range(3) for t in range(3)]
        + [batch_body(n) for n in range(3)]
    }
    assert len(firsts) == 12
