r"""The runtime benchmark (the paper's Figure 2, measured): the circular conv, its log-determinant, its inverse.

Finzi et al. (2019, Figure 2) time, for a batch of 32 images and a 3x3 filter, the forward conv,
the log-determinant and the inverse as the channel count :math:`c` grows (at 8x8) and as the image
side :math:`m` grows (at :math:`c = 64`). This module times, on one device and in one run:

* the forward conv: torch's spatial circular conv (``conv_spatial``, the reference every ratio is
  taken to) and ours in the Fourier domain (``conv_fourier``);
* ``logabsdet`` with the complex and the lifted backends (``logdet_complex``, ``logdet_lifted``);
* what a training step pays, with gradients: the conv's forward and backward (``conv_train``:
  torch's spatial circular conv, gradients for the input, weight and bias) and the log-determinant
  with its gradient (``logdet_train``); ``logdet_train_per_conv_train`` is the ratio of the two;
* the inverse with a fresh factorization at every call (``inverse_fresh``) and with the
  factorization cached by :class:`iconv.InvertibleConv2d` (``inverse_cached``: one batched product);
* two baselines written plainly in :mod:`iconv.bench.reference`: the paper's own route (``paper_inverse``: two-sided FFT, all
  :math:`hw` blocks lifted to real :math:`2c \times 2c` matrices and inverted at every call;
  ``paper_logdet``: the same full lifted spectrum, log-determinant by LU) and the dense route
  (``dense_logdet``, ``dense_inverse``: slogdet and solve of the :math:`chw \times chw` matrix, only
  where it fits);
* the parts of a fresh inverse (``part_fft``, ``part_spectrum``, ``part_factorize``, ``part_solve``),
  to see where the time goes;
* the round-trip error :math:`\|x - \mathrm{Conv}^{-1}(\mathrm{Conv}(x))\| / \|x\|` of every inverse.

Contenders run round-robin (the order rotates every round) so that noise from a shared machine
hits all of them alike; every time is a median, every ratio a ratio of medians. CPU times come
from ``time.perf_counter``, CUDA times from CUDA events.

Complexities (batch :math:`B`, kernel :math:`k`): the conv costs :math:`O(B c^2 k^2 hw)`; the
Fourier route :math:`O(B c\, hw \log hw)` for the FFTs, :math:`O(c^3 hw)` to factorize the blocks
once per weight and :math:`O(B c^2 hw)` to apply them; the dense route :math:`O(c^3 h^3 w^3)`.

This module measures one point (:func:`measure_point`), a list of them (:func:`run`) and formats
them (:func:`format_table`); :mod:`iconv.bench.reference` holds the baselines,
:mod:`iconv.bench.timing` the interleaved timing, :mod:`iconv.bench.io` the files, and
:mod:`iconv.bench.training` the training-throughput benchmark.

Command line (without ``--sweep`` or ``--point`` it measures the single point ``64x32``)::

    python -m iconv.bench --sweep ci --csv runtime.csv --json runtime.json
    python -m iconv.bench --point 64x32 --batch 32 --dtype float32 --repeats 15 --threads 1
    python -m iconv.bench --point 16x16 --dtype float64 --only logdet_complex,dense_logdet

On a CPU shared with other programs, ``--threads 1`` gives much steadier ratios: the batched
factorizations are hundreds of small LAPACK calls, and each loses far more than the conv does
when a second thread has to wait for a busy core.
"""
from __future__ import annotations

import datetime
import math
import os
import platform
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from ..core import fourier
from ..core.circular import circular_conv2d, dense_conv_matrix
from ..layers.conv import InvertibleConv2d
from .reference import dense_inverse, dense_logabsdet, paper_inverse, paper_logabsdet
from .timing import spread, time_interleaved

__all__ = ["CONTENDERS", "DENSE", "INVERSES", "LABELS", "PAPER_CHANNELS", "PAPER_SIZES", "REFERENCE", "SPEEDUPS",
           "SPEEDUP_LABELS", "SWEEPS", "Point", "check_contenders", "columns", "format_table", "measure_point",
           "metadata", "parse_point", "resolve_device", "resolve_dtype", "run", "sweep_points"]

#: Every contender, in table order. ``conv_spatial`` is the reference of every ratio.
CONTENDERS = (
    "conv_spatial", "conv_fourier",
    "logdet_complex", "logdet_lifted",
    "conv_train", "logdet_train",
    "inverse_fresh", "inverse_cached",
    "paper_inverse", "paper_logdet",
    "dense_logdet", "dense_inverse",
    "part_fft", "part_spectrum", "part_factorize", "part_solve",
)
REFERENCE = "conv_spatial"
INVERSES = ("inverse_fresh", "inverse_cached", "paper_inverse", "dense_inverse")
DENSE = ("dense_logdet", "dense_inverse")

