"""The autoscaler's decision, a pure function of a model's demand history."""

from __future__ import annotations

import math
import random
from collections.abc import Sequence

import pytest

from citadel.operator.autoscale import (
    Decision,
    DemandTrack,
    Sample,
    decide,
    decide_on,
)
from citadel.operator.spec import Autoscaling

pytestmark = pytest.mark.unit


def policy(
    low: int = 1, high: int = 8, target: int = 8, delay: int = 300
) -> Autoscaling:
    return Autoscaling(
        min_replicas=low,
        max_replicas=high,
        target_requests=target,
        scale_down_delay_seconds=delay,
    )


def steady(
    demand: float, start: float, end: float, every: float = 2.0, waiting: float = 0
) -> list[Sample]:
    """A sample every `every` s from `start` to `end`, all of `demand`."""
    count = int((end - start) / every) + 1
    return [Sample(start + i * every, demand, waiting) for i in range(count)]


def run(
    current: int,
    history: Sequence[Sample],
    scaling: Autoscaling | None = None,
    *,
    window_s: float = 30.0,
    since: float = 0.0,
) -> Decision | None:
    return decide(current, scaling or policy(), history, window_s=window_s, since=since)


# -- up ---------------------------------------------------------------------


def test_up_at_once_to_the_mean_over_the_window() -> None:
    history = steady(21, 0, 30)
    assert run(2, history) == Decision(
        3, "scaled from 2 to 3: 21 requests for a target of 8 per replica"
    )


def test_up_uses_the_windows_mean_not_the_latest_spike() -> None:
    # 15 samples of 0 in the window, then one of 64: mean 4 -> 1 replica.
    history = [*steady(0, 2, 30), Sample(32, 64)]
    assert run(1, history) is None
    # With no window, the latest sample alone.
    assert run(1, history, window_s=0) == Decision(
        8, "scaled from 1 to 8: 64 requests for a target of 8 per replica"
    )


def test_the_window_leaves_older_samples_out() -> None:
    history = [*steady(80, 0, 10), *steady(16, 12, 60)]
    # The window (30, 60] holds only samples of 16: 2 replicas.
    assert run(1, history) == Decision(
        2, "scaled from 1 to 2: 16 requests for a target of 8 per replica"
    )


def test_a_mean_exactly_at_the_target_wants_no_more() -> None:
    # 16.000000000000004 after the float sum: still 2 replicas.
    history = [Sample(0, 0.1 * 3), Sample(1, 31.7)]
    assert run(2, history, policy(target=8)) is None


def test_up_is_capped_at_max_replicas() -> None:
    decision = run(2, steady(1000, 0, 30), policy(high=4))
    assert decision is not None and decision.replicas == 4


def test_waiting_requests_wake_a_model_at_zero_at_once() -> None:
    # One request, waiting, after a window of nothing: the mean is tiny, but
    # the model wakes now.
    history = [*steady(0, 0, 28), Sample(30, 1, waiting=1)]
    assert run(0, history, policy(low=0)) == Decision(
        1, "scaled from 0 to 1: 1 request waiting for a replica"
    )


def test_waiting_counts_only_in_the_latest_sample_for_the_wake() -> None:
    history = [Sample(0, 1, waiting=1), Sample(2, 0)]
    # Served meanwhile and gone: the mean (0.5) still wants a replica.
    assert run(0, history, policy(low=0)) == Decision(
        1, "scaled from 0 to 1: 0.5 requests for a target of 8 per replica"
    )
    assert run(0, [Sample(0, 0), Sample(2, 0)], policy(low=0)) is None


def test_many_waiting_at_zero_get_as_many_replicas_as_they_want() -> None:
    history = [Sample(30, 40, waiting=40)]
    decision = run(0, history, policy(low=0))
    assert decision == Decision(
        5, "scaled from 0 to 5: 40 requests waiting for a replica"
    )


# -- down -------------------------------------------------------------------


