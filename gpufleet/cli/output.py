"""Rows out: aligned tables by default, JSON or CSV on request."""

from __future__ import annotations

import csv
import io
import json
from collections.abc import Mapping, Sequence
from typing import Any

FORMATS = ("table", "json", "csv")


def cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f}"
    if isinstance(value, (list, tuple)):
        return "; ".join(str(v) for v in value) or "-"
    return str(value)


def table(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]]) -> str:
    """Align ``columns`` ((key, heading) pairs) of ``rows``; numbers right-aligned."""
    cells = [[cell(row.get(key)) for key, _ in columns] for row in rows]
    headings = [heading for _, heading in columns]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headings)]
    numeric = [
        all(isinstance(row.get(key), (int, float)) or row.get(key) is None for row in rows) and rows
        for key, _ in columns
    ]

    def fmt(values: Sequence[str]) -> str:
        return "  ".join(
            v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric, strict=False)
        ).rstrip()

    return "\n".join([fmt(headings), *(fmt(r) for r in cells)])


def render(rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], output: str) -> str:
    if output == "json":
        return json.dumps(list(rows), indent=2)
    if output == "csv":
        keys = list(rows[0]) if rows else [key for key, _ in columns]
        return csv_lines(rows, keys, header=True)
    return table(rows, columns)


def _csv_value(value: Any) -> Any:
    if isinstance(value, list):
        return "; ".join(str(v) for v in value)
    if isinstance(value, dict):
        return "; ".join(f"{k}={v}" for k, v in value.items())
    return value


def csv_lines(rows: Sequence[Mapping[str, Any]], keys: Sequence[str], *, header: bool) -> str:
    """``rows`` as CSV (with a header line if asked), without the final newline."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=keys, lineterminator="\n")
    if header:
        writer.writeheader()
    for row in rows:
        writer.writerow({k: _csv_value(v) for k, v in row.items()})
    return buffer.getvalue().rstrip("\n")
