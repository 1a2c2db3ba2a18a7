"""Gateway memory over many requests: RSS sampled between batches of requests
against the fast backend."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path

from citadel_bench import loadgen
from citadel_bench.overhead import body, start_instant_citadel
from citadel_bench.procs import Proc, stop


@dataclass
class MemoryRun:
    """RSS (MiB) after each batch: `curve[0]` after a warm-up of one batch."""

    requests: int
    errors: int
    curve: list[tuple[int, float]]
    wall_s: float

    @property
    def growth(self) -> float:
        """Relative RSS growth from the first sample to the last."""
        first, last = self.curve[0][1], self.curve[-1][1]
        return (last - first) / first


def run_memory(log_dir: Path, total: int, batches: int = 10) -> MemoryRun:
    """`total` requests (half streamed) at concurrency 16, in `batches` batches."""
    procs: list[Proc] = []
    try:
        gateway = start_instant_citadel(log_dir, "memory", procs)
        chat = gateway.url + "/v1/chat/completions"
        per_batch = max(1, total // batches)

        async def batch(i: int) -> loadgen.Run:
            make = body(stream=i % 2 == 1)
            return await loadgen.closed_loop(
                chat, make, 16, per_batch, 600, gateway.headers
            )

        warm = asyncio.run(batch(0))
        curve = [(0, gateway.proc.rss_bytes() / 2**20)]
        done, errors, wall = 0, warm.errors, 0.0
        for i in range(batches):
            run = asyncio.run(batch(i))
            done += len(run.samples)
            errors += run.errors
            wall += run.wall_s
            curve.append((done, gateway.proc.rss_bytes() / 2**20))
            print(f"memory after {done} requests: {curve[-1][1]:.1f} MiB", flush=True)
        return MemoryRun(done, errors, curve, wall)
    finally:
        for proc in reversed(procs):
            stop(proc)