def test_down_only_after_the_delay_of_low_demand() -> None:
    scaling = policy(low=0, delay=300)
    history = steady(0, 0, 298)
    assert run(1, history, scaling) is None  # 298 s of nothing, not yet 300
    history = steady(0, 0, 300)
    assert run(1, history, scaling) == Decision(
        0, "scaled from 1 to 0: no requests for 300 s"
    )


def test_down_needs_the_history_to_cover_the_delay_since_it_began() -> None:
    scaling = policy(low=0, delay=300)
    history = steady(0, 0, 400)
    # The operator started (or last scaled the model) at 200: 200 s seen.
    assert run(1, history, scaling, since=200) is None
    assert run(1, history, scaling, since=100) is not None


def test_down_to_the_highest_wanted_over_the_delay() -> None:
    scaling = policy(low=1, delay=60)
    # 4 replicas; over the last 60 s demand wanted at most 2 (16 requests).
    history = [*steady(40, 0, 98), *steady(8, 100, 160)]
    history[-10] = Sample(history[-10].at, 16)
    decision = run(4, history, scaling, window_s=0, since=0)
    assert decision == Decision(
        2,
        "scaled from 4 to 2: at most 16 requests for a target of 8 per replica "
        "for 60 s",
    )


def test_no_down_while_any_wanted_in_the_delay_reaches_current() -> None:
    scaling = policy(low=1, delay=60)
    history = [*steady(8, 0, 160)]
    history[-20] = Sample(history[-20].at, 24)  # 3 replicas wanted, 40 s ago
    assert run(3, history, scaling, window_s=0) is None


def test_down_stops_at_min_replicas() -> None:
    scaling = policy(low=2, delay=0)
    assert run(4, [Sample(0, 0)], scaling) == Decision(
        2, "scaled from 4 to 2: no requests for 0 s"
    )
    assert run(2, [Sample(0, 0)], scaling) is None


def test_a_delay_of_zero_scales_down_with_the_latest_sample() -> None:
    assert run(3, [Sample(10, 8)], policy(delay=0), window_s=0) == Decision(
        1,
        "scaled from 3 to 1: at most 8 requests for a target of 8 per replica for 0 s",
    )


def test_no_down_when_a_gateway_failed_this_tick() -> None:
    scaling = policy(low=0, delay=60)
    history = [*steady(0, 0, 98), Sample(100, 0, complete=False)]
    assert run(1, history, scaling) is None
    # Up still goes from the gateways that answered.
    history[-1] = Sample(100, 30, complete=False)
    decision = run(1, history, scaling, window_s=0)
    assert decision is not None and decision.replicas == 4


def test_a_blind_tick_decides_nothing() -> None:
    history = [*steady(100, 0, 30), Sample(32, None)]
    assert run(1, history) is None
    assert run(1, [Sample(0, None)]) is None
    assert run(1, []) is None
    # Not even a model out of range: nothing is known this tick.
    assert run(9, history, policy(high=4)) is None


def test_a_blind_tick_within_the_delay_holds_the_scale_down() -> None:
    scaling = policy(low=0, delay=60)
    history = steady(0, 0, 200)
    history[-5] = Sample(history[-5].at, None)
    assert run(1, history, scaling) is None
    # Once it is older than the delay, it no longer counts.
    history = [*history, *steady(0, 202, 270)]
    assert run(1, history, scaling) is not None


def test_blind_ticks_leave_the_window_mean_to_the_samples_seen() -> None:
    history = [Sample(0, 16), Sample(2, None), Sample(4, 16)]
    assert run(1, history) == Decision(
        2, "scaled from 1 to 2: 16 requests for a target of 8 per replica"
    )


# -- clamping ---------------------------------------------------------------


def test_a_model_above_max_replicas_comes_down_at_once() -> None:
    history = [Sample(0, 1000, complete=False)]
    assert run(6, history, policy(high=4), since=0) == Decision(
        4, "scaled from 6 to 4: autoscaling.maxReplicas is 4"
    )


