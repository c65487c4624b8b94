"""``python -m iconv.bench``: the runtime benchmark (default) or, with ``--training``, the training throughput.

Runtime (:mod:`iconv.bench.core`)::

    python -m iconv.bench --sweep ci --csv runtime.csv --json runtime.json
    python -m iconv.bench --point 64x32 --batch 32 --dtype float32 --repeats 15 --threads 1
    python -m iconv.bench --point 16x16 --dtype float64 --only logdet_complex,dense_logdet

Training throughput (:mod:`iconv.bench.training`)::

    python -m iconv.bench --training                      # ConvFlow vs Glow, 1 and 2 threads, batch 64
    python -m iconv.bench --training --threads 1 --image cifar10 --depth 8 --csv training.csv
    python -m iconv.bench --training --depth 12 --kernel-size 5   # the flow study's large pair
"""
from __future__ import annotations

import argparse
import sys
from typing import Sequence

import torch

from .core import CONTENDERS, SWEEPS, Point, check_contenders, format_table, metadata, parse_point, resolve_device, \
    run, sweep_points
from .io import write_csv, write_json
from .training import MODELS, format_training_table, measure_training, parse_image, training_columns

__all__ = ["main", "parser"]


def _thread_counts(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        counts = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        counts = []
    if not counts or min(counts) < 1:
        raise ValueError(f"--threads takes positive thread counts, e.g. 1 or 1,2; got {text!r}")
    return counts


def parser() -> argparse.ArgumentParser:
    """The command line's argument parser."""
    p = argparse.ArgumentParser(
        prog="python -m iconv.bench",
        description="Time the circular conv, its log-determinant and its inverse (Finzi et al. 2019, "
                    "Figure 2) against the paper's route and the dense route, side by side; or, with "
                    "--training, the training step of ConvFlow against the Glow baseline.",
    )
    p.add_argument("--training", action="store_true",
                   help="training throughput: steps/s and peak memory of ConvFlow and the Glow baseline "
                        "(equal parameter count), forward + backward of the mean NLL")
    p.add_argument("--sweep", choices=sorted(SWEEPS), default=None,
                   help="named sweep: tiny, ci (reduced, CPU) or paper (c up to 1024 at 8x8, m up to 128 at c=64)")
    p.add_argument("--point", action="append", default=[], metavar="CxM",
                   help="a single point, c channels on m x m images, e.g. 64x32 (repeatable; "
                        "the default when no --sweep is given)")
    p.add_argument("--batch", type=int, default=None,
                   help="images per batch (default 32 as the paper; 64 with --training)")
    p.add_argument("--kernel-size", type=int, default=3,
                   help="odd filter size k (default 3; with --training: ConvFlow's kernels)")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:1 or auto (default)")
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--repeats", type=int, default=10, help="timed calls per contender (median taken)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls per contender first")
    p.add_argument("--budget", type=float, default=None, metavar="SECONDS",
                   help="cap each contender's timed calls at about this many seconds (at least 3 calls)")
    p.add_argument("--dense-limit", type=int, default=4096,
                   help="run the dense chw x chw route only where c*h*w is at most this")
    p.add_argument("--only", default=None, metavar="NAMES",
                   help=f"comma-separated contenders (conv_spatial is always added): {','.join(CONTENDERS)}")
    p.add_argument("--threads", default=None, metavar="N[,N...]",
                   help="torch CPU threads (default: torch's; with --training: 1,2, one run each)")
    p.add_argument("--image", default="fashion-mnist", metavar="CxHxW",
                   help="--training: image shape, or fashion-mnist (1x28x28, default) or cifar10 (3x32x32)")
    p.add_argument("--depth", type=int, default=8,
                   help="--training: ConvFlow steps per scale (the baseline gets half; default 8)")
    p.add_argument("--models", default=",".join(MODELS), metavar="NAMES",
                   help=f"--training: comma-separated models (default {','.join(MODELS)})")
    p.add_argument("--no-memory", action="store_true", help="--training: skip the peak-memory measurement")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and images")
    p.add_argument("--csv", default=None, help="write the rows to this CSV file")
    p.add_argument("--json", default=None, help="write metadata and rows to this JSON file")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p


def _save(rows, args, meta, columns=None) -> None:
    if args.csv:
        write_csv(rows, args.csv, columns)
    if args.json:
        write_json(rows, args.json, meta)


def _main_training(p: argparse.ArgumentParser, args) -> list[dict]:
    try:
        shape = parse_image(args.image)
        threads = _thread_counts(args.threads) or [1, 2]
        models = [m.strip() for m in args.models.split(",") if m.strip()]
        device = resolve_device(args.device)
        for name, value in (("--depth", args.depth), ("--repeats", args.repeats)):
            if value < 1:
                raise ValueError(f"{name} must be positive, got {value}")
        if args.kernel_size < 1 or args.kernel_size % 2 == 0:
            raise ValueError(f"--kernel-size must be a positive odd number, got {args.kernel_size}")
    except (ValueError, RuntimeError) as error:
        p.error(str(error))
    batch = 64 if args.batch is None else args.batch
    settings = dict(shape=shape, depth=args.depth, kernel_size=args.kernel_size, batch=batch, device=device,
                    dtype=args.dtype, threads=threads, repeats=args.repeats, warmup=args.warmup, models=models,
                    seed=args.seed, memory=not args.no_memory)
    meta = {**metadata(device), **{k: (str(v) if k == "device" else v) for k, v in settings.items()},
            "mode": "training"}
    print(f"iconv.bench --training | torch {meta['torch']} | {meta['device']}: {meta['hardware']} | {args.dtype} | "
          f"image {'x'.join(map(str, shape))} | batch {batch} | {args.repeats} repeats", flush=True)
    try:
        rows = measure_training(**settings)
    except ValueError as error:
        p.error(str(error))
    _save(rows, args, meta, training_columns())
    print(format_training_table(rows))
    return rows


def main(argv: Sequence[str] | None = None) -> list[dict]:
    """The command line: measure, print the table, write CSV/JSON; returns the rows."""
    p = parser()
    args = p.parse_args(argv)
    if args.training:
        rows = _main_training(p, args)
    else:
        try:
            points = [parse_point(text) for text in args.point]
            if args.sweep:
                points = sweep_points(args.sweep) + points
            if not points:
                points = [Point("point", 64, 32)]
            contenders = None if args.only is None else [n.strip() for n in args.only.split(",") if n.strip()]
            if contenders is not None:
                check_contenders(contenders)
            threads = _thread_counts(args.threads)
            if threads is not None:
                if len(threads) != 1:
                    raise ValueError(f"--threads takes one count for the runtime benchmark, got {args.threads!r}")
                torch.set_num_threads(threads[0])
            device = resolve_device(args.device)
        except (ValueError, RuntimeError) as error:
            p.error(str(error))
        batch = 32 if args.batch is None else args.batch
        settings = dict(batch=batch, kernel_size=args.kernel_size, device=device, dtype=args.dtype,
                        repeats=args.repeats, warmup=args.warmup, budget_s=args.budget,
                        dense_limit=args.dense_limit, contenders=contenders, seed=args.seed)
        meta = {**metadata(device), **{k: (str(v) if k == "device" else v) for k, v in settings.items()}}
        print(f"iconv.bench | torch {meta['torch']} | {meta['device']}: {meta['hardware']} | "
              f"{meta['threads']} threads | {args.dtype} | batch {batch} | {args.repeats} repeats", flush=True)
        # saved after every point, so that an interrupted sweep keeps what it measured
        rows = run(points, progress=not args.quiet, on_row=lambda rows: _save(rows, args, meta), **settings)
        print(format_table(rows))
    for path in (args.csv, args.json):
        if path:
            print(f"wrote {path}")
    return rows


if __name__ == "__main__":  # pragma: no cover - python -m iconv.bench runs __main__.py
    main(sys.argv[1:])
