"""One way to show a number and a table: the report, the sweep summary and the benchmarks all print through here."""

import math
from collections.abc import Sequence
from typing import Any


def fmt(value: Any) -> str:
    """A cell: ``-`` for NaN/None, whole floats without decimals, 4 significant digits, 3 in scientific notation
    for very large or very small magnitudes."""
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isnan(value):
            return "-"
        if value.is_integer() and abs(value) < 1e9:
            return str(int(value))
        if value != 0 and (abs(value) >= 1e5 or abs(value) < 1e-3):
            return f"{value:.3g}"
        return f"{value:.4g}"
    return str(value)


def markdown_table(rows: Sequence[dict[str, Any]], columns: Sequence[str] | None = None) -> str:
    """``rows`` as a Markdown table with ``columns`` (default: the first row's keys), cells through ``fmt``;
    pipes and line breaks inside a cell are escaped so one row stays one line."""
    if not rows:
        return "(no rows)"
    columns = list(columns or rows[0])
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        cells = (fmt(row.get(c)).replace("|", "\\|").replace("\n", " ") for c in columns)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)
