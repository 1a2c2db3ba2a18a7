"""Writing the results: Markdown tables and target verdicts."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

DASH = "\N{EN DASH}"
"""What an empty or unmeasured cell shows."""


def fmt(value: float | int | str | None, digits: int = 2) -> str:
    """A table cell: numbers rounded, NaN and None as a dash."""
    if value is None:
        return DASH
    if isinstance(value, str):
        return value
    if isinstance(value, float) and math.isnan(value):
        return DASH
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}"


def spread(values: Sequence[float], digits: int = 1) -> str:
    """The lowest and highest of `values` as `low-high` (a dash for none)."""
    if not values:
        return DASH
    return f"{fmt(min(values), digits)}-{fmt(max(values), digits)}"


def table(headers: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table; cells go through `fmt` unless already strings."""
    lines = [
        "| " + " | ".join(headers) + " |",
        "| " + " | ".join("---" for _ in headers) + " |",
    ]
    for row in rows:
        cells = [c if isinstance(c, str) else fmt(c) for c in row]  # type: ignore[arg-type]
        if len(cells) != len(headers):
            raise ValueError(f"row has {len(cells)} cells, expected {len(headers)}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


@dataclass(frozen=True)
class Verdict:
    """One target: what was measured against what was wanted."""

    target: str
    measured: str
    ok: bool | None
    """True: met; False: missed; None: not measured."""
    note: str = ""

    @property
    def word(self) -> str:
        """`pass`, `miss` or `not measured`."""
        if self.ok is None:
            return "not measured"
        return "pass" if self.ok else "miss"


def verdict_table(verdicts: Sequence[Verdict]) -> str:
    """The targets table of the report."""
    return table(
        ["target", "measured", "result", "note"],
        [(v.target, v.measured, v.word, v.note or DASH) for v in verdicts],
    )
