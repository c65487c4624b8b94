"""Reading a multi-seed study: mean and spread over seeds, and one rule for "within noise".

Every experiment the book reports is repeated over seeds ``s = 1..n``. For a measure with values
``v_1, ..., v_n`` the book prints the mean and the sample standard deviation

.. math::  \\bar v = \\frac1n \\sum_s v_s, \\qquad
           s_v = \\sqrt{\\frac{1}{n-1} \\sum_s (v_s - \\bar v)^2}.

Two configurations ``a`` and ``b`` differ by ``d = \\bar a - \\bar b``, whose standard error (the
seeds of the two being independent) is

.. math::  \\mathrm{se}(d) = \\sqrt{s_a^2 / n_a + s_b^2 / n_b}.

A difference is called *within noise* when ``|d| < 2 se(d)`` (:data:`NOISE_FACTOR`), roughly a
two-sided 95 % interval for normal seed-to-seed scatter. With three seeds this is a coarse test: it
calls small real differences noise rather than the reverse, which is the safe side for the book's
claims. Used by ``tools/run_table1.py``, ``tools/run_flow_study.py`` and chapters 7 and 9, which
also record the code a study ran with (:func:`code_version`).
"""
from __future__ import annotations

import math
import statistics
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

__all__ = ["NOISE_FACTOR", "Difference", "code_version", "compare", "mean_std", "curve_band"]

#: A difference is within noise when it is smaller than this many standard errors.
NOISE_FACTOR = 2.0


def _values(values: Sequence[float], name: str) -> list[float]:
    out = [float(v) for v in values]
    if not out:
        raise ValueError(f"{name} must hold at least one value (one per seed), got none")
    bad = [v for v in out if not math.isfinite(v)]
    if bad:
        raise ValueError(f"{name} must be finite, got {bad[0]!r} among {out}")
    return out


def mean_std(values: Sequence[float], name: str = "values") -> tuple[float, float | None]:
    """``(mean, sample standard deviation)`` over seeds; the deviation is None for one seed."""
    v = _values(values, name)
    return statistics.fmean(v), (statistics.stdev(v) if len(v) > 1 else None)


@dataclass(frozen=True)
class Difference:
    """``a - b`` of two means, its standard error (None with a single seed on either side) and
    whether ``|difference| < NOISE_FACTOR * standard_error`` (None when the error is unknown)."""

    difference: float
    standard_error: float | None
    within_noise: bool | None

    def as_dict(self) -> dict:
        return {"difference": self.difference, "standard_error": self.standard_error,
                "within_noise": self.within_noise}


def compare(a: Sequence[float], b: Sequence[float]) -> Difference:
    """The difference of the means of ``a`` and ``b`` (values per seed) with the noise rule above."""
    a, b = _values(a, "a"), _values(b, "b")
    (ma, sa), (mb, sb) = mean_std(a), mean_std(b)
    if sa is None or sb is None:
        return Difference(ma - mb, None, None)
    se = math.sqrt(sa ** 2 / len(a) + sb ** 2 / len(b))
    return Difference(ma - mb, se, abs(ma - mb) < NOISE_FACTOR * se)


def curve_band(curves: Sequence[Sequence[tuple[float, float]]], grid: Sequence[float]):
    """Mean, minimum and maximum over seeds of piecewise-linear curves ``[(x, y), ...]`` (x
    increasing) at the points of ``grid``; a grid point outside a seed's x range is left out for
    all seeds (``None`` in the three lists), so a band never mixes extrapolated values."""
    if not curves:
        raise ValueError("curves must hold one curve per seed, got none")
    for k, c in enumerate(curves):
        xs = [p[0] for p in c]
        if len(xs) < 1 or any(x1 <= x0 for x0, x1 in zip(xs, xs[1:])):
            raise ValueError(f"curves[{k}] must be non-empty with increasing x, got x = {xs[:6]}...")
    mean, low, high = [], [], []
    for g in grid:
        ys = []
        for c in curves:
            if not c[0][0] <= g <= c[-1][0]:
                break
            j = next(i for i in range(len(c)) if c[i][0] >= g)
            if c[j][0] == g:
                ys.append(c[j][1])
            else:
                (x0, y0), (x1, y1) = c[j - 1], c[j]
                ys.append(y0 + (y1 - y0) * (g - x0) / (x1 - x0))
        if len(ys) == len(curves):
            mean.append(statistics.fmean(ys)), low.append(min(ys)), high.append(max(ys))
        else:
            mean.append(None), low.append(None), high.append(None)
    return mean, low, high


def code_version(root: str | Path, paths: Sequence[str] = ("iconv", "tools")) -> str:
    """The git commit of the repository at ``root``, as a study records it.

    ``"<sha>+uncommitted"`` when files under ``paths`` (the code that makes the results, not the
    results themselves) differ from that commit, the bare sha otherwise, ``"unknown"`` when
    ``root`` is not a git checkout or git is missing.
    """
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain", "--", *paths], cwd=root, capture_output=True,
                               text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+uncommitted" if dirty.strip() else "")