#: ``speedup_<name>`` = time of the first contender / time of the second.
SPEEDUPS = {
    "inverse_fresh_vs_paper": ("paper_inverse", "inverse_fresh"),
    "inverse_cached_vs_paper": ("paper_inverse", "inverse_cached"),
    "logdet_vs_dense": ("dense_logdet", "logdet_complex"),
    "inverse_vs_dense": ("dense_inverse", "inverse_fresh"),
    "half_spectrum": ("paper_logdet", "logdet_lifted"),
    "caching": ("inverse_fresh", "inverse_cached"),
}

#: Short labels for the printed table.
SPEEDUP_LABELS = {
    "inverse_fresh_vs_paper": "fresh vs paper", "inverse_cached_vs_paper": "cached vs paper",
    "logdet_vs_dense": "lad vs dense", "inverse_vs_dense": "inv vs dense", "half_spectrum": "half-spec",
    "caching": "caching",
}
LABELS = {
    "conv_fourier": "conv F", "logdet_complex": "lad C", "logdet_lifted": "lad L",
    "conv_train": "conv f+b", "logdet_train": "lad f+b",
    "inverse_fresh": "inv fresh", "inverse_cached": "inv cached", "paper_inverse": "paper inv",
    "paper_logdet": "paper lad", "dense_logdet": "dense lad", "dense_inverse": "dense inv",
    "part_fft": "fft", "part_spectrum": "spectrum", "part_factorize": "LU", "part_solve": "solve",
}


@dataclass(frozen=True)
class Point:
    """One measurement: ``c`` channels, ``m x m`` images; ``sweep`` says which panel it belongs to."""

    sweep: str
    c: int
    m: int


PAPER_CHANNELS = (16, 32, 64, 128, 256, 512, 1024)  # at 8x8, Figure 2 left
PAPER_SIZES = (4, 8, 16, 32, 64, 128)  # at c = 64, Figure 2 right


def _sweep(channels: Sequence[int], at_m: int, sizes: Sequence[int], at_c: int) -> list[Point]:
    return [Point("channels", c, at_m) for c in channels] + [Point("spatial", at_c, m) for m in sizes]


SWEEPS = {
    "tiny": _sweep((2, 4), 4, (3, 5), 3),
    "ci": _sweep((8, 16, 32, 64), 8, (4, 8, 16, 32), 64),
    "paper": _sweep(PAPER_CHANNELS, 8, PAPER_SIZES, 64),
}


def sweep_points(name: str) -> list[Point]:
    """The points of a named sweep: ``tiny`` (tests), ``ci`` (the chapter on a CPU), ``paper`` (Figure 2)."""
    if name not in SWEEPS:
        raise ValueError(f"unknown sweep {name!r}; expected one of {sorted(SWEEPS)}")
    return list(SWEEPS[name])


def parse_point(text: str) -> Point:
    """``"64x32"`` -> ``Point("point", c=64, m=32)``."""
    try:
        c, m = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"a point is written CxM (channels x image side), e.g. 64x32; got {text!r}") from None
    if c < 1 or m < 1:
        raise ValueError(f"channels and image side must be positive, got {text!r}")
    return Point("point", c, m)


