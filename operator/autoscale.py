"""The autoscaler's decision: how many replicas a model wants, from its demand.

A pure function of a model's recent demand (the requests in flight and waiting
at every gateway, summed, one sample per tick) and its spec.autoscaling; the
loop that reads the gateways and writes the scale lives in autoscaler.py.

- wanted(t) = ceil(mean demand over the window ending at t / targetRequests),
  at least 1 when requests wait at t (a model at zero wakes at once, without
  waiting for the window's mean to grow).
- Up at once when the latest wanted is above the current replicas (at
  maxReplicas already: nothing to write).
- Down only when every wanted over the last scaleDownDelaySeconds is below the
  current replicas, the samples cover that whole delay (since the model was
  first seen, or last scaled) with no blind tick among them, and every gateway
  answered this tick: then to the highest of them.
- Always within [minReplicas, maxReplicas]: a model outside is brought in at
  once.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass

from citadel.operator.spec import Autoscaling


@dataclass(frozen=True)
class Sample:
    """One tick's demand for a model, summed over the gateways read.

    Attributes:
        at: when (monotonic seconds).
        demand: requests in flight plus waiting; None for a blind tick (no
            gateway could be read).
        waiting: requests waiting for a replica.
        complete: every gateway answered (a partial sum may be too low).
    """

    at: float
    demand: float | None
    waiting: float = 0.0
    complete: bool = True


@dataclass(frozen=True)
class Decision:
    """A new replica count and why, as the Event says it."""

    replicas: int
    message: str


def _requests(value: float) -> str:
    """A request count as people read it: `1 request`, `21 requests`, `2.5
    requests` (a window's mean)."""
    return f"{round(value, 1):g} request{'' if value == 1 else 's'}"


def _wanted(mean: float, target: int) -> int:
    # The tolerance absorbs the float sum's error (a mean of 16.000000000000004
    # for a target of 8 is 2 replicas, not 3).
    return math.ceil(mean / target - 1e-9)


class DemandTrack:
    """What the decision needs of a model's samples, kept as they come: each
    added once, the decision then in constant time (amortized), however long
    the delay (the CRD allows a day: 43,200 samples at 2 s ticks, which a
    decision that walked them all took 38 ms per model per tick for).

    Each sample's window mean is taken when it is added (a running sum over the
    window), and the scale-down's inputs are kept over the delay: the highest of
    those means (a deque of decreasing means), the last sample with requests
    waiting, the last blind one. Replicas wanted grow with the mean, so the
    highest wanted over the delay is the one of the highest mean (or 1 where a
    request waited), whatever targetRequests is now.

    Args:
        since: when its samples begin to count for a scale-down (the model
            first seen); `scaled` moves it.
        window_s: the window whose mean demand sizes the model (0: each sample
            alone).
    """

    def __init__(self, since: float, window_s: float) -> None:
        self.since = since
        self._window_s = window_s
        self._window: deque[Sample] = deque()
        self._window_sum = 0.0
        self._peaks: deque[tuple[float, float]] = deque()
        """(at, mean) of the samples over the delay, means decreasing: the
        first is the highest since `_covered_from`."""
        self._covered_from = since
        self._last_waiting = -math.inf
        self._last_blind = -math.inf
        self.latest: Sample | None = None
        self.latest_mean = 0.0

    def add(self, sample: Sample) -> None:
        """Takes this tick's sample (samples come in time order)."""
        self.latest = sample
        if sample.demand is None:
            self._last_blind = sample.at
            return
        if sample.waiting > 0:
            self._last_waiting = sample.at
        if self._window_s <= 0:
            mean = sample.demand
        else:
            # The seen samples in (at - window, at].
            self._window.append(sample)
            self._window_sum += sample.demand
            while self._window[0].at <= sample.at - self._window_s:
                self._window_sum -= self._window.popleft().demand or 0.0
            mean = self._window_sum / len(self._window)
            if len(self._window) == 1:
                self._window_sum = sample.demand  # no drift from the sums
        self.latest_mean = mean
        while self._peaks and self._peaks[-1][1] <= mean:
            self._peaks.pop()
        self._peaks.append((sample.at, mean))

    def scaled(self, at: float) -> None:
        """The model was scaled at `at`: the delay counts again from there."""
        self.since = at

    def wanted_now(self, target: int) -> int:
        """Replicas the latest sample wants (unclamped)."""
        latest = self.latest
        assert latest is not None and latest.demand is not None
        count = _wanted(self.latest_mean, target)
        return max(count, 1) if latest.waiting > 0 else count

    def _forget_before(self, start: float) -> None:
        while self._peaks and self._peaks[0][0] < start:
            self._peaks.popleft()
        # Kept from here on: a longer delay later cannot look further back.
        self._covered_from = max(self._covered_from, start)

    def keep(self, delay: float) -> None:
        """Forgets what a scale-down over the last `delay` seconds no longer
        needs (called every tick, so that what is kept stays bounded when no
        scale-down is looked at)."""
        if self.latest is not None:
            self._forget_before(self.latest.at - delay)

    def over_delay(self, delay: float, target: int) -> tuple[int, float] | None:
        """The highest replicas wanted over the last `delay` seconds and the
        highest mean demand behind them, or None when those samples cannot
        say: they do not cover the delay (since `since`, or a longer delay
        than the samples were kept for), or a blind tick is among them."""
        latest = self.latest
        assert latest is not None
        start = latest.at - delay
        self._forget_before(start)
        if self.since > start or self._covered_from > start:
            return None
        if self._last_blind >= start:
            return None
        peak = self._peaks[0][1] if self._peaks else 0.0
        highest = _wanted(peak, target)
        if self._last_waiting >= start:
            highest = max(highest, 1)
        return highest, peak


def decide(
    current: int,
    policy: Autoscaling,
    history: Iterable[Sample],
    *,
    window_s: float,
    since: float,
) -> Decision | None:
    """The replicas `current` should become, or None to leave it: `decide_on`
    over a track of `history`.

    Args:
        current: the model's spec.replicas now.
        policy: its spec.autoscaling.
        history: its samples, oldest first, the latest being this tick's.
        window_s: the window whose mean demand sizes the model (0: the latest
            sample alone).
        since: when the history began to count for a scale-down (the model
            first seen, or last scaled): the delay must have passed since.
    """
    track = DemandTrack(since, window_s)
    for sample in history:
        track.add(sample)
    return decide_on(current, policy, track)


def decide_on(current: int, policy: Autoscaling, track: DemandTrack) -> Decision | None:
    """The replicas `current` should become by `track`'s samples, the latest
    being this tick's, or None to leave it (a decision is always a change)."""
    latest = track.latest
    if latest is None or latest.demand is None:
        return None  # blind: nothing known of the demand
    low, high = policy.min_replicas, policy.max_replicas
    # Out of range (the range changed, or a person set spec.replicas): in at
    # once, whatever the demand, as it is the spec and not the demand that
    # asks (so even when a gateway could not be read).
    if current > high:
        return Decision(
            high, f"scaled from {current} to {high}: autoscaling.maxReplicas is {high}"
        )
    if current < low:
        return Decision(
            low, f"scaled from {current} to {low}: autoscaling.minReplicas is {low}"
        )
    track.keep(policy.scale_down_delay_seconds)
    target = policy.target_requests
    count = track.wanted_now(target)
    if count > current:
        new = min(count, high)
        if new == current:
            # At maxReplicas with more demand than it serves: nothing to
            # write (a write and an Event every tick said "from 4 to 4").
            return None
        if current == 0 and latest.waiting > 0:
            why = f"{_requests(latest.waiting)} waiting for a replica"
        else:
            why = f"{_requests(track.latest_mean)} for a target of {target} per replica"
        return Decision(new, f"scaled from {current} to {new}: {why}")
    if current <= low or not latest.complete:
        return None
    delay = policy.scale_down_delay_seconds
    over = track.over_delay(delay, target)
    if over is None:
        return None
    highest, peak = over
    new = max(highest, low)
    if new >= current:
        return None
    if peak == 0:
        why = f"no requests for {delay} s"
    else:
        why = (
            f"at most {_requests(peak)} for a target of "
            f"{target} per replica for {delay} s"
        )
    return Decision(new, f"scaled from {current} to {new}: {why}")
