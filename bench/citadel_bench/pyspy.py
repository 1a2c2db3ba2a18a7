"""py-spy around a Python process of the benchmark: sampling it, its hottest
frames, and where a proxy's CPU goes by kind of work."""

from __future__ import annotations

import signal
from dataclasses import dataclass
from pathlib import Path

from citadel_bench.procs import Proc, start, stop


def start_sampling(
    py_spy: Path | None, pid: int, out: Path, log_dir: Path, rate: int = 25
) -> Proc | None:
    """py-spy sampling `pid` into `out` (raw stacks) until `stop_sampling`;
    `rate` samples a second, without pausing the process, to disturb it little.
    None without py-spy."""
    if py_spy is None:
        return None
    argv = [str(py_spy), "record", "--format", "raw", "--nonblocking"]
    argv += ["-r", str(rate), "-o", str(out), "-p", str(pid)]
    return start(f"py-spy-{out.stem}", argv, log_dir)


def stop_sampling(spy: Proc | None, out: Path) -> str:
    """Stops py-spy (it writes its stacks on SIGINT); the stacks, "" if none."""
    if spy is None:
        return ""
    stop(spy, timeout_s=30, first=signal.SIGINT)
    return out.read_text() if out.exists() else ""


def _stacks(collapsed: str) -> list[tuple[list[str], int]]:
    """py-spy's collapsed stacks ("frame;frame;frame N" lines), outermost
    frame first, with their sample counts."""
    stacks = []
    for line in collapsed.splitlines():
        stack, _, n = line.rpartition(" ")
        if stack and n.isdigit():
            stacks.append((stack.split(";"), int(n)))
    return stacks


def top_functions(collapsed: str, count: int = 12) -> list[str]:
    """Self-time and inclusive shares of the hottest frames in py-spy's collapsed
    stacks."""
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for frames, samples in _stacks(collapsed):
        total += samples
        own[frames[-1]] = own.get(frames[-1], 0) + samples
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + samples
    if not total:
        return []
    ranked = sorted(own.items(), key=lambda kv: -kv[1])[:count]
    return [
        f"{100 * n / total:5.1f}% self, {100 * inclusive[f] / total:5.1f}% incl  {f}"
        for f, n in ranked
    ]


@dataclass(frozen=True)
class Category:
    """A kind of work, told by the source files of its frames."""

    name: str
    markers: tuple[str, ...]
    """Path fragments (as py-spy prints a frame's file) of this work."""


_GATEWAY = "citadel/gateway/"
PROXY_CATEGORIES = (
    Category("log lines", ("logging/__init__.py", f"{_GATEWAY}logs.py")),
    Category("metrics", ("prometheus_client/", f"{_GATEWAY}metrics.py")),
    Category("request body: parse, check, write", (f"{_GATEWAY}services/requests.py",)),
    Category(
        "routing: prefix hashes, strategy",
        tuple(
            f"{_GATEWAY}services/{m}.py"
            for m in ("prefix", "strategies", "routing", "replicas")
        ),
    ),
    Category(
        "keys and limits",
        tuple(f"{_GATEWAY}services/{m}.py" for m in ("auth", "limits", "buckets")),
    ),
    Category(
        "stream: events and usage",
        (f"{_GATEWAY}services/sse.py", f"{_GATEWAY}services/streams.py"),
    ),
    Category("upstream client", (f"{_GATEWAY}upstream.py",)),
    Category(
        "HTTP server (uvicorn, httptools)",
        ("uvicorn/", "starlette/", f"{_GATEWAY}protocol.py"),
    ),
    Category("other gateway code (doors, proxy, errors)", (_GATEWAY,)),
    # Without a kind of their own, the relay's frames went to uvicorn's
    # around them (the HTTP server's).
    Category("the bare relay's own code (placement)", ("citadel_bench/relay.py",)),
    Category("event loop (uvloop: sockets, callbacks)", ("asyncio/", "uvloop/")),
)
"""The gateway's work per request, by kind, for `categorize`; the bare relay's
frames fall into the same kinds, and its own file into a kind of its own."""

OTHER = "other"


def categorize(collapsed: str, categories: tuple[Category, ...]) -> dict[str, int]:
    """Samples per category: each stack goes to the innermost frame that some
    category's marker names (where the CPU was spent, not who called it:
    uvicorn's send called by the stream relay is the HTTP server's), `OTHER`
    when none does. Every category is present, with 0 when no stack fell in."""
    counts = dict.fromkeys([c.name for c in categories] + [OTHER], 0)
    for frames, samples in _stacks(collapsed):
        counts[_category_of(frames, categories)] += samples
    return counts


def _category_of(frames: list[str], categories: tuple[Category, ...]) -> str:
    for frame in reversed(frames):
        for category in categories:
            if any(marker in frame for marker in category.markers):
                return category.name
    return OTHER
