r"""Runtime of the circular conv, its log-determinant and its inverse: the paper's Figure 2, measured.

Finzi et al. (2019, Figure 2) time, for a batch of 32 images and a 3x3 filter, the forward conv,
the log-determinant and the inverse as the channel count :math:`c` grows (at 8x8) and as the image
side :math:`m` grows (at :math:`c = 64`). This module times, on one device and in one run:

* the forward conv: torch's spatial circular conv (``conv_spatial``, the reference every ratio is
  taken to) and ours in the Fourier domain (``conv_fourier``);
* ``logabsdet`` with the complex and the lifted backends (``logdet_complex``, ``logdet_lifted``);
* the inverse with a fresh factorization at every call (``inverse_fresh``) and with the
  factorization cached by :class:`iconv.InvertibleConv2d` (``inverse_cached``: one batched product);
* two baselines written plainly below: the paper's own route (``paper_inverse``: two-sided FFT, all
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

Command line (without ``--sweep`` or ``--point`` it measures the single point ``64x32``)::

    python -m iconv.bench --sweep ci --csv runtime.csv --json runtime.json
    python -m iconv.bench --point 64x32 --batch 32 --dtype float32 --repeats 15 --threads 1
    python -m iconv.bench --point 16x16 --dtype float64 --only logdet_complex,dense_logdet

On a CPU shared with other programs, ``--threads 1`` gives much steadier ratios: the batched
factorizations are hundreds of small LAPACK calls, and each loses far more than the conv does
when a second thread has to wait for a busy core.
"""
from __future__ import annotations

import argparse
import csv
import datetime
import json
import math
import os
import platform
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, Sequence

import torch

from .core import fourier, lifting
from .core.circular import circular_conv2d, dense_conv_matrix
from .core.threads import safe_factorization_threads
from .layers.conv import InvertibleConv2d

# ---------------------------------------------------------------------------------------------
# The baselines, written plainly.


