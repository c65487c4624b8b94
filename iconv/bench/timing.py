"""Timing on a shared machine: contenders interleaved round-robin, medians with their spread.

A busy machine (other processes, a second thread waiting for a core) slows whatever runs at that
moment. Running the contenders one after another, in an order rotated every round, spreads that
noise over all of them alike; the median of each ignores the worst rounds, and the interquartile
range says how noisy they were. A ratio of two contenders is reported as the ratio of their
medians, and (:func:`paired_ratios`) as the spread of the per-round ratios: both were measured
seconds apart, so a slow phase of the machine cancels in them.

CPU times come from ``time.perf_counter``, CUDA times from CUDA events (the device is synchronised
before each call, so only the call's own kernels are timed).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable, Sequence

import torch

__all__ = ["call_timer", "paired_ratios", "rel_iqr", "spread", "time_interleaved"]


def call_timer(device: torch.device | str = "cpu") -> Callable[[Callable[[], object]], float]:
    """A function that runs ``f()`` once on ``device`` and returns its duration in seconds."""
    device = torch.device(device)
    if device.type == "cuda":
        def timed(f):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            torch.cuda.synchronize(device)
            start.record()
            f()
            end.record()
            end.synchronize()
            return start.elapsed_time(end) / 1e3
    else:
        def timed(f):
            start = time.perf_counter()
            f()
            return time.perf_counter() - start
    return timed


def time_interleaved(
    contenders: dict[str, Callable[[], object]],
    repeats: int = 10,
    warmup: int = 2,
    device: torch.device | str = "cpu",
    budget_s: float | None = None,
    min_repeats: int = 3,
) -> dict[str, list[float]]:
    """Time every zero-argument callable ``repeats`` times, round-robin; returns seconds per call.

    Each contender is first called ``warmup`` times (at least once). Then rounds run every
    contender still short of samples once, in an order rotated by one each round. With
    ``budget_s``, a contender whose last warm-up call took ``t`` gets only
    ``max(min_repeats, budget_s / t)`` samples, so one slow baseline cannot stall a sweep.
    Samples are returned in the order they were taken (round by round).
    """
    if repeats < 1 or warmup < 0 or min_repeats < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, min_repeats >= 1; got {repeats}, {warmup}, {min_repeats}")
    timed = call_timer(device)
    wanted = {}
    for name, f in contenders.items():
        last = None
        for _ in range(max(1, warmup)):
            last = timed(f)
        n = repeats
        if budget_s is not None and last > 0:
            n = max(min(repeats, min_repeats), min(repeats, int(budget_s / last)))
        wanted[name] = n
    samples: dict[str, list[float]] = {name: [] for name in contenders}
    names = list(contenders)
    for round_ in range(max(wanted.values(), default=0)):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            if len(samples[name]) < wanted[name]:
                samples[name].append(timed(contenders[name]))
    return samples


def spread(values: Sequence[float]) -> dict[str, float]:
    """``{"median", "q1", "q3", "rel_iqr"}`` of ``values`` (inclusive quartiles; rel_iqr = (q3 - q1) / median).

    With one value the quartiles are that value and rel_iqr is NaN (no spread can be measured).
    """
    values = list(values)
    if not values:
        raise ValueError("spread() needs at least one value")
    median = statistics.median(values)
    if len(values) < 2:
        return dict(median=median, q1=median, q3=median, rel_iqr=float("nan"))
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return dict(median=median, q1=q1, q3=q3, rel_iqr=(q3 - q1) / median if median else float("nan"))


def rel_iqr(values: Sequence[float]) -> float:
    """Interquartile range over the median: how noisy a contender's samples were (NaN below two samples)."""
    return spread(values)["rel_iqr"] if len(values) else float("nan")


def paired_ratios(numerator: Sequence[float], denominator: Sequence[float]) -> list[float]:
    """Round-by-round ratios ``numerator[i] / denominator[i]`` of two contenders timed in the same rounds."""
    n = min(len(numerator), len(denominator))
    return [numerator[i] / denominator[i] for i in range(n) if denominator[i] > 0]
