"""The command line ``python -m iconv.train``: the experiments of :mod:`iconv.configs`, with overrides.

::

    python -m iconv.train flow --size ci --out runs/flow --checkpoint runs/flow.pt
    python -m iconv.train flow --model glow --steps 5000 --checkpoint runs/glow.pt --resume
    python -m iconv.train flow --size gpu --checkpoint runs/flow.pt --resume-if-exists   # job schedulers
    torchrun --nproc_per_node=2 -m iconv.train flow --size gpu ...
    python -m iconv.train classify --size ci --row 6 --out runs/row6

``--size`` picks the experiment of :func:`iconv.configs.flow` / :func:`iconv.configs.classifier`;
every other flag overrides one setting. Preflight, before anything is trained: every numeric flag
is checked against its range (the error names the flag, the range and the value), the output
folder and the checkpoint location must be writable, an existing checkpoint is refused unless
the run resumes it (``--resume``, ``--resume-if-exists``) or ``--overwrite`` replaces it, and
``--resume`` needs an existing checkpoint. A resume must be the same run (see
:mod:`iconv.train.loop`); ``--steps``, ``--time-limit``, ``--clock``, ``--eval-every``,
``--eval-size``, ``--checkpoint-every``, ``--log-every``, ``--device``, ``--out``, ``--samples``,
``--threads`` and ``--no-progress`` may change on resume.

Exit status: 0 done, 2 refused (a bad flag, a location, a checkpoint) or training diverged.
"""
from __future__ import annotations

import argparse
import json
import math
import sys

import torch

from .. import configs
from ..distributed import cleanup, is_main_process
from .checkpoint import CheckpointError
from .experiment import run
from .files import OutputLocationError
from .loop import ResumeError, TrainingDiverged

__all__ = ["experiment_from_args", "main", "parser"]


def _integer(low: int, high: int | None = None, parity: str | None = None):
    """An argparse type: an int in ``[low, high]`` (optionally odd or even)."""
    what = f"an int >= {low}" if high is None else f"an int in [{low}, {high}]"
    if parity:
        what = f"{what}, {parity}"

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        bad_parity = parity is not None and (value % 2 == 1) != (parity == "odd")
        if value < low or (high is not None and value > high) or bad_parity:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def _number(low: float, high: float | None = None, low_open: bool = False, high_open: bool = False):
    """An argparse type: a finite float in the interval from ``low`` to ``high``."""
    left, right = "(" if low_open else "[", ")" if high_open else "]"
    what = f"a finite number in {left}{low:g}, {'inf)' if high is None else f'{high:g}{right}'}"

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text!r}") from None
        ok = math.isfinite(value) and (value > low if low_open else value >= low)
        if high is not None:
            ok = ok and (value < high if high_open else value <= high)
        if not ok:
            raise argparse.ArgumentTypeError(f"must be {what}, got {text}")
        return value

    return parse


