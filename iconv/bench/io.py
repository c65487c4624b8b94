"""Benchmark files: CSV and JSON written atomically, and the CSV read back with numbers as numbers.

Writes go through :func:`iconv.train.files.atomic_write_text` (temporary file in the same folder,
flush, fsync, rename; the temporary file removed on failure), so an interrupted sweep leaves the
previous file or the new one, never half of one; files get the usual ``0666 & ~umask`` mode
(0644 under the common umask 022), not the 0600 of a bare temporary file.

:func:`read_csv` reverses :func:`write_csv`: ``read_csv(path) == rows`` (NaN compared as NaN) for
rows of ints, floats (NaN included) and strings.
"""
from __future__ import annotations

import csv
import io
import math
import os
from typing import Sequence

from ..train.files import atomic_write_json, atomic_write_text

__all__ = ["read_csv", "to_csv_text", "write_csv", "write_json"]


def to_csv_text(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """The CSV text of ``rows``: a header of ``columns``, one line per row (NaN written as ``nan``)."""
    buffer = io.StringIO(newline="")
    writer = csv.DictWriter(buffer, fieldnames=list(columns), lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return buffer.getvalue()


def write_csv(rows: Sequence[dict], path: str | os.PathLike, columns: Sequence[str] | None = None) -> None:
    """Write ``rows`` to ``path`` atomically, one line per row, in ``columns`` order.

    ``columns`` defaults to the runtime benchmark's :func:`iconv.bench.columns`; the training
    benchmark passes :func:`iconv.bench.training_columns`. Every row must have exactly these keys.
    """
    if columns is None:
        from .core import columns as runtime_columns

        columns = runtime_columns()
    atomic_write_text(path, to_csv_text(rows, columns))


def _parse_column(values: list[str]) -> list:
    """Numbers as numbers: ints if every value is an int, floats if every value is a number (``nan``
    and ``inf`` included), otherwise the strings as they are (an all-empty column stays strings)."""
    if values and all(v.lstrip("-").isdigit() for v in values):
        return [int(v) for v in values]
    try:
        numbers = [float(v) for v in values]
    except ValueError:
        return values
    return numbers


def read_csv(path: str | os.PathLike) -> list[dict]:
    """The rows of a CSV written by :func:`write_csv` (or ``python -m iconv.bench --csv``), typed.

    Each column is parsed as a whole (see ``_parse_column``): a column of ints gives ints, a
    column of numbers gives floats (``nan`` where a contender did not run), anything else strings.
    """
    with open(path, newline="") as handle:
        reader = csv.DictReader(handle)
        raw = list(reader)
        names = reader.fieldnames or []
    parsed = {name: _parse_column([row[name] for row in raw]) for name in names}
    return [{name: parsed[name][i] for name in names} for i in range(len(raw))]


def write_json(rows: Sequence[dict], path: str | os.PathLike, meta: dict) -> None:
    """``{"meta": ..., "rows": [...]}`` to ``path`` atomically, with NaN written as null."""
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    atomic_write_json(path, {"meta": meta, "rows": clean})