def test_a_model_below_min_replicas_comes_up_at_once() -> None:
    assert run(0, [Sample(0, 0)], policy(low=2)) == Decision(
        2, "scaled from 0 to 2: autoscaling.minReplicas is 2"
    )


def test_within_range_and_demand_met_nothing_changes() -> None:
    assert run(2, steady(12, 0, 400), policy(delay=60)) is None


def test_at_max_replicas_more_demand_writes_nothing() -> None:
    # Overloaded at the cap: no "scaled from 4 to 4" every tick.
    assert run(4, steady(100, 0, 60), policy(high=4)) is None


def _reference(
    current: int,
    scaling: Autoscaling,
    history: Sequence[Sample],
    window_s: float,
    since: float,
) -> int | None:
    """The decision's replicas as first written: every sample's window mean
    taken afresh from the whole history (quadratic, plain)."""
    if not history or history[-1].demand is None:
        return None
    low, high = scaling.min_replicas, scaling.max_replicas
    if current > high:
        return high
    if current < low:
        return low

    def wanted(end: int) -> tuple[int, float]:
        last = history[end]
        seen = [
            s.demand
            for s in history[: end + 1]
            if s.demand is not None
            and (s.at > last.at - window_s if window_s > 0 else s is last)
        ]
        mean = sum(seen) / len(seen)
        count = math.ceil(mean / scaling.target_requests - 1e-9)
        return (max(count, 1) if last.waiting > 0 else count), mean

    count, _ = wanted(len(history) - 1)
    if count > current:
        return min(count, high) if min(count, high) > current else None
    latest = history[-1]
    if current <= low or not latest.complete:
        return None
    start = latest.at - scaling.scale_down_delay_seconds
    if since > start:
        return None
    highest = 0
    for index, sample in enumerate(history):
        if sample.at < start:
            continue
        if sample.demand is None:
            return None
        highest = max(highest, wanted(index)[0])
    new = max(highest, low)
    return new if new < current else None


@pytest.mark.parametrize("seed", range(40))
def test_the_track_decides_as_the_whole_history_would(seed: int) -> None:
    rng = random.Random(seed)
    scaling = policy(
        low=rng.choice([0, 1]),
        high=rng.choice([1, 3, 8]),
        target=rng.choice([1, 4, 8]),
        delay=rng.choice([0, 6, 20, 60]),
    )
    window_s = rng.choice([0.0, 5.0, 30.0])
    since = rng.choice([0.0, 10.0])
    track = DemandTrack(since, window_s)
    history: list[Sample] = []
    for tick in range(120):
        roll = rng.random()
        if roll < 0.05:
            sample = Sample(tick * 2.0, None)
        else:
            sample = Sample(
                tick * 2.0,
                float(rng.choice([0, 0, 1, 3, 9, 20])),
                float(rng.random() < 0.1),
                rng.random() > 0.05,
            )
        history.append(sample)
        track.add(sample)
        current = rng.randint(0, 9)
        got = decide_on(current, scaling, track)
        expected = _reference(current, scaling, history, window_s, since)
        assert (got.replicas if got else None) == expected, (tick, current)


def test_a_longer_delay_waits_until_the_samples_cover_it() -> None:
    track = DemandTrack(0.0, 0.0)
    for tick in range(31):  # 60 s of nothing
        track.add(Sample(tick * 2.0, 0.0))
        decision = decide_on(2, policy(low=0, delay=10), track)
    assert decision is not None and decision.replicas == 0
    # The delay raised to 100 s: what was kept reaches back to 50 s, so no
    # scale-down until the delay starts there (at 150 s).
    for tick in range(31, 75):
        track.add(Sample(tick * 2.0, 0.0))
        assert decide_on(2, policy(low=0, delay=100), track) is None, tick
    track.add(Sample(150.0, 0.0))
    decision = decide_on(2, policy(low=0, delay=100), track)
    assert decision is not None and decision.replicas == 0
