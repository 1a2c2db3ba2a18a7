"""Gateway overhead: the same load straight to a fast backend and through each
proxy, interleaved round by round so that drift shows."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from citadel_bench import loadgen, peers
from citadel_bench.procs import Proc, simulator_argv, start, stop, wait_listening
from citadel_bench.pyspy import start_sampling, stop_sampling, top_functions
from citadel_bench.stats import median, percentile

CONCURRENCY = (1, 16, 64)
MODES = ("json", "stream")
PROMPT = "Summarise the benefits of continuous batching in two sentences. " * 2
REPLY_TOKENS = 16


@dataclass
class Point:
    """One measured run: target x mode x concurrency x round."""

    target: str
    mode: str
    concurrency: int
    round: int
    requests: int
    errors: int
    rps: float
    median_ms: float
    p99_ms: float
    first_chunk_ms: float
    cpu_cores: float
    rss_mb: float
    latencies_ms: list[float] = field(repr=False, default_factory=list)


@dataclass
class OverheadResult:
    points: list[Point]
    skipped: dict[str, str]
    """Peers that did not run, and why."""
    rss_start_mb: dict[str, float]


def body(stream: bool) -> Callable[[int], dict[str, Any]]:
    def make(i: int) -> dict[str, Any]:
        return {
            "model": peers.MODEL,
            "messages": [{"role": "user", "content": f"{i} {PROMPT}"}],
            "max_tokens": REPLY_TOKENS,
            "stream": stream,
        }

    return make


def measure(
    name: str,
    target: peers.Target,
    mode: str,
    concurrency: int,
    round_: int,
    seconds: float,
) -> Point:
    """One run against `target`, with the CPU and memory of its process around
    it."""
    make = body(mode == "stream")
    chat = target.url + "/v1/chat/completions"
    proc, headers = target.proc, target.headers
    # A short warm-up opens the connections.
    asyncio.run(
        loadgen.closed_loop(chat, make, concurrency, concurrency * 4, 2.0, headers)
    )
    cpu0, t0 = proc.cpu_seconds(), time.monotonic()
    run = asyncio.run(
        loadgen.closed_loop(chat, make, concurrency, 10**6, seconds, headers)
    )
    cpu = (proc.cpu_seconds() - cpu0) / (time.monotonic() - t0)
    ok = run.ok
    latencies = [s.latency * 1000 for s in ok]
    firsts = [s.first_chunk * 1000 for s in ok]
    return Point(
        target=name,
        mode=mode,
        concurrency=concurrency,
        round=round_,
        requests=len(ok),
        errors=run.errors,
        rps=run.rps,
        median_ms=median(latencies),
        p99_ms=percentile(latencies, 99),
        first_chunk_ms=median(firsts),
        cpu_cores=cpu,
        rss_mb=proc.rss_bytes() / 2**20,
        latencies_ms=latencies,
    )


def run_overhead(log_dir: Path, rounds: int, seconds: float) -> OverheadResult:
    """Starts the backend and every proxy once, then runs the interleaved grid."""
    procs: list[Proc] = []
    skipped: dict[str, str] = {}
    try:
        sim = start(
            "overhead-sim",
            simulator_argv(1, "--instant", "--default-max-tokens", str(REPLY_TOKENS)),
            log_dir,
        )
        procs.append(sim)
        backend = f"http://127.0.0.1:{wait_listening(sim)[0]}"
        targets = {"direct": peers.Target(sim, backend)}
        targets["citadel"] = peers.start_citadel([backend], log_dir)
        procs.append(targets["citadel"].proc)
        for name, starter in (
            ("vllm-router", peers.start_vllm_router),
            ("litellm", peers.start_litellm),
        ):
            problem = peers.peer_problem(name)
            if problem:
                skipped[name] = problem
                continue
            try:
                targets[name] = starter([backend], log_dir)
            except RuntimeError as err:
                skipped[name] = f"did not start: {str(err)[-400:]}"
                continue
            procs.append(targets[name].proc)
        rss_start = {n: t.proc.rss_bytes() / 2**20 for n, t in targets.items()}
        points: list[Point] = []
        names = list(targets)
        for r in range(rounds):
            for mode in MODES:
                for concurrency in CONCURRENCY:
                    # Rotate the order each round so no target always goes first.
                    shift = r % len(names)
                    for name in names[shift:] + names[:shift]:
                        points.append(
                            measure(name, targets[name], mode, concurrency, r, seconds)
                        )
                        print(_line(points[-1]), flush=True)
        return OverheadResult(points, skipped, rss_start)
    finally:
        for proc in reversed(procs):
            stop(proc)


def _line(p: Point) -> str:
    return (
        f"overhead r{p.round} {p.mode:6} c={p.concurrency:<3} {p.target:12} "
        f"rps={p.rps:8.1f} med={p.median_ms:7.2f}ms p99={p.p99_ms:7.2f}ms "
        f"first={p.first_chunk_ms:7.2f}ms cpu={p.cpu_cores:4.2f} "
        f"rss={p.rss_mb:6.1f}MB err={p.errors}"
    )


def start_instant_citadel(log_dir: Path, name: str, procs: list[Proc]) -> peers.Target:
    """An `--instant` simulated replica with a Citadel gateway in front; both
    join `procs` (for the caller to stop); returns the gateway."""
    sim = start(
        f"{name}-sim",
        simulator_argv(1, "--instant", "--default-max-tokens", str(REPLY_TOKENS)),
        log_dir,
    )
    procs.append(sim)
    backend = f"http://127.0.0.1:{wait_listening(sim)[0]}"
    gateway = peers.start_citadel([backend], log_dir, name=f"citadel-{name}")
    procs.append(gateway.proc)
    return gateway


def profile_citadel(log_dir: Path, seconds: float, py_spy: Path) -> list[str]:
    """py-spy on the gateway at concurrency 64, non-streaming: the functions with
    the most samples (self time), as text lines."""
    procs: list[Proc] = []
    try:
        gateway = start_instant_citadel(log_dir, "profile", procs)
        out = log_dir / "citadel-profile.txt"
        # py-spy's own default rate (100 a second), as this profile always had.
        spy = start_sampling(py_spy, gateway.proc.pid, out, log_dir, rate=100)
        chat = gateway.url + "/v1/chat/completions"
        try:
            asyncio.run(
                loadgen.closed_loop(
                    chat, body(False), 64, 10**6, seconds, gateway.headers
                )
            )
        finally:
            collapsed = stop_sampling(spy, out)
        return top_functions(collapsed)
    finally:
        for proc in reversed(procs):
            stop(proc)
