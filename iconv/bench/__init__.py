"""Benchmarks: the runtime of the conv, its log-determinant and inverse (the paper's Figure 2), and training throughput.

* :mod:`iconv.bench.core`: the runtime benchmark (:func:`measure_point`, :func:`run`,
  :func:`format_table`, the sweeps and contenders);
* :mod:`iconv.bench.reference`: the paper's route and the dense route, written plainly;
* :mod:`iconv.bench.timing`: :func:`time_interleaved` (round-robin timing) and spread statistics;
* :mod:`iconv.bench.io`: :func:`write_csv`, :func:`read_csv` (its inverse), :func:`write_json`,
  all writes atomic;
* :mod:`iconv.bench.training`: steps/s and peak memory of a flow training step, ConvFlow against
  the Glow baseline at equal parameter count (:func:`measure_training`);
* :mod:`iconv.bench.cli`: ``python -m iconv.bench`` (``--training`` for the second benchmark).
"""
from .cli import main
from .core import (CONTENDERS, DENSE, INVERSES, LABELS, PAPER_CHANNELS, PAPER_SIZES, REFERENCE, SPEEDUP_LABELS,
                   SPEEDUPS, SWEEPS, Point, check_contenders, columns, format_table, measure_point, metadata,
                   parse_point, resolve_device, resolve_dtype, run, sweep_points)
from .io import read_csv, write_csv, write_json
from .reference import dense_inverse, dense_logabsdet, paper_inverse, paper_logabsdet, paper_spectrum
from .timing import call_timer, paired_ratios, rel_iqr, spread, time_interleaved
from .training import (TRAINING_SHAPES, build_models, format_training_table, measure_training, parse_image,
                       peak_memory, training_columns, training_step)

__all__ = [
    "CONTENDERS", "DENSE", "INVERSES", "LABELS", "PAPER_CHANNELS", "PAPER_SIZES", "REFERENCE", "SPEEDUPS",
    "SPEEDUP_LABELS", "SWEEPS", "TRAINING_SHAPES", "Point", "build_models", "call_timer", "check_contenders",
    "columns", "dense_inverse", "dense_logabsdet", "format_table", "format_training_table", "main",
    "measure_point", "measure_training", "metadata", "paired_ratios", "paper_inverse", "paper_logabsdet",
    "paper_spectrum", "parse_image", "parse_point", "peak_memory", "read_csv", "rel_iqr", "resolve_device",
    "resolve_dtype", "run", "spread", "sweep_points", "time_interleaved", "training_columns", "training_step",
    "write_csv", "write_json",
]