def _common_arguments(p: argparse.ArgumentParser, sizes) -> None:
    p.add_argument("--size", choices=sizes, default="ci", help="the experiment of iconv.configs (default: ci)")
    p.add_argument("--data", choices=configs.DATA_SETS, help="data set (default: the size's)")
    p.add_argument("--data-root", default=None, help="where the data files are (default: iconv.data's search path)")
    p.add_argument("--download", action="store_true", help="download the data set if it is missing")
    p.add_argument("--train-images", type=_integer(1), help="train on at most the first N training images")
    p.add_argument("--holdout", type=_integer(0), help="drop the last N training images (held out)")
    p.add_argument("--eval-size", type=_integer(1), help="evaluate on at most the first N test images")
    p.add_argument("--steps", type=_integer(1), help="optimiser steps (overrides --epochs)")
    p.add_argument("--epochs", type=_number(0, low_open=True), help="epochs over the training images")
    p.add_argument("--batch-size", type=_integer(1), help="global batch size")
    p.add_argument("--lr", type=_number(0, low_open=True), help="peak learning rate")
    p.add_argument("--warmup", type=_integer(0), help="linear warm-up steps")
    p.add_argument("--schedule", choices=("cosine", "constant"))
    p.add_argument("--clip", type=_number(0), help="max gradient norm (0: off)")
    p.add_argument("--eval-every", type=_integer(0), help="evaluate every N steps (0: at the end only)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file, written atomically")
    p.add_argument("--checkpoint-every", type=_integer(0), help="checkpoint every N steps (0: at the end only)")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument("--resume", action="store_true", help="continue from --checkpoint, which must exist")
    mode.add_argument("--resume-if-exists", action="store_true",
                      help="continue from --checkpoint if it exists, else start (for job schedulers)")
    mode.add_argument("--overwrite", action="store_true", help="start a new run even if --checkpoint exists")
    p.add_argument("--out", default=None, help="folder for history.json, metrics.json (and samples.png)")
    p.add_argument("--seed", type=_integer(0), help="random seed (default: 0)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--time-limit", type=_number(0, low_open=True), help="stop after this many seconds")
    p.add_argument("--clock", choices=("wall", "process"), help="what --time-limit counts")
    p.add_argument("--threads", type=_integer(1), default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--log-every", type=_integer(1), default=None, help="history row every N steps")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def parser() -> argparse.ArgumentParser:
    """The argument parser of ``python -m iconv.train``."""
    top = argparse.ArgumentParser(prog="python -m iconv.train",
                                  description="Train the book's models (iconv.configs experiments) with iconv.train.")
    sub = top.add_subparsers(dest="task", required=True)
    flow = sub.add_parser("flow", help="train a normalizing flow (ConvFlow or the Glow baseline)")
    _common_arguments(flow, configs.FLOW_SIZES)
    flow.add_argument("--model", choices=("convflow", "glow"), default="convflow")
    flow.add_argument("--depth", type=_integer(1), help="ConvFlow steps per scale (Glow: depth // 2)")
    flow.add_argument("--kernel-size", type=_integer(1, parity="odd"), help="ConvFlow's conv kernel size")
    flow.add_argument("--downsample", choices=("squeeze", "nn", "avg"), help="ConvFlow's downsampling")
    flow.add_argument("--hidden", type=_integer(1), help="Glow coupling width (default: ConvFlow's parameter count)")
    flow.add_argument("--samples", type=_integer(0), help="samples drawn into samples.png at the end (0: none)")
    cls = sub.add_parser("classify", help="train the (invertible) CNN classifier of Table 1")
    _common_arguments(cls, configs.CLASSIFIER_SIZES)
    cls.add_argument("--row", type=_integer(1, len(configs.TABLE1)), default=1,
                     help="the Table 1 row whose switches to use (1..6; default 1, the base convnet)")
    cls.add_argument("--width", type=_integer(2, parity="even"))
    cls.add_argument("--padding", choices=("zeros", "circular"))
    cls.add_argument("--activation", choices=("relu", "sneaky"))
    cls.add_argument("--downsample", choices=("maxpool", "squeeze", "nn", "avg"))
    cls.add_argument("--optimizer", choices=("adam", "sgd"))
    cls.add_argument("--momentum", type=_number(0, 1, high_open=True))
    cls.add_argument("--weight-decay", type=_number(0))
    cls.add_argument("--augment", action=argparse.BooleanOptionalAction, default=None)
    cls.add_argument("--spectral-weight", type=_number(0), help="weight of the spectral penalty (0: off)")
    cls.add_argument("--spectral-floor", type=_number(0, 1, low_open=True, high_open=True))
    return top


def _given(args, names) -> dict:
    return {name: getattr(args, name) for name in names if getattr(args, name, None) is not None}


def experiment_from_args(args) -> configs.Experiment:
    """The experiment of ``--size`` with every given flag applied (raises ValueError when inconsistent)."""
    if args.task == "flow":
        experiment = configs.flow(args.size, args.model)
        model = _given(args, ("depth", "kernel_size", "downsample", "hidden"))
        evaluation = _given(args, ("eval_every", "samples"))
    else:
        experiment = configs.classifier(args.size, args.row - 1)
        model = _given(args, ("width", "padding", "activation", "downsample"))
        evaluation = _given(args, ("eval_every",))
    evaluation = {("every" if k == "eval_every" else k): v for k, v in evaluation.items()}
    data = _given(args, ("train_images", "holdout"))
    if args.data is not None:
        data["name"] = args.data
    if args.eval_size is not None:
        data["test_images"] = args.eval_size
    training = _given(args, ("batch_size", "lr", "warmup", "schedule", "checkpoint_every", "time_limit", "clock",
                             "optimizer", "momentum", "weight_decay", "augment", "spectral_weight",
                             "spectral_floor"))
    if args.clip is not None:
        training["clip"] = args.clip or None
    if args.steps is not None:
        training.update(steps=args.steps, epochs=None)
    elif args.epochs is not None:
        training.update(steps=None, epochs=args.epochs)
    changes = {"model": model, "data": data, "training": training, "evaluation": evaluation}
    if args.seed is not None:
        changes["seed"] = args.seed
    return experiment.replace(**changes)


def main(argv=None) -> int:
    """Entry point of ``python -m iconv.train``; see ``--help``."""
    p = parser()
    args = p.parse_args(argv)
    if (args.resume or args.resume_if_exists) and not args.checkpoint:
        p.error("--resume and --resume-if-exists need --checkpoint FILE")
    try:
        experiment = experiment_from_args(args)
    except ValueError as err:
        p.error(str(err))
    if args.threads:
        torch.set_num_threads(args.threads)
    resume = True if args.resume else "if-exists" if args.resume_if_exists else False
    try:
        result = run(experiment, checkpoint=args.checkpoint, out=args.out, resume=resume, overwrite=args.overwrite,
                     device=args.device, progress=not args.no_progress, data_root=args.data_root,
                     download=args.download, log_every=args.log_every)
    except (TrainingDiverged, ResumeError, CheckpointError, OutputLocationError, FileNotFoundError, ValueError) as err:
        if is_main_process():
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup()
    if is_main_process():
        print(json.dumps(result.metrics))
    return 0
