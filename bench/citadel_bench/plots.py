"""PNG plots of the results (matplotlib, Agg backend)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from citadel_bench.memory import MemoryRun
from citadel_bench.operator_scale import ScaleRun
from citadel_bench.overhead import Point
from citadel_bench.routing import RoutingResult


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def overhead_plot(points: list[Point], path: Path) -> None:
    """Latency distributions (last round) per target, one panel per mode x
    concurrency."""
    plt = _pyplot()
    modes = sorted({p.mode for p in points})
    levels = sorted({p.concurrency for p in points})
    last = max(p.round for p in points)
    fig, axes = plt.subplots(
        len(modes), len(levels), figsize=(4 * len(levels), 3.2 * len(modes))
    )
    for i, mode in enumerate(modes):
        for j, level in enumerate(levels):
            ax = axes[i][j]
            chosen = [
                p
                for p in points
                if p.mode == mode and p.concurrency == level and p.round == last
            ]
            ax.boxplot(
                [p.latencies_ms or [0.0] for p in chosen],
                tick_labels=[p.target for p in chosen],
                showfliers=False,
            )
            ax.set_yscale("log")
            ax.set_title(f"{mode}, concurrency {level}")
            ax.set_ylabel("latency (ms)")
            ax.tick_params(axis="x", labelrotation=20)
    _save(plt, fig, path)


def routing_plot(result: RoutingResult, path: Path) -> None:
    """TTFT distribution per routing target on one workload."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(11, 4))
    runs = result.runs
    names = [r.target for r in runs]
    ax.boxplot([r.ttfts_ms or [0.0] for r in runs], tick_labels=names, showfliers=False)
    ax.set_title(result.workload.name)
    ax.set_ylabel("time to first token (ms)")
    ax.tick_params(axis="x", labelrotation=35)
    _save(plt, fig, path)


def scale_plot(run: ScaleRun, path: Path) -> None:
    """Deployments seen and models Ready over time."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    t = [c[0] for c in run.curve]
    ax.plot(t, [c[1] for c in run.curve], label="Deployments")
    ax.plot(t, [c[2] for c in run.curve], label="LLMModels Ready")
    ax.set_xlabel("seconds since the first apply")
    ax.set_ylabel("count")
    ax.legend()
    _save(plt, fig, path)


def memory_plot(run: MemoryRun, path: Path) -> None:
    """Gateway RSS against requests served."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 3.5))
    ax.plot([c[0] for c in run.curve], [c[1] for c in run.curve], marker="o")
    ax.axvline(run.warmup, color="grey", linestyle="--", label="end of the warm-up")
    ax.legend(loc="lower right")
    ax.set_xlabel("requests")
    ax.set_ylabel("gateway RSS (MiB)")
    ax.set_ylim(bottom=0)
    _save(plt, fig, path)
