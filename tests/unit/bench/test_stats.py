import math

import pytest
from citadel_bench.stats import Summary, percentile, ratio

pytestmark = pytest.mark.unit


def test_percentile_interpolates_between_ranks() -> None:
    values = [4.0, 1.0, 3.0, 2.0]
    assert percentile(values, 0) == 1.0
    assert percentile(values, 100) == 4.0
    assert percentile(values, 50) == 2.5
    assert percentile(values, 90) == pytest.approx(3.7)


def test_percentile_of_nothing_is_nan_and_bad_q_raises() -> None:
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_summary() -> None:
    s = Summary.of([float(i) for i in range(1, 101)])
    assert s.count == 100
    assert s.mean == 50.5
    assert s.median == 50.5
    assert s.p90 == pytest.approx(90.1)
    assert s.p99 == pytest.approx(99.01)
    assert math.isnan(Summary.of([]).mean)


def test_ratio_guards_zero() -> None:
    assert ratio(1, 4) == 0.25
    assert math.isnan(ratio(1, 0))
