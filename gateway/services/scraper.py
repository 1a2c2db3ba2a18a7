"""Reads each replica's vLLM `/metrics` on a short period, for `kv-aware` routing
and load shedding.

Only replicas of models routed `kv-aware`, or watched for shedding (a
sheddable request lately, `LoadShedder.watched`), are read. A replica that
cannot be read loses its last report (routed by its requests in flight alone
until it answers again, and never taken for full); its health is judged by real
requests, not by this.
"""

from __future__ import annotations

import asyncio
import logging
import math
from collections.abc import Callable, Collection

from citadel.gateway.routes import RoutingStrategy
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.replicas import LoadReport, Replica
from citadel.gateway.upstream import UpstreamClient, UpstreamFailure

log = logging.getLogger(__name__)

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
_READ = frozenset((RUNNING, WAITING, *KV_USAGE))
STALE_AFTER_PERIODS = 5
"""Scrape periods after which a report no longer counts: a round takes two
periods at most once hung replicas are found out (`MetricsScraper.scrape_once`)
and the next starts a period later, so three pass between reports."""
MAX_CONCURRENT_SCRAPES = 32
"""Replicas whose `/metrics` are read at once. All at once, thousands of
replicas opened thousands of connections together every period, and their
answers were all parsed in one burst on the event loop that serves requests.
A read and parse of the simulator's page takes 0.22 ms here (median of 200,
bench/simulator); the CPU vLLM 0.32's page (51 KB after a few requests) parses
in 0.18 ms and takes 5.6 ms to read, vLLM's own rendering (medians of 200 and
50, on this 2-core machine): at 6 ms a read, 32 readers read a thousand
replicas (31 each) in 0.2 s, a tenth of the default 2 s period. A replica
that does not answer holds a reader for a period at most (its read's
timeout), and no read of a replica that failed last time starts after a
round's first period: replicas that answered are read first, so many that
hang cannot keep every report stale (see `MetricsScraper`)."""


def report_max_age_s(period_s: float) -> float:
    """How old a load report may be and still count, for a scrape period."""
    return STALE_AFTER_PERIODS * period_s


def parse_vllm_metrics(text: str, now: float) -> LoadReport:
    """The load figures in a Prometheus text exposition.

    vLLM with `--data-parallel-size` above 1 exports each figure once per engine
    (label `engine`): the requests running and waiting are summed over them, and
    the KV-cache use, a fraction of each engine's own cache, is their mean (two
    engines at 0.9 are a pod at 0.9, not 1.8). A sample that is not a finite
    number (`NaN`, `+Inf`, `-Inf`, or no number) makes its figure None, as a
    missing one is: read as 0, it made a replica that exports none look idle
    to `kv-aware`, and the other engines' sum alone, a pod busier than it
    looked.
    """
    sums: dict[str, float] = {}
    counts: dict[str, int] = {}
    # A figure one engine's sample of is left out is not known in full: the
    # other engines' sum alone made a pod look idler than one that reports.
    unknown: set[str] = set()
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        sample = _sample(line)
        if sample is not None:
            name, value = sample
            if value is None:
                unknown.add(name)
                continue
            sums[name] = sums.get(name, 0.0) + value
            counts[name] = counts.get(name, 0) + 1
    for name in unknown:
        sums.pop(name, None)
    kv = next((sums[n] / counts[n] for n in KV_USAGE if n in sums), None)
    return LoadReport(sums.get(RUNNING), sums.get(WAITING), kv, now)


def _sample(line: str) -> tuple[str, float | None] | None:
    """The name and value of a sample line of a figure read (the value None
    when it is not a finite number), else None.

    A sample is `name{labels} value [timestamp]`: the value is the first field
    after the labels (not the last, which is the timestamp when there is one),
    and a quoted label value may hold spaces and braces.
    """
    brace = line.find("{")
    name = line.split(maxsplit=1)[0] if brace == -1 else line[:brace].rstrip()
    # Checked before the labels are read: most lines are histograms' buckets.
    if name not in _READ:
        return None
    rest = line[len(name) :] if brace == -1 else line[_after_labels(line, brace) :]
    values = rest.split()
    if not values:
        return None
    try:
        value = float(values[0])
    except ValueError:
        return name, None
    # Prometheus text allows NaN and +-Inf; neither measures a load, and a NaN
    # score would win kv-aware's min() (nothing compares below it): such a
    # sample counts as absent, like a figure the replica does not export.
    return (name, value) if math.isfinite(value) else (name, None)