def check_contenders(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; expected names from {list(CONTENDERS)}")


# ---------------------------------------------------------------------------------------------
# One point.


def resolve_device(device: str | torch.device) -> torch.device:
    """``"auto"`` (CUDA when available), ``"cpu"``, ``"cuda"`` or ``"cuda:N"`` as a device; an error for a missing GPU."""
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} was asked for, but torch {torch.__version__} sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device}")
    return device


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"float32"``/``"float64"`` (or the dtype itself) as a dtype; anything else is an error."""
    table = {"float32": torch.float32, "float64": torch.float64}
    if isinstance(dtype, torch.dtype):
        dtype = str(dtype).replace("torch.", "")
    if dtype not in table:
        raise ValueError(f"dtype must be float32 or float64, got {dtype!r}")
    return table[dtype]


def _roundtrip(x: torch.Tensor, x_back: torch.Tensor) -> float:
    return float((x_back - x).norm() / x.norm())


def measure_point(
    point: Point,
    batch: int = 32,
    kernel_size: int = 3,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    repeats: int = 10,
    warmup: int = 2,
    budget_s: float | None = None,
    dense_limit: int = 4096,
    contenders: Sequence[str] | None = None,
    seed: int = 0,
) -> dict:
    """Time every contender at one point; returns one flat row (a dict) for the table, CSV and JSON.

    Columns: the point and settings; ``<name>_ms`` (median), ``<name>_rel_iqr`` (noise) and
    ``<name>_per_conv`` (ratio of medians to ``conv_spatial``) per contender; ``<inverse>_roundtrip``
    for every inverse; ``speedup_<name>`` per entry of :data:`SPEEDUPS`; ``blocks_full`` (``hw``)
    and ``blocks_half`` (``h (w//2+1)``). A contender that was not run has empty (NaN) columns; the
    dense route is skipped when ``c*h*w > dense_limit``, which ``dense_note`` says.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    names = list(CONTENDERS if contenders is None else contenders)
    check_contenders(names)
    if REFERENCE not in names:
        names.insert(0, REFERENCE)
    c, h, w = point.c, point.m, point.m
    n_dense = c * h * w
    dense_note = "" if n_dense <= dense_limit else f"skipped: chw = {n_dense} > {dense_limit}"
    if dense_note:
        names = [n for n in names if n not in DENSE]

    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    layer = InvertibleConv2d(c, kernel_size).to(device=device, dtype=dtype)
    with torch.no_grad():
        layer.bias.copy_(0.1 * torch.randn(c, generator=generator, dtype=torch.float64))
    weight, bias = layer.weight.detach(), layer.bias.detach()
    x = torch.randn(batch, c, h, w, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    y = circular_conv2d(x, weight, bias)  # (B, c, h, w)

    row = dict(sweep=point.sweep, c=c, h=h, w=w, batch=batch, kernel_size=kernel_size, device=device.type,
               hardware=metadata(device)["hardware"], dtype=str(dtype).replace("torch.", ""),
               threads=torch.get_num_threads(),
               blocks_full=h * w, blocks_half=h * (w // 2 + 1), dense_note=dense_note)

    with torch.no_grad():
        matrix = dense_conv_matrix(weight, h, w) if any(n in DENSE for n in names) else None
        layer.factorization(h, w)  # fill the layer's cache: inverse_cached never factorizes
        fact = fourier.factorize(weight, h, w)
        y_freq = fourier.to_frequencies(y - bias.view(1, -1, 1, 1))
        calls = {
            "conv_spatial": lambda: circular_conv2d(x, weight, bias),
            "conv_fourier": lambda: fourier.conv2d(x, weight, bias),
            "logdet_complex": lambda: fourier.logabsdet(weight, h, w, "complex"),
            "logdet_lifted": lambda: fourier.logabsdet(weight, h, w, "lifted"),
            "inverse_fresh": lambda: fourier.inverse(y, weight, bias),
            "inverse_cached": lambda: layer.inverse(y),
            "paper_inverse": lambda: paper_inverse(y, weight, bias),
            "paper_logdet": lambda: paper_logabsdet(weight, h, w),
            "dense_logdet": lambda: dense_logabsdet(matrix),
            "dense_inverse": lambda: dense_inverse(y, matrix, bias),
            "part_fft": lambda: fourier.from_frequencies(fourier.to_frequencies(y), h, w),
            "part_spectrum": lambda: fourier.spectrum(weight, h, w),
            "part_factorize": lambda: fourier.factorize(weight, h, w),
            "part_solve": lambda: fact.solve(y_freq),
        }
        x_train, weight_train, bias_train = (t.clone().requires_grad_(True) for t in (x, weight, bias))
        calls["conv_train"] = _with_gradients(lambda: circular_conv2d(x_train, weight_train, bias_train).backward(y))
        calls["logdet_train"] = _with_gradients(lambda: fourier.logabsdet(weight_train, h, w).backward())
        for name in [n for n in INVERSES if n in names]:
            row[f"{name}_roundtrip"] = _roundtrip(x, calls[name]())
        samples = time_interleaved({n: calls[n] for n in names}, repeats, warmup, device, budget_s)

    for name in CONTENDERS:
        if name in samples:
            stats = spread(samples[name])
            row[f"{name}_ms"] = 1e3 * stats["median"]
            row[f"{name}_rel_iqr"] = stats["rel_iqr"]
            row[f"{name}_repeats"] = len(samples[name])
        else:
            row[f"{name}_ms"] = row[f"{name}_rel_iqr"] = float("nan")
            row[f"{name}_repeats"] = 0
        if name in INVERSES:
            row.setdefault(f"{name}_roundtrip", float("nan"))
    for name in CONTENDERS:
        if name != REFERENCE:
            row[f"{name}_per_conv"] = row[f"{name}_ms"] / row[f"{REFERENCE}_ms"]
    for name, (slow, fast) in SPEEDUPS.items():
        row[f"speedup_{name}"] = row[f"{slow}_ms"] / row[f"{fast}_ms"]
    row["logdet_train_per_conv_train"] = row["logdet_train_ms"] / row["conv_train_ms"]
    return row


def _with_gradients(call: Callable[[], object]) -> Callable[[], object]:
    """``call`` run with autograd on (the timed calls otherwise run under ``torch.no_grad``)."""
    def timed():
        with torch.enable_grad():
            return call()
    return timed


def columns() -> list[str]:
    """The CSV columns, in order (every row of :func:`measure_point` has exactly these keys)."""
    cols = ["sweep", "c", "h", "w", "batch", "kernel_size", "device", "hardware", "dtype", "threads",
            "blocks_full", "blocks_half", "dense_note"]
    cols += [f"{n}_{s}" for n in CONTENDERS for s in ("ms", "rel_iqr", "repeats")]
    cols += [f"{n}_per_conv" for n in CONTENDERS if n != REFERENCE]
    cols += [f"{n}_roundtrip" for n in INVERSES]
    cols += [f"speedup_{n}" for n in SPEEDUPS]
    return cols + ["logdet_train_per_conv_train"]


def run(
    points: Sequence[Point],
    progress: bool = False,
    on_row: Callable[[list[dict]], None] | None = None,
    **settings,
) -> list[dict]:
    """:func:`measure_point` at every point (a point met twice, in two sweeps, is measured once).

    ``on_row(rows)``, if given, is called with the rows so far after every point (to save partial
    results of a long sweep).
    """
    rows, seen = [], {}
    iterator = points
    if progress:
        from tqdm.auto import tqdm

        iterator = tqdm(points, desc="runtime sweep", unit="point")
    for point in iterator:
        key = (point.c, point.m)
        if key not in seen:
            seen[key] = measure_point(point, **settings)
        rows.append({**seen[key], "sweep": point.sweep})
        if on_row is not None:
            on_row(rows)
    return rows


# ---------------------------------------------------------------------------------------------
# Output.


def _fmt(value: float) -> str:
    """Three significant digits, whole numbers from 1000 on, '-' for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"


def format_table(rows: Sequence[dict]) -> str:
    """Times of the reference conv, every other contender as a ratio to it, and the speed-ups."""
    ratio_names = [n for n in CONTENDERS if n != REFERENCE and any(r[f"{n}_repeats"] for r in rows)]
    head = ["sweep", "c", "m", "conv ms"] + [LABELS[n] for n in ratio_names] + \
           ["lad f+b / conv f+b"] + [f"x {SPEEDUP_LABELS[n]}" for n in SPEEDUPS] + ["roundtrip max"]
    body = []
    for r in rows:
        trips = [r[f"{n}_roundtrip"] for n in INVERSES if not math.isnan(r[f"{n}_roundtrip"])]
        body.append([r["sweep"], str(r["c"]), str(r["h"]), _fmt(r[f"{REFERENCE}_ms"])]
                    + [_fmt(r[f"{n}_per_conv"]) for n in ratio_names]
                    + [_fmt(r["logdet_train_per_conv_train"])]
                    + [_fmt(r[f"speedup_{n}"]) for n in SPEEDUPS]
                    + [f"{max(trips):.1e}" if trips else "-"])
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [head] + body]
    notes = sorted({f"c={r['c']} m={r['h']}: dense route {r['dense_note']}" for r in rows if r["dense_note"]})
    legend = ("conv ms = median of torch's spatial circular conv; other columns before 'x' = time / conv time; "
              "f+b = forward + backward (with gradients); "
              "'x a vs b' = time of b / time of a (half-spec: paper lad / lad L; caching: inv fresh / inv cached); "
              "- = not run")
    return "\n".join(lines + [legend] + notes)


def metadata(device: str | torch.device = "cpu") -> dict:
    """Where and how the numbers were measured."""
    device = torch.device(device)
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        hardware = platform.processor() or platform.machine()
        try:
            with open("/proc/cpuinfo") as handle:
                hardware = next(line.split(":", 1)[1].strip() for line in handle if line.startswith("model name"))
        except (OSError, StopIteration):
            pass
    return dict(torch=torch.__version__, python=platform.python_version(), device=device.type,
                hardware=hardware, cpu_count=os.cpu_count(), threads=torch.get_num_threads(),
                date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"))