def paper_spectrum(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    r"""All :math:`hw` Fourier blocks ``(h * w, c, c)`` complex, from a two-sided FFT of the kernel.

    The kernel is flipped and zero-embedded in an ``h x w`` grid (tap ``a`` lands at
    ``(p - a) mod h``, wrapped taps add up), so that its ``fft2`` is
    :math:`\sum_a W[a] e^{+2\pi i \langle f, a - p\rangle/(h, w)} = A_f`, the paper's
    :math:`\mathcal F(W)^*`. Equals :func:`iconv.fourier.spectrum` on the half spectrum.
    """
    c, _, k, _ = weight.shape
    p = k // 2
    taps = torch.arange(k, device=weight.device)
    rows, cols = (p - taps) % h, (p - taps) % w
    where = (rows[:, None] * w + cols[None, :]).reshape(-1)  # (k*k,) flat position of each tap
    grid = weight.new_zeros(c * c, h * w).index_add_(1, where, weight.reshape(c * c, k * k))
    blocks = torch.fft.fft2(grid.view(c, c, h, w))  # (c, c, h, w)
    return blocks.permute(2, 3, 0, 1).reshape(h * w, c, c)  # (h*w, c, c)


def paper_inverse(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    r"""The inverse as the paper computed it, everything recomputed at every call.

    Two-sided FFT of ``y``; the full spectrum's :math:`hw` blocks, each lifted to the real
    :math:`2c \times 2c` matrix :math:`\phi(A_f)` and inverted (``torch.linalg.inv``); the lifted
    inverses applied to the lifted coefficients; inverse FFT; real part.
    """
    B, c, h, w = y.shape
    if bias is not None:
        y = y - bias.view(1, -1, 1, 1)
    lifted = lifting.lift(paper_spectrum(weight, h, w))  # (h*w, 2c, 2c)
    with safe_factorization_threads(lifted):
        inverses = torch.linalg.inv(lifted)  # (h*w, 2c, 2c)
    Yf = torch.fft.fft2(y).permute(2, 3, 1, 0).reshape(h * w, c, B)  # (h*w, c, B)
    Xf = lifting.unlift_vector(torch.bmm(inverses, lifting.lift_vector(Yf)))  # (h*w, c, B)
    return torch.fft.ifft2(Xf.reshape(h, w, c, B).permute(3, 2, 0, 1)).real  # (B, c, h, w)


def paper_logabsdet(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    r"""``log|det|`` over the full spectrum of lifted blocks: :math:`\sum_f \tfrac12\log|\det\phi(A_f)|`.

    The paper's cost structure (all :math:`hw` blocks, real :math:`2c \times 2c`), with an exact LU
    where the authors used a Cholesky of :math:`DD^\top` plus jitter. Against ``logdet_lifted``
    (the same LU on the half spectrum) it measures the half-spectrum gain.
    """
    lifted = lifting.lift(paper_spectrum(weight, h, w))  # (h*w, 2c, 2c)
    with safe_factorization_threads(lifted):
        LU, _, _ = torch.linalg.lu_factor_ex(lifted)
    return 0.5 * LU.diagonal(dim1=-2, dim2=-1).abs().log().sum()


def dense_logabsdet(matrix: torch.Tensor) -> torch.Tensor:
    """``log|det|`` of the dense ``chw x chw`` conv matrix (:func:`iconv.dense_conv_matrix`) by LU."""
    return torch.linalg.slogdet(matrix)[1]


def dense_inverse(y: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Solve the dense ``chw x chw`` system for every image of ``y`` ``(B, c, h, w)`` (LU at every call)."""
    if bias is not None:
        y = y - bias.view(1, -1, 1, 1)
    rhs = y.reshape(y.shape[0], -1).T  # (chw, B)
    return torch.linalg.solve(matrix, rhs).T.reshape(y.shape)


# ---------------------------------------------------------------------------------------------
# What is timed.

#: Every contender, in table order. ``conv_spatial`` is the reference of every ratio.
CONTENDERS = (
    "conv_spatial", "conv_fourier",
    "logdet_complex", "logdet_lifted",
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


def _check_contenders(names: Sequence[str]) -> None:
    unknown = [n for n in names if n not in CONTENDERS]
    if unknown:
        raise ValueError(f"unknown contender(s) {unknown}; expected names from {list(CONTENDERS)}")


# ---------------------------------------------------------------------------------------------
# Timing.


def _call_timer(device: torch.device) -> Callable[[Callable[[], object]], float]:
    """A function that runs ``f()`` once and returns its duration in seconds."""
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
    """
    if repeats < 1 or warmup < 0 or min_repeats < 1:
        raise ValueError(f"need repeats >= 1, warmup >= 0, min_repeats >= 1; got {repeats}, {warmup}, {min_repeats}")
    timed = _call_timer(torch.device(device))
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


def _rel_iqr(values: Sequence[float]) -> float:
    """Interquartile range over the median: how noisy a contender's samples were."""
    if len(values) < 2:
        return float("nan")
    q1, _, q3 = statistics.quantiles(values, n=4, method="inclusive")
    return (q3 - q1) / statistics.median(values)


# ---------------------------------------------------------------------------------------------
# One point.


def _resolve_device(device: str | torch.device) -> torch.device:
    if str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device} was asked for, but torch {torch.__version__} sees no CUDA device")
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"device must be cpu, cuda or auto, got {device}")
    return device


def _resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
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
    device, dtype = _resolve_device(device), _resolve_dtype(dtype)
    names = list(CONTENDERS if contenders is None else contenders)
    _check_contenders(names)
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
        for name in [n for n in INVERSES if n in names]:
            row[f"{name}_roundtrip"] = _roundtrip(x, calls[name]())
        samples = time_interleaved({n: calls[n] for n in names}, repeats, warmup, device, budget_s)

    for name in CONTENDERS:
        if name in samples:
            row[f"{name}_ms"] = 1e3 * statistics.median(samples[name])
            row[f"{name}_rel_iqr"] = _rel_iqr(samples[name])
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
    return row


def columns() -> list[str]:
    """The CSV columns, in order (every row of :func:`measure_point` has exactly these keys)."""
    cols = ["sweep", "c", "h", "w", "batch", "kernel_size", "device", "hardware", "dtype", "threads",
            "blocks_full", "blocks_half", "dense_note"]
    cols += [f"{n}_{s}" for n in CONTENDERS for s in ("ms", "rel_iqr", "repeats")]
    cols += [f"{n}_per_conv" for n in CONTENDERS if n != REFERENCE]
    cols += [f"{n}_roundtrip" for n in INVERSES]
    cols += [f"speedup_{n}" for n in SPEEDUPS]
    return cols


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
           [f"x {SPEEDUP_LABELS[n]}" for n in SPEEDUPS] + ["roundtrip max"]
    body = []
    for r in rows:
        trips = [r[f"{n}_roundtrip"] for n in INVERSES if not math.isnan(r[f"{n}_roundtrip"])]
        body.append([r["sweep"], str(r["c"]), str(r["h"]), _fmt(r[f"{REFERENCE}_ms"])]
                    + [_fmt(r[f"{n}_per_conv"]) for n in ratio_names]
                    + [_fmt(r[f"speedup_{n}"]) for n in SPEEDUPS]
                    + [f"{max(trips):.1e}" if trips else "-"])
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [head] + body]
    notes = sorted({f"c={r['c']} m={r['h']}: dense route {r['dense_note']}" for r in rows if r["dense_note"]})
    legend = ("conv ms = median of torch's spatial circular conv; other columns before 'x' = time / conv time; "
              "'x a vs b' = time of b / time of a (half-spec: paper lad / lad L; caching: inv fresh / inv cached); "
              "- = not run")
    return "\n".join(lines + [legend] + notes)


def _atomic_write(path: str, write: Callable) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".bench-", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            write(handle)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def write_csv(rows: Sequence[dict], path: str) -> None:
    """One line per point, columns from :func:`columns` (NaN where a contender did not run)."""
    def write(handle):
        writer = csv.DictWriter(handle, fieldnames=columns())
        writer.writeheader()
        writer.writerows(rows)
    _atomic_write(path, write)


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


def write_json(rows: Sequence[dict], path: str, meta: dict) -> None:
    """``{"meta": ..., "rows": [...]}`` with NaN written as null."""
    clean = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()} for r in rows]
    _atomic_write(path, lambda handle: json.dump({"meta": meta, "rows": clean}, handle, indent=1))


