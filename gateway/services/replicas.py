"""Replicas: where a model is served, what load they carry, whether they are healthy.

Health is passive: a replica that fails `eject_after` times in a row is taken out of
rotation for a back-off that doubles with each ejection in a row (up to a maximum),
then re-admitted on trial; one success makes it healthy again. An ejection lasts its
period, as Envoy's outlier detection has it: what the requests in flight when it
began do meanwhile, well or not, changes nothing.
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
    """What a replica's vLLM `/metrics` said at the last scrape."""

    running: float = 0.0
    waiting: float = 0.0
    kv_cache_usage: float = 0.0
    scraped_at: float | None = None

    def stale(self, now: float, max_age_s: float) -> bool:
        """True when there are no figures (none read yet, or the last read
        failed) or they are older than `max_age_s` at `now`: they do not
        count, and the zeros of no figures say nothing of the load."""
        return self.scraped_at is None or self.scraped_at < now - max_age_s


@dataclass(eq=False)
class Replica:
    """One model server, with the state the gateway keeps about it."""

    url: str
    in_flight: int = 0
    failures: int = 0
    ejections_in_row: int = 0
    ejected_until: float = 0.0
    load: LoadReport = field(default_factory=LoadReport)
    load_read_at: float | None = None
    """When its `/metrics` last answered, kept when a later read fails and
    drops `load` (for /admin/replicas: since when the load is unknown)."""

    def available(self, now: float) -> bool:
        """True unless the replica is ejected at `now`."""
        return now >= self.ejected_until

    def record_success(self, now: float) -> None:
        """A request completed: the replica is healthy.

        While the replica is ejected a success counts for nothing, as a failure
        does (`record_failure`): it comes from a request sent before the
        ejection (a long stream, as likely as not), not from the trial after
        it. Counted, it would end the ejections in a row, so the replica would
        come back needing `eject_after` failures, each a client's error, where
        one failed trial should eject it again for twice as long.
        """
        if now < self.ejected_until:
            return
        self.failures = 0
        self.ejections_in_row = 0

    def record_failure(self, now: float, policy: EjectionPolicy) -> bool:
        """A request failed; returns True when this failure ejects the replica.

        While the replica is ejected a failure counts for nothing: it comes from a
        request sent before the ejection, not from the trial after it, and
        counting it would double the back-off once per request that was in flight.
        """
        if now < self.ejected_until:
            return False
        self.failures += 1
        trial = self.ejections_in_row > 0 and self.failures == 1
        if self.failures < policy.eject_after and not trial:
            return False
        backoff = min(policy.max_s, policy.base_s * 2**self.ejections_in_row)
        self.ejected_until = now + backoff
        self.ejections_in_row += 1
        self.failures = 0
        return True