def _after_labels(line: str, brace: int) -> int:
    """The index just past the `}` that closes the labels opened at `brace`."""
    quoted = escaped = False
    for i in range(brace + 1, len(line)):
        char = line[i]
        if escaped:
            escaped = False
        elif char == "\\":
            escaped = quoted
        elif char == '"':
            quoted = not quoted
        elif char == "}" and not quoted:
            return i + 1
    return len(line)


class MetricsScraper:
    """The background task that keeps `Replica.load` fresh.

    Args:
        catalog: which replicas exist and how their models are routed.
        upstream: the shared client.
        period_s: time between two reads of the same replica.
        clock: monotonic seconds.
        watched: the models (namespace, name) to read besides those routed
            `kv-aware`, asked at each round.
    """

    def __init__(
        self,
        catalog: Catalog,
        upstream: UpstreamClient,
        period_s: float,
        clock: Callable[[], float],
        watched: Callable[[], Collection[tuple[str, str]]] = frozenset,
    ) -> None:
        self._catalog = catalog
        self._watched = watched
        self._upstream = upstream
        self._period = period_s
        self._clock = clock
        self._failed: set[str] = set()
        """Replicas whose last read failed: read after the others."""
        self._tried_at: dict[str, float] = {}
        """When each replica's last read started: among the failed, the one
        tried longest ago goes first, so a round cut short skips no one for
        good."""

    async def run(self) -> None:
        """Scrapes until cancelled."""
        while True:
            await self.scrape_once()
            await asyncio.sleep(self._period)

    async def scrape_once(self) -> None:
        """Reads every replica of a `kv-aware` or watched model once,
        `MAX_CONCURRENT_SCRAPES` at a time: those that answered last time (or
        are new) first, then those whose read failed, the least recently tried
        first, starting none of these after one period.

        Reads that hang hold their readers a period each: with more of them
        than readers, a round that read every replica lasted a period per 32
        of them, and the reports of the replicas that answer, read once per
        round, grew older than `STALE_AFTER_PERIODS` (200 hung replicas: a
        report every 8 periods). Now, once found out, hung replicas hold a
        round to two periods and the replicas that answer are read in each;
        the round in which many start to hang at once lasts a period per 32
        of them, as every round did before.
        """
        watched = self._watched()
        replicas = {
            r.url: r
            for route in self._catalog.routes()
            if route.strategy is RoutingStrategy.KV_AWARE
            or (route.namespace, route.name) in watched
            for r in self._catalog.replicas(route)
        }
        self._failed &= replicas.keys()
        for gone in self._tried_at.keys() - replicas.keys():
            del self._tried_at[gone]
        order = sorted(
            replicas.values(),
            key=lambda r: (r.url in self._failed, self._tried_at.get(r.url, 0.0)),
        )
        stop_at = self._clock() + self._period
        # One iterator shared by the readers: each takes the next replica as
        # it finishes one, so no more reads run at once than there are readers.
        todo = iter(order)

        async def reader() -> None:
            for replica in todo:
                now = self._clock()
                # Only the failed wait for the next round: a replica that
                # answered last time is read even late, or a batch of them
                # hanging at once (a node gone) kept the rest unread, round
                # after round, until they were all found out.
                if now > stop_at and replica.url in self._failed:
                    return
                self._tried_at[replica.url] = now
                await self._scrape(replica)

        readers = min(MAX_CONCURRENT_SCRAPES, len(replicas))
        await asyncio.gather(*(reader() for _ in range(readers)))

    async def _scrape(self, replica: Replica) -> None:
        try:
            response = await self._upstream.request(
                "GET", replica.url + "/metrics", timeout_s=self._period
            )
            text = (await response.read()).decode(errors="replace")
        except UpstreamFailure as err:
            log.debug(
                "metrics scrape failed", extra={"replica": replica.url, "error": err}
            )
            replica.load = LoadReport()
            self._failed.add(replica.url)
            return
        if response.status == 200:
            replica.load = parse_vllm_metrics(text, self._clock())
            replica.load_read_at = replica.load.scraped_at
            self._failed.discard(replica.url)
        else:
            self._failed.add(replica.url)
            # The last figures would be trusted for ever, and the replica whose
            # /metrics fails is as likely as not the busiest one.
            replica.load = LoadReport()