# ---------------------------------------------------------------------------------------------
# Command line.


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m iconv.bench",
        description="Time the circular conv, its log-determinant and its inverse (Finzi et al. 2019, "
                    "Figure 2) against the paper's route and the dense route, side by side.",
    )
    parser.add_argument("--sweep", choices=sorted(SWEEPS), default=None,
                        help="named sweep: tiny, ci (reduced, CPU) or paper (c up to 1024 at 8x8, m up to 128 at c=64)")
    parser.add_argument("--point", action="append", default=[], metavar="CxM",
                        help="a single point, c channels on m x m images, e.g. 64x32 (repeatable; "
                             "the default when no --sweep is given)")
    parser.add_argument("--batch", type=int, default=32, help="images per batch (default 32, as the paper)")
    parser.add_argument("--kernel-size", type=int, default=3, help="odd filter size k (default 3)")
    parser.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    parser.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    parser.add_argument("--repeats", type=int, default=10, help="timed calls per contender (median taken)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first")
    parser.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                        help="cap each contender's timed calls at about this many seconds (at least 3 calls)")
    parser.add_argument("--dense-limit", type=int, default=4096,
                        help="run the dense chw x chw route only where c*h*w is at most this")
    parser.add_argument("--only", default=None, metavar="NAMES",
                        help=f"comma-separated contenders (conv_spatial is always added): {','.join(CONTENDERS)}")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and images")
    parser.add_argument("--csv", default=None, help="write the rows to this CSV file")
    parser.add_argument("--json", default=None, help="write metadata and rows to this JSON file")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    return parser


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """The command line: measure, print the table, write CSV/JSON; returns the rows."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        points = [parse_point(p) for p in args.point]
        if args.sweep:
            points = sweep_points(args.sweep) + points
        if not points:
            points = [Point("point", 64, 32)]
        contenders = None if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
        if contenders is not None:
            _check_contenders(contenders)
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError(f"--threads must be positive, got {args.threads}")
            torch.set_num_threads(args.threads)
        device = _resolve_device(args.device)
    except (ValueError, RuntimeError) as error:
        parser.error(str(error))
    settings = dict(batch=args.batch, kernel_size=args.kernel_size, device=device, dtype=args.dtype,
                    repeats=args.repeats, warmup=args.warmup, budget_s=args.budget,
                    dense_limit=args.dense_limit, contenders=contenders, seed=args.seed)
    meta = {**metadata(device), **{k: (str(v) if k == "device" else v) for k, v in settings.items()}}
    print(f"iconv.bench | torch {meta['torch']} | {meta['device']}: {meta['hardware']} | "
          f"{meta['threads']} threads | {args.dtype} | batch {args.batch} | {args.repeats} repeats", flush=True)
    def save(rows):  # after every point, so that an interrupted sweep keeps what it measured
        if args.csv:
            write_csv(rows, args.csv)
        if args.json:
            write_json(rows, args.json, meta)

    rows = run(points, progress=not args.quiet, on_row=save, **settings)
    print(format_table(rows))
    for path in (args.csv, args.json):
        if path:
            print(f"wrote {path}")
    return rows


if __name__ == "__main__":
    main(sys.argv[1:])
