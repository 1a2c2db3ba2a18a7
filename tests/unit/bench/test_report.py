import math

import pytest
from citadel_bench.report import DASH, Verdict, fmt, table, verdict_table

pytestmark = pytest.mark.unit


def test_fmt() -> None:
    assert fmt(1234.5678) == "1,234.57"
    assert fmt(0.12345, 3) == "0.123"
    assert fmt(12000) == "12,000"
    assert fmt(math.nan) == DASH
    assert fmt(None) == DASH
    assert fmt("x") == "x"


def test_table() -> None:
    assert table(["a", "b"], [(1, 2.5), ("x", math.nan)]) == (
        "| a | b |\n| --- | --- |\n| 1 | 2.50 |\n| x | " + DASH + " |"
    )
    with pytest.raises(ValueError):
        table(["a"], [(1, 2)])


def test_verdicts() -> None:
    text = verdict_table(
        [
            Verdict("median < 1 ms", "0.5 ms", True),
            Verdict("rps", "0.4x", False, "profile below"),
            Verdict("ready < 60 s", DASH, None),
        ]
    )
    lines = text.splitlines()
    assert "| pass |" in lines[2]
    assert "| miss | profile below |" in lines[3]
    assert "not measured" in lines[4]
