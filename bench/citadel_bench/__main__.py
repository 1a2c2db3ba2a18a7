"""`python -m citadel_bench`: every benchmark, then docs/benchmarks.md and plots.

BENCH_QUICK=1 runs a small version of each (a few minutes). A part that fails is
reported as such in the document and the others still run.
"""

from __future__ import annotations

import argparse
import functools
import os
import shutil
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from citadel_bench import plots
from citadel_bench.config import FULL, QUICK, BenchConfig
from citadel_bench.document import (
    Results,
    gateways_part,
    routing_figure,
    routing_part,
    write_document,
)
from citadel_bench.gateways import run_gateways
from citadel_bench.memory import run_memory
from citadel_bench.operator_scale import run_scale
from citadel_bench.overhead import profile_citadel, run_overhead
from citadel_bench.routing import run_routing
from citadel_bench.shedding import run_shedding
from citadel_bench.vllm_check import run_check

T = TypeVar("T")


def attempt(results: Results, part: str, run: Callable[[], T]) -> T | None:
    """Runs one part; a failure is noted in `results.failures`."""
    began = time.monotonic()
    print(f"== {part}", flush=True)
    try:
        return run()
    except Exception:
        results.failures[part] = traceback.format_exc(limit=3)[-1500:]
        print(results.failures[part], flush=True)
        return None
    finally:
        results.durations[part] = time.monotonic() - began


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m citadel_bench")
    parser.add_argument("--out", type=Path, default=Path("docs"))
    parser.add_argument(
        "--only",
        nargs="*",
        default=None,
        help="parts to run: check overhead profile routing gateways shedding memory "
        "scale",
    )
    args = parser.parse_args()
    config: BenchConfig = QUICK if os.environ.get("BENCH_QUICK") == "1" else FULL
    wanted = set(
        args.only
        or [
            "check",
            "overhead",
            "profile",
            "routing",
            "gateways",
            "shedding",
            "memory",
            "scale",
        ]
    )
    log_dir = Path(tempfile.mkdtemp(prefix="citadel-bench-"))
    print(f"logs in {log_dir}", flush=True)
    results = Results.start(config)
    figures = args.out / "benchmarks"
    figures.mkdir(parents=True, exist_ok=True)
    if "check" in wanted and config.vllm_check:
        found = attempt(results, "simulator check", lambda: run_check(log_dir))
        if found:
            results.check_rows, results.check_skipped = found
    if "overhead" in wanted:
        results.overhead = attempt(
            results,
            "overhead",
            lambda: run_overhead(
                log_dir, config.overhead_rounds, config.overhead_seconds
            ),
        )
        if results.overhead:
            plots.overhead_plot(results.overhead.points, figures / "overhead.png")
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    if "profile" in wanted and Path(py_spy).exists():
        results.profile = attempt(
            results,
            "profile",
            lambda: profile_citadel(log_dir, config.profile_seconds, Path(py_spy)),
        )
    if "routing" in wanted:
        # One part per workload, so that one failing still reports the other.
        for workload in config.routing:
            found_routing = attempt(
                results,
                routing_part(workload),
                functools.partial(
                    run_routing,
                    workload,
                    log_dir,
                    config.routing_deadline_s,
                    config.routing_rounds,
                    Path(py_spy) if Path(py_spy).exists() else None,
                ),
            )
            if found_routing:
                results.routing.append(found_routing)
                plots.routing_plot(found_routing, figures / routing_figure(workload))
    if "gateways" in wanted:
        # One part per workload, as routing.
        for workload in config.gateways:
            found_gateways = attempt(
                results,
                gateways_part(workload),
                functools.partial(
                    run_gateways,
                    workload,
                    log_dir,
                    config.gateways_deadline_s,
                    config.gateways_rounds,
                ),
            )
            if found_gateways:
                results.gateways.append(found_gateways)
    if "shedding" in wanted:
        results.shedding = attempt(
            results,
            "shedding",
            lambda: run_shedding(log_dir, config.shedding_seconds),
        )
    if "memory" in wanted:
        results.memory = attempt(
            results, "memory", lambda: run_memory(log_dir, config.memory_requests)
        )
        if results.memory:
            plots.memory_plot(results.memory, figures / "memory.png")
    if "scale" in wanted:
        results.scale = attempt(
            results,
            "operator scale",
            lambda: run_scale(
                log_dir,
                config.scale_models,
                config.scale_nodes,
                config.scale_timeout_s,
                Path(py_spy) if Path(py_spy).exists() else None,
            ),
        )
        if results.scale and results.scale.curve:
            plots.scale_plot(results.scale, figures / "operator-scale.png")
    results.finish()
    path = args.out / "benchmarks.md"
    write_document(results, path, figures)
    print(f"wrote {path}", flush=True)


if __name__ == "__main__":
    main()
