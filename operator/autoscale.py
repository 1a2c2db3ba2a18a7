"""The autoscaler's decision: how many replicas a model wants, from its demand.

A pure function of a model's recent demand (the requests in flight and waiting
at every gateway, summed, one sample per tick) and its spec.autoscaling; the
loop that reads the gateways and writes the scale lives in autoscaler.py.

- wanted(t) = ceil(mean demand over the window ending at t / targetRequests),
  at least 1 when requests wait at t (a model at zero wakes at once, without
  waiting for the window's mean to grow).
- Up at once when the latest wanted is above the current replicas.
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
from collections.abc import Sequence
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


def _wanted_counts(
    history: Sequence[Sample], target: int, window_s: float
) -> list[tuple[int, float] | None]:
    """Replicas wanted at each sample (unclamped) and the mean demand behind
    it; None for a blind one.

    One pass over `history`, each window's sum kept as it slides: the
    scale-down looks at every sample of its delay (150 at 300 s and 2 s
    ticks), each with its window, for every autoscaled model at every tick.
    Iterated, never sliced: the loop keeps a deque.
    """
    counts: list[tuple[int, float] | None] = []
    window: deque[Sample] = deque()
    total = 0.0
    for sample in history:
        if sample.demand is None:
            counts.append(None)
            continue
        if window_s <= 0:
            mean = sample.demand
        else:
            # The seen samples in (at - window, at].
            window.append(sample)
            total += sample.demand
            while window[0].at <= sample.at - window_s:
                total -= window.popleft().demand or 0.0
            mean = total / len(window)
        # The tolerance absorbs the float sum's error (a mean of
        # 16.000000000000004 for a target of 8 is 2 replicas, not 3).
        count = math.ceil(mean / target - 1e-9)
        if sample.waiting > 0:
            count = max(count, 1)
        counts.append((count, mean))
    return counts


def decide(
    current: int,
    policy: Autoscaling,
    history: Sequence[Sample],
    *,
    window_s: float,
    since: float,
) -> Decision | None:
    """The replicas `current` should become, or None to leave it.

    Args:
        current: the model's spec.replicas now.
        policy: its spec.autoscaling.
        history: its samples, oldest first, the latest being this tick's.
        window_s: the window whose mean demand sizes the model (0: the latest
            sample alone).
        since: when the history began to count for a scale-down (the model
            first seen, or last scaled): the delay must have passed since.
    """
    if not history or history[-1].demand is None:
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
    latest = history[-1]
    target = policy.target_requests
    counts = _wanted_counts(history, target, window_s)
    last = counts[-1]
    assert last is not None  # the latest sample is not blind (above)
    count, mean = last
    if count > current:
        new = min(count, high)
        if current == 0 and latest.waiting > 0:
            why = f"{_requests(latest.waiting)} waiting for a replica"
        else:
            why = f"{_requests(mean)} for a target of {target} per replica"
        return Decision(new, f"scaled from {current} to {new}: {why}")
    return _down(current, policy, history, counts, since=since)


def _down(
    current: int,
    policy: Autoscaling,
    history: Sequence[Sample],
    counts: Sequence[tuple[int, float] | None],
    *,
    since: float,
) -> Decision | None:
    """The scale-down, if the delay has passed with demand below `current`."""
    latest = history[-1]
    delay = policy.scale_down_delay_seconds
    if current <= policy.min_replicas or not latest.complete:
        return None
    start = latest.at - delay
    if since > start:
        return None  # the history does not cover the delay yet
    highest, peak = 0, 0.0
    for sample, wanted in zip(history, counts, strict=True):
        if sample.at < start:
            continue
        if wanted is None:
            return None  # a blind tick within the delay: demand unknown
        count, mean = wanted
        if count >= current:
            return None
        # The peak of the means that sized each wanted, so that the message
        # adds up with the count it gives.
        highest, peak = max(highest, count), max(peak, mean)
    new = max(highest, policy.min_replicas)
    if new >= current:
        return None
    if peak == 0:
        why = f"no requests for {delay} s"
    else:
        why = (
            f"at most {_requests(peak)} for a target of "
            f"{policy.target_requests} per replica for {delay} s"
        )
    return Decision(new, f"scaled from {current} to {new}: {why}")
