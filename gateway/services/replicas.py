"""Replicas: where a model is served, what load they carry, whether they are healthy.

Health is passive: a replica that fails `eject_after` times in a row is taken out of
rotation for a back-off that doubles with each ejection in a row (up to a maximum),
then re-admitted on trial; one success makes it healthy again. An ejection lasts its
period, as Envoy's outlier detection has it: what the requests in flight when it
began do, meanwhile or after it, well or not, changes nothing. Only a request sent
since the replica's latest ejection judges it.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Endpoint:
    """One address behind a model's Service, as discovery reports it.

    `ready` replicas take new requests; `serving` but `terminating` ones are used
    only when no replica is ready (they still finish their work). `pod` is the
    uid of the pod behind the address when discovery knows it (an IP is reused
    by another pod soon after its pod is gone).
    """

    url: str
    ready: bool = True
    serving: bool = True
    terminating: bool = False
    pod: str | None = None


@dataclass(frozen=True)
class EjectionPolicy:
    """When a failing replica leaves rotation and for how long."""

    eject_after: int = 3
    base_s: float = 5.0
    max_s: float = 60.0


@dataclass
class LoadReport:
    """What a replica's vLLM `/metrics` said at the last scrape: each figure
    None when the replica did not export it (or only as NaN or an infinity),
    since a 0 in its place would read as an idle replica."""

    running: float | None = None
    waiting: float | None = None
    kv_cache_usage: float | None = None
    scraped_at: float | None = None

    def stale(self, now: float, max_age_s: float) -> bool:
        """True when there is no report (none read yet, or the last read
        failed) or it is older than `max_age_s` at `now`: its figures do not
        count."""
        return self.scraped_at is None or self.scraped_at < now - max_age_s

    def figures(self) -> tuple[float | None, float | None, float | None]:
        """Requests running, requests waiting, KV-cache use (None: not
        exported)."""
        return self.running, self.waiting, self.kv_cache_usage


@dataclass(eq=False)
class Replica:
    """One model server, with the state the gateway keeps about it."""

    url: str
    in_flight: int = 0
    failures: int = 0
    ejections_in_row: int = 0
    ejected_until: float = 0.0
    ejections: int = 0
    """How many times it was ejected. A request notes it when it takes the
    replica and hands it back with its result (`record_success`,
    `record_failure`): a different count says an ejection came in between."""
    load: LoadReport = field(default_factory=LoadReport)
    load_read_at: float | None = None
    """When its `/metrics` last answered, kept when a later read fails and
    drops `load` (for /admin/replicas: since when the load is unknown)."""

    def available(self, now: float) -> bool:
        """True unless the replica is ejected at `now`."""
        return now >= self.ejected_until

    def _judged_by(self, now: float, seen: int) -> bool:
        """Whether a result at `now`, of a request sent when the replica had
        been ejected `seen` times, says anything of its health.

        A request sent before the latest ejection says nothing, whenever it
        ends: LLM streams outlast the back-off, and the trial after it is the
        first request sent once it is over. Nor does one that ends while the
        replica is ejected (sent meanwhile, as a guess when every replica is
        ejected): the ejection lasts its period.
        """
        return seen == self.ejections and now >= self.ejected_until

    def record_success(self, now: float, seen: int) -> None:
        """A request completed: the replica is healthy.

        Args:
            now: when it completed.
            seen: the replica's `ejections` when the request took it. A success
                of a request sent before the latest ejection (a long stream,
                as likely as not) counts for nothing: counted, it would end the
                ejections in a row, so the replica would come back needing
                `eject_after` failures, each a client's error, where one failed
                trial should eject it again for twice as long.
        """
        if not self._judged_by(now, seen):
            return
        self.failures = 0
        self.ejections_in_row = 0

    def record_failure(self, now: float, policy: EjectionPolicy, seen: int) -> bool:
        """A request failed; returns True when this failure ejects the replica.

        Args:
            now: when it failed.
            policy: when to eject, and for how long.
            seen: the replica's `ejections` when the request took it. A failure
                of a request sent before the latest ejection counts for
                nothing: it is not the trial after it, and counted, it would
                eject the replica again, doubling the back-off, once per
                request that was in flight, before any trial was sent.
        """
        if not self._judged_by(now, seen):
            return False
        self.failures += 1
        trial = self.ejections_in_row > 0 and self.failures == 1
        if self.failures < policy.eject_after and not trial:
            return False
        backoff = min(policy.max_s, policy.base_s * 2**self.ejections_in_row)
        self.ejected_until = now + backoff
        self.ejections_in_row += 1
        self.ejections += 1
        self.failures = 0
        return True
