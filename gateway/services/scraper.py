"""Reads each replica's vLLM `/metrics` on a short period, for `kv-aware` routing.

Only replicas of models routed `kv-aware` are read. A replica that cannot be read
loses its last report (routed by its requests in flight alone until it answers
again); its health is judged by real requests, not by this.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from citadel.gateway.routes import RoutingStrategy
from citadel.gateway.services.catalog import Catalog
from citadel.gateway.services.replicas import LoadReport, Replica
from citadel.gateway.upstream import UpstreamClient, UpstreamFailure

log = logging.getLogger(__name__)

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc")
STALE_AFTER_PERIODS = 5
"""Scrape periods after which a report no longer counts: a scrape may take a
period and the next one starts a period later, so two periods pass between
reports in the worst case."""


def report_max_age_s(period_s: float) -> float:
    """How old a load report may be and still count, for a scrape period."""
    return STALE_AFTER_PERIODS * period_s


def parse_vllm_metrics(text: str, now: float) -> LoadReport:
    """The load figures in a Prometheus text exposition (summed over labels)."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith("vllm:"):
            continue
        name_part, _, value = line.rpartition(" ")
        name = name_part.split("{", 1)[0].strip()
        try:
            sums[name] = sums.get(name, 0.0) + float(value)
        except ValueError:
            continue
    kv = next((sums[n] for n in KV_USAGE if n in sums), 0.0)
    return LoadReport(sums.get(RUNNING, 0.0), sums.get(WAITING, 0.0), kv, now)


class MetricsScraper:
    """The background task that keeps `Replica.load` fresh.

    Args:
        catalog: which replicas exist and how their models are routed.
        upstream: the shared client.
        period_s: time between two reads of the same replica.
        clock: monotonic seconds.
    """

    def __init__(
        self,
        catalog: Catalog,
        upstream: UpstreamClient,
        period_s: float,
        clock: Callable[[], float],
    ) -> None:
        self._catalog = catalog
        self._upstream = upstream
        self._period = period_s
        self._clock = clock

    async def run(self) -> None:
        """Scrapes until cancelled."""
        while True:
            await self.scrape_once()
            await asyncio.sleep(self._period)

    async def scrape_once(self) -> None:
        """Reads every `kv-aware` replica once, all at the same time."""
        replicas = {
            r.url: r
            for route in self._catalog.routes()
            if route.strategy is RoutingStrategy.KV_AWARE
            for r in self._catalog.replicas(route)
        }
        await asyncio.gather(*(self._scrape(r) for r in replicas.values()))

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
            return
        if response.status == 200:
            replica.load = parse_vllm_metrics(text, self._clock())
            replica.load_read_at = replica.load.scraped_at
        else:
            # The last figures would be trusted for ever, and the replica whose
            # /metrics fails is as likely as not the busiest one.
            replica.load = LoadReport()
