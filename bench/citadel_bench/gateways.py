"""Prefix-aware routing through two gateway replicas, as the Helm chart runs them
(two behind one Service, no session affinity): each request of a conversation
goes to one of the gateways at random, and each gateway's `prefix-aware` table
knows only what it placed itself, unless the gateways share their placements
through Redis. One gateway is the reference.

Where each turn went comes from the gateways' access logs: every request
carries its conversation and turn as `x-request-id`, which the gateway logs as
sent with the replica it chose.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import shutil
import socket
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from citadel_bench import peers
from citadel_bench.procs import (
    Proc,
    free_port,
    simulator_argv,
    start,
    stop,
    wait_listening,
)
from citadel_bench.routing import (
    REPLICAS,
    SIM_OPTIONS,
    RoutingRun,
    drive,
    merge_rounds,
    replica_counters,
    routing_run,
)
from citadel_bench.workload import ChatWorkload

STRATEGY = "prefix-aware"
"""The strategy every gateway runs (Citadel's default)."""

SHARE_ENV = "CITADEL_GATEWAY_SHARE_PLACEMENTS"
"""The gateway's setting that turns the sharing of placements through Redis on
(default) or off."""

PICKER_SEED = 2
"""Seeds the choice of gateway: every run of every two-gateway target sends
each user's requests to the same gateways in the same order."""


@dataclass(frozen=True)
class Setup:
    """One target: how many gateways, and what they share.

    Attributes:
        target: what the report calls it.
        gateways: gateway processes, each request sent to one at random.
        redis: whether they share a Redis (`CITADEL_GATEWAY_REDIS_URL`).
        share: `SHARE_ENV`'s value, or None to leave it unset (the default).
    """

    target: str
    gateways: int
    redis: bool = False
    share: str | None = None

    def env(self, redis_url: str | None) -> dict[str, str]:
        """The gateways' settings besides `peers.citadel_env`'s."""
        env: dict[str, str] = {}
        if self.redis:
            if not redis_url:
                raise ValueError(f"{self.target} needs a Redis URL")
            env["CITADEL_GATEWAY_REDIS_URL"] = redis_url
        if self.share is not None:
            env[SHARE_ENV] = self.share
        return env


ONE = Setup("citadel:1-gateway", 1)
TWO = Setup("citadel:2-gateways", 2)
TWO_REDIS = Setup("citadel:2-gateways-redis", 2, redis=True)
TWO_REDIS_UNSHARED = Setup(
    "citadel:2-gateways-redis-unshared", 2, redis=True, share="false"
)
SETUPS = (ONE, TWO, TWO_REDIS, TWO_REDIS_UNSHARED)
"""Every target, the reference first."""


def gateway_picker(urls: Sequence[str], seed: int) -> Callable[[int], str]:
    """The gateway for user N's next request: one of `urls` at random, each
    request on its own.

    Each user draws from a `random.Random` of its own, seeded by `seed` and the
    user, so the sequence a user sees does not depend on how the users'
    requests interleave: every run with the same seed sends each user's
    requests to the same gateways.

    Raises:
        ValueError: no URL.
    """
    if not urls:
        raise ValueError("no gateway to pick from")
    choices = list(urls)
    draws: dict[int, random.Random] = {}

    def pick(user: int) -> str:
        rng = draws.get(user)
        if rng is None:
            rng = draws[user] = random.Random(f"{seed}/{user}")
        return rng.choice(choices)

    return pick


@dataclass(frozen=True)
class Placement:
    """Where one turn of a conversation went (from a gateway's log)."""

    session: str
    turn: int
    replica: str


def placements(lines: Iterable[str]) -> list[Placement]:
    """The placements in a gateway's log: its `request` lines whose request id
    is a conversation's turn (`routing.turn_request_id`) and that name a
    replica; every other line is passed over."""
    found: list[Placement] = []
    for line in lines:
        if not line.startswith("{"):
            continue
        try:
            entry = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if not isinstance(entry, dict) or entry.get("msg") != "request":
            continue
        session, replica = entry.get("session"), entry.get("replica")
        request_id = entry.get("request_id")
        if not (isinstance(session, str) and isinstance(replica, str)):
            continue
        if not isinstance(request_id, str):
            continue
        head, _, turn = request_id.rpartition(".")
        if head != session or not turn.isdigit():
            continue
        found.append(Placement(session, int(turn), replica))
    return found


@dataclass(frozen=True)
class Moves:
    """How often a conversation's turn went to another replica than its turn
    before.

    Attributes:
        moved: turns placed apart from the turn before.
        followed: turns whose turn before was placed too (the later turns).
    """

    moved: int = 0
    followed: int = 0

    @property
    def per_1000(self) -> float:
        """Moves per 1,000 later turns (NaN for none)."""
        return 1000 * self.moved / self.followed if self.followed else float("nan")

    def __add__(self, other: Moves) -> Moves:
        return Moves(self.moved + other.moved, self.followed + other.followed)


def count_moves(placed: Iterable[Placement]) -> Moves:
    """The moves between consecutive turns of each conversation, from every
    gateway's placements together (in any order).

    Raises:
        ValueError: a turn placed twice (logs of two runs mixed).
    """
    by_session: dict[str, dict[int, str]] = {}
    for p in placed:
        turns = by_session.setdefault(p.session, {})
        if p.turn in turns:
            raise ValueError(f"turn {p.turn} of {p.session} placed twice")
        turns[p.turn] = p.replica
    moved = followed = 0
    for turns in by_session.values():
        for turn, replica in turns.items():
            before = turns.get(turn - 1)
            if before is not None:
                followed += 1
                moved += before != replica
    return Moves(moved, followed)


@dataclass
class GatewaysRun:
    """One target's results on a workload: the routing part's measures and
    the moves."""

    run: RoutingRun
    moves: Moves

    @property
    def target(self) -> str:
        return self.run.target


@dataclass
class GatewaysResult:
    """Every target's run on one workload.

    Attributes:
        workload: what ran.
        runs: one per target that ran, in the order of `SETUPS`.
        skipped: target -> why it did not run.
    """

    workload: ChatWorkload
    runs: list[GatewaysRun] = field(default_factory=list)
    skipped: dict[str, str] = field(default_factory=dict)


def wait_redis(proc: Proc, port: int, timeout_s: float = 30.0) -> None:
    """Waits until Redis answers PING (bounded); raises with the log's tail."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited:\n{proc.tail()}")
        with (
            contextlib.suppress(OSError),
            socket.create_connection(("127.0.0.1", port), timeout=1) as conn,
        ):
            conn.sendall(b"PING\r\n")
            if conn.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.1)
    raise RuntimeError(f"{proc.name} not ready in {timeout_s}s:\n{proc.tail()}")


def start_redis(log_dir: Path, name: str) -> tuple[Proc, str]:
    """A local `redis-server` with no persistence; returns it and its URL.

    Raises:
        RuntimeError: not installed, or it did not start.
    """
    server = shutil.which("redis-server")
    if server is None:
        raise RuntimeError("redis-server is not installed")
    port = free_port()
    argv = [server, "--port", str(port), "--bind", "127.0.0.1"]
    argv += ["--save", "", "--appendonly", "no"]
    proc = start(name, argv, log_dir)
    try:
        wait_redis(proc, port)
    except RuntimeError:
        stop(proc)
        raise
    return proc, f"redis://127.0.0.1:{port}/0"


def _slug(target: str) -> str:
    return target.replace(":", "-")


def run_target(
    setup: Setup, workload: ChatWorkload, log_dir: Path, deadline_s: float
) -> GatewaysRun:
    """Fresh replicas (cold caches), a fresh Redis and fresh gateways for one
    target; the workload through them; the moves from the gateways' logs.

    Raises:
        RuntimeError: a process did not start, or the logs miss requests.
    """
    procs: list[Proc] = []
    gateways: list[peers.Target] = []
    slug = _slug(setup.target)
    try:
        sim = start(f"sim-{slug}", simulator_argv(REPLICAS, *SIM_OPTIONS), log_dir)
        procs.append(sim)
        backends = [f"http://127.0.0.1:{p}" for p in wait_listening(sim)]
        redis_url = None
        if setup.redis:
            redis, redis_url = start_redis(log_dir, f"redis-{slug}")
            procs.append(redis)
        files = peers.citadel_files(backends, log_dir, STRATEGY, slug)
        names = [f"{slug}-gw{n + 1}" for n in range(setup.gateways)]
        gateways = peers.start_gateways(files, log_dir, names, setup.env(redis_url))
        procs += [gateway.proc for gateway in gateways]
        url_for = gateway_picker([g.url for g in gateways], PICKER_SEED)
        # Read before the workload: the gateways' probes stay out of it.
        before = replica_counters(backends)
        cpu_before = sum(g.proc.cpu_seconds() for g in gateways)
        samples, wall = asyncio.run(
            drive(workload, url_for, deadline_s, files.headers, request_ids=True)
        )
        cpu_s = sum(g.proc.cpu_seconds() for g in gateways) - cpu_before
        counted = replica_counters(backends).since(before)
    finally:
        for proc in reversed(procs):
            stop(proc)
    # Read once stopped: a gateway writes its last lines as it ends.
    placed = [
        p
        for g in gateways
        for p in placements(g.proc.log.read_text(errors="replace").splitlines())
    ]
    ok = [(turn, s) for turn, s in samples if s.ok]
    if len(placed) < len(ok):
        raise RuntimeError(
            f"the gateways logged {len(placed)} placements for {len(ok)} requests"
        )
    run = routing_run(setup.target, workload, samples, wall, counted, cpu_s)
    return GatewaysRun(run, count_moves(placed))


def merge(runs: list[GatewaysRun]) -> GatewaysRun:
    """One target's rounds as one run (`routing.merge_rounds`), moves summed."""
    moves = Moves()
    for run in runs:
        moves += run.moves
    return GatewaysRun(merge_rounds([run.run for run in runs]), moves)


def run_gateways(
    workload: ChatWorkload,
    log_dir: Path,
    deadline_s: float,
    rounds: int = 1,
    setups: Sequence[Setup] = SETUPS,
) -> GatewaysResult:
    """Every target, `rounds` times over, the order rotated each round (as the
    routing part does); a target's rounds are pooled. A target that fails in
    any round is left out, with why."""
    result = GatewaysResult(workload)
    done: dict[str, list[GatewaysRun]] = {s.target: [] for s in setups}
    for n in range(rounds):
        round_dir = log_dir / f"gateways-{workload.slug}-round-{n + 1}"
        round_dir.mkdir(parents=True, exist_ok=True)
        for setup in [*setups[n % len(setups) :], *setups[: n % len(setups)]]:
            if setup.target in result.skipped:
                continue
            try:
                found = run_target(setup, workload, round_dir, deadline_s)
            except RuntimeError as err:
                result.skipped[setup.target] = f"did not run: {str(err)[-300:]}"
                continue
            done[setup.target].append(found)
            run = found.run
            print(
                f"gateways {workload.slug} round {n + 1} {setup.target:34} "
                f"n={run.requests} err={run.errors} "
                f"ttft mean={run.ttft.mean:7.1f}ms later={run.later_mean_ms:7.1f}ms "
                f"hit={run.hit_rate:.2f} moves={found.moves.moved}/"
                f"{found.moves.followed}",
                flush=True,
            )
    result.runs = [
        merge(done[s.target])
        for s in setups
        if done[s.target] and s.target not in result.skipped
    ]
    return result
