"""One trainer for every model in the book, and the command line ``python -m iconv.train``.

:func:`fit` runs mini-batch training on ``uint8`` images with Adam or SGD, a linear warm-up and a
cosine (or constant) learning-rate schedule, gradient-norm clipping, a tqdm progress bar,
periodic evaluation, atomic checkpoints that resume exactly, a divergence guard and, when started
by ``torchrun``, DistributedDataParallel over all processes. The model-specific part is one
function, ``loss_fn(model, images, labels) -> (loss, metrics)``.

Exact resume. The data order and the random numbers of every step are functions of
``(seed, step, rank)`` only (:class:`GlobalBatches`, :func:`step_seed`), and the checkpoint holds
the model, the optimiser and the scheduler, so continuing from a checkpoint replays exactly the
steps an uninterrupted run would have taken.

Command line::

    python -m iconv.train flow --data fashion-mnist --size ci --out runs/flow
    python -m iconv.train flow --model glow --steps 5000 --checkpoint runs/glow.pt --resume
    torchrun --nproc_per_node=2 -m iconv.train flow --size gpu ...
    python -m iconv.train classify --data cifar10 --size paper --downsample nn ...
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from . import distributed as ddp
from .distributed import cleanup as cleanup_distributed
from .distributed import is_main_process, rank, world_size
from .errors import NotInvertibleError

__all__ = [
    "CLASSIFY_PRESETS", "FLOW_PRESETS", "GlobalBatches", "History", "TrainConfig", "TrainingDiverged", "build_flow",
    "cleanup_distributed", "fit",
    "is_main_process", "load_checkpoint", "lr_factor", "main", "rank", "save_checkpoint",
    "seed_everything", "step_seed", "world_size",
]

CHECKPOINT_FORMAT = 1

#: Config fields that change the trajectory: a resumed run must agree on them.
TRAJECTORY_FIELDS = ("steps", "batch_size", "lr", "optimizer", "momentum", "weight_decay", "warmup",
                     "schedule", "clip", "seed")


class TrainingDiverged(RuntimeError):
    """Training stopped because the loss or the gradient went non-finite, or a layer turned singular.

    ``step`` is the step that failed (0-based), ``reason`` a short description, and
    ``checkpoint_path`` the last good checkpoint (untouched), or None.
    """

    def __init__(self, message: str, step: int, reason: str, checkpoint_path=None):
        super().__init__(message)
        self.step, self.reason, self.checkpoint_path = step, reason, checkpoint_path


@dataclass
class TrainConfig:
    """Everything that defines a training run (see ``/work/notes/TRAINER_API.md``).

    ``batch_size`` is the global batch: under DDP each of the ``W`` processes takes
    ``batch_size // W`` rows of it. Learning rate at step ``s`` (0-based) is
    ``lr * lr_factor(s)``: linear warm-up ``(s + 1) / warmup`` for ``s < warmup``, then cosine
    decay to 0 at ``steps`` (or constant). ``time_limit`` (seconds, counted over resumes) stops
    training early; ``clock="process"`` counts this process's CPU time instead of wall-clock time,
    a fairer budget when the machine is shared.
    """

    steps: int = 1000
    batch_size: int = 64
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"
    clip: float | None = None
    eval_every: int = 0
    checkpoint_every: int = 0
    log_every: int = 1
    seed: int = 0
    device: str = "auto"
    time_limit: float | None = None
    clock: str = "wall"

    def __post_init__(self):
        def positive_int(name, allow_zero=False):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < (0 if allow_zero else 1):
                kind = "non-negative" if allow_zero else "positive"
                raise ValueError(f"TrainConfig.{name} must be a {kind} int, got {v!r}")

        positive_int("steps")
        positive_int("batch_size")
        positive_int("log_every")
        for name in ("warmup", "eval_every", "checkpoint_every", "seed"):
            positive_int(name, allow_zero=True)
        if not (isinstance(self.lr, (int, float)) and self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"TrainConfig.lr must be a positive finite number, got {self.lr!r}")
        if self.optimizer not in ("adam", "sgd"):
            raise ValueError(f"TrainConfig.optimizer must be 'adam' or 'sgd', got {self.optimizer!r}")
        if self.schedule not in ("cosine", "constant"):
            raise ValueError(f"TrainConfig.schedule must be 'cosine' or 'constant', got {self.schedule!r}")
        if self.clip is not None and not self.clip > 0:
            raise ValueError(f"TrainConfig.clip must be positive or None, got {self.clip!r}")
        if self.weight_decay < 0 or not 0 <= self.momentum < 1:
            raise ValueError("TrainConfig.weight_decay must be >= 0 and momentum in [0, 1)")
        if self.clock not in ("wall", "process"):
            raise ValueError(f"TrainConfig.clock must be 'wall' or 'process', got {self.clock!r}")
        if self.time_limit is not None and not self.time_limit > 0:
            raise ValueError(f"TrainConfig.time_limit must be positive or None, got {self.time_limit!r}")


def lr_factor(step: int, config: TrainConfig) -> float:
    """The learning-rate multiplier at (0-based) ``step``: linear warm-up, then cosine or constant."""
    if step < config.warmup:
        return (step + 1) / config.warmup
    if config.schedule == "constant":
        return 1.0
    span = max(config.steps - config.warmup, 1)
    progress = min((step - config.warmup) / span, 1.0)
    return 0.5 * (1.0 + math.cos(math.pi * progress))


@dataclass
class History:
    """What happened during training: one row per logged step and one per evaluation."""

    train: list = field(default_factory=list)
    eval: list = field(default_factory=list)
    config: dict = field(default_factory=dict)
    stopped: str = ""
    completed_steps: int = 0

    @property
    def last_eval(self) -> dict | None:
        return self.eval[-1] if self.eval else None

    @property
    def steps(self) -> int:
        """Optimiser steps taken (the last logged row may be older when ``log_every > 1``)."""
        return self.completed_steps

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "History":
        return cls(**{k: d[k] for k in ("train", "eval", "config", "stopped", "completed_steps") if k in d})

    def column(self, name: str, rows: str = "train") -> tuple[list, list]:
        """``(steps, values)`` of one metric, e.g. ``history.column("bits/dim")``."""
        table = getattr(self, rows)
        pairs = [(r["step"], r[name]) for r in table if name in r]
        return [p[0] for p in pairs], [p[1] for p in pairs]


def step_seed(seed: int, step: int, rank_: int = 0) -> int:
    """The global RNG seed used for ``step`` on ``rank_`` (dequantization noise, dropout, ...)."""
    return (seed * 1_000_003 + step * 7919 + rank_ * 104_729 + 12345) % (2**63 - 1)


def seed_everything(seed: int) -> None:
    """Seed torch's CPU and CUDA generators (and Python's and NumPy's, for completeness)."""
    import random

    import numpy as np

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class GlobalBatches:
    """The index of the global batch of every step, without state.

    Epoch ``e`` uses ``torch.randperm(N)`` drawn from a generator seeded with ``(seed, e)``; step
    ``s`` takes the ``s mod n``-th block of ``batch_size`` indices of epoch ``s // n`` (``n = N //
    batch_size``, a final short block is dropped). Knowing ``step`` is enough to resume the order.
    """

    def __init__(self, n_items: int, batch_size: int, seed: int):
        if n_items < batch_size:
            raise ValueError(f"the training set has {n_items} images, fewer than one batch ({batch_size})")
        self.n_items, self.batch_size, self.seed = n_items, batch_size, seed
        self.per_epoch = n_items // batch_size
        self._epoch, self._perm = -1, None

    def __call__(self, step: int) -> torch.Tensor:
        epoch, k = divmod(step, self.per_epoch)
        if epoch != self._epoch:
            gen = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            self._epoch, self._perm = epoch, torch.randperm(self.n_items, generator=gen)
        return self._perm[k * self.batch_size:(k + 1) * self.batch_size]


class _LossModule(nn.Module):
    """``forward(images, labels) = loss_fn(model, images, labels)``: what DDP wraps, so that the
    gradient all-reduce is armed whatever method of the model ``loss_fn`` calls."""

    def __init__(self, model: nn.Module, loss_fn: Callable):
        super().__init__()
        self.model, self.loss_fn = model, loss_fn

    def forward(self, images, labels):
        return self.loss_fn(self.model, images, labels)


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(path: str | os.PathLike, state: dict) -> None:
    """``torch.save(state)`` to ``path`` atomically: a temp file in the same folder, then ``os.replace``.

    A crash while writing leaves the previous checkpoint intact.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp's 0600 would otherwise survive the rename
        with os.fdopen(fd, "wb") as f:
            torch.save(state, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def load_checkpoint(path: str | os.PathLike, model: nn.Module | None = None, map_location="cpu") -> dict:
    """Read a checkpoint written by :func:`fit`; load its weights into ``model`` if given."""
    state = torch.load(path, map_location=map_location, weights_only=False)
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not an iconv.train checkpoint (format {CHECKPOINT_FORMAT})")
    if model is not None:
        model.load_state_dict(state["model"])
    return state


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


def _check_resumable(saved: dict, config: TrainConfig, path) -> None:
    now = dataclasses.asdict(config)
    diff = {k: (saved.get(k), now[k]) for k in TRAJECTORY_FIELDS if saved.get(k) != now[k]}
    if diff:
        lines = ", ".join(f"{k}: checkpoint {a!r} vs now {b!r}" for k, (a, b) in diff.items())
        raise ValueError(f"cannot resume from {path}: the configuration differs ({lines}); "
                         "resume with the same settings or start a new run")


# ----------------------------------------------------------------------------- the loop


def _as_float(v) -> float:
    return float(v.detach()) if isinstance(v, torch.Tensor) else float(v)


def _on_main(fn: Callable, distributed: bool):
    """Run ``fn()`` on rank 0 and give every rank its result, or re-raise its NotInvertibleError."""
    result, error = None, None
    if is_main_process():
        try:
            result = fn()
        except NotInvertibleError as err:
            error = str(err)
    if distributed:
        box = [(result, error)]
        dist.broadcast_object_list(box, src=0)
        result, error = box[0]
    if error is not None:
        raise NotInvertibleError(error)
    return result


def _make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if config.optimizer == "adam":
        return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)


def _check_data(images, labels) -> None:
    if not isinstance(images, torch.Tensor) or images.dtype != torch.uint8:
        got = images.dtype if isinstance(images, torch.Tensor) else type(images).__name__
        raise TypeError(f"train_images must be a uint8 tensor (N, C, H, W) of 0..255 values, got {got}")
    if images.dim() != 4:
        raise ValueError(f"train_images must have shape (N, C, H, W), got {tuple(images.shape)}")
    if labels is not None:
        if not isinstance(labels, torch.Tensor) or labels.dim() != 1 or len(labels) != len(images):
            raise ValueError(f"train_labels must be a 1-d tensor with one label per image ({len(images)}), "
                             f"got {getattr(labels, 'shape', type(labels).__name__)}")


def fit(model: nn.Module, loss_fn: Callable, train_images: torch.Tensor, train_labels: torch.Tensor | None = None,
        *, config: TrainConfig, evaluate: Callable | None = None, checkpoint_path=None, resume: bool = False,
        progress: bool = True) -> History:
    """Train ``model`` in place by minimising ``loss_fn`` over mini-batches of ``train_images``.

    ``loss_fn(model, images_uint8, labels) -> (loss, {name: value})`` gets this process's share
    of the global batch on the training device; ``evaluate(model) -> {name: value}`` runs on rank
    0 in eval mode without gradients. Returns the :class:`History` (also kept in the checkpoint).
    Raises :class:`TrainingDiverged` (keeping the last good checkpoint) on a non-finite loss or
    gradient, or when a layer is found singular. See ``TRAINER_API.md`` for the full contract.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_data(train_images, train_labels)
    device = ddp.resolve_device(config.device)
    distributed = ddp.setup(device)
    world, me = world_size(), rank()
    if config.batch_size % world:
        raise ValueError(f"batch_size {config.batch_size} is not divisible by the {world} processes")
    local = config.batch_size // world

    model.to(device)
    optimizer = _make_optimizer(model, config)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, config))
    history = History(config=dataclasses.asdict(config))
    start, elapsed, elapsed_cpu = 0, 0.0, 0.0
    if checkpoint_path is not None and resume and os.path.exists(checkpoint_path):
        state = load_checkpoint(checkpoint_path, map_location=device)
        _check_resumable(state["config"], config, checkpoint_path)
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        history = History.from_dict(state["history"])
        history.config = dataclasses.asdict(config)
        start, elapsed = state["step"], state.get("elapsed", 0.0)
        elapsed_cpu = state.get("elapsed_process", 0.0)
        _set_rng_state(state["rng"])
    last_good = checkpoint_path if checkpoint_path is not None and os.path.exists(checkpoint_path) and resume else None

    wrapped = _LossModule(model, loss_fn)
    if distributed:
        wrapped = nn.parallel.DistributedDataParallel(
            wrapped, device_ids=[device.index] if device.type == "cuda" else None)
    params = [p for p in model.parameters() if p.requires_grad]
    order = GlobalBatches(len(train_images), config.batch_size, config.seed)
    bar = None
    if progress and is_main_process():
        from tqdm.auto import tqdm

        bar = tqdm(total=config.steps, initial=start, desc="train", dynamic_ncols=True)

    def diverged(step, reason):
        where = f"the last good checkpoint is {last_good}" if last_good else "no checkpoint was written yet"
        return TrainingDiverged(f"training diverged at step {step}: {reason}; stopped without writing a "
                                f"checkpoint ({where})", step, reason, last_good)

    def checkpoint(step):
        nonlocal last_good
        if checkpoint_path is None:
            return
        if is_main_process():
            save_checkpoint(checkpoint_path, {
                "format": CHECKPOINT_FORMAT, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                "scheduler": scheduler.state_dict(), "step": step, "elapsed": elapsed + time.time() - t0,
                "elapsed_process": elapsed_cpu + time.process_time() - c0,
                "history": history.to_dict(), "config": dataclasses.asdict(config), "rng": _rng_state(),
                "world_size": world,
            })
        if distributed:
            dist.barrier()
        last_good = checkpoint_path

    def guard_invertible(step):
        check = getattr(model, "check_invertible", None)
        if callable(check):
            try:
                _on_main(check, distributed)
            except NotInvertibleError as err:
                raise diverged(step, f"a layer is numerically singular ({err})") from err

    def run_eval(step):
        if evaluate is None:
            return

        def once():
            model.eval()
            try:
                with torch.no_grad():
                    return {k: _as_float(v) for k, v in evaluate(model).items()}
            finally:
                model.train()

        try:
            metrics = _on_main(once, distributed)
        except NotInvertibleError as err:
            raise diverged(step, f"evaluation found a singular layer ({err})") from err
        row = {"step": step, "seconds": elapsed + time.time() - t0,
               "process_seconds": elapsed_cpu + time.process_time() - c0, **metrics}
        history.eval.append(row)
        if bar is not None:
            bar.write("eval @ step {}: {}".format(step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())))

    t0, c0 = time.time(), time.process_time()
    model.train()
    history.stopped = ""
    step = start
    try:
        while step < config.steps:
            torch.manual_seed(step_seed(config.seed, step, me))
            rows = order(step)[me * local:(me + 1) * local]
            images = train_images[rows].to(device, non_blocking=True)
            labels = None if train_labels is None else train_labels[rows].to(device, non_blocking=True)
            optimizer.zero_grad(set_to_none=True)
            failure = None
            try:
                loss, metrics = wrapped(images, labels)
            except NotInvertibleError as err:
                failure, loss, metrics = f"a layer is numerically singular ({err})", None, {}
            # one small all-reduce: [failed?, loss, stop?] so that every rank takes the same decision
            if config.clock == "process":
                used = elapsed_cpu + time.process_time() - c0
            else:
                used = elapsed + time.time() - t0
            over_time = config.time_limit is not None and used > config.time_limit
            flags = torch.tensor([float(failure is not None), 0.0 if loss is None else _as_float(loss),
                                  float(over_time and is_main_process())], dtype=torch.float64, device=device)
            if distributed:
                dist.all_reduce(flags)
                flags[1] /= world
            if flags[0] > 0:
                raise diverged(step, failure or "another process found a singular layer")
            mean_loss = float(flags[1])
            if not math.isfinite(mean_loss):
                raise diverged(step, f"the loss is {mean_loss}")
            if flags[2] > 0:
                history.stopped = "time_limit"
                break
            loss.backward()
            grad_norm = float(torch.nn.utils.clip_grad_norm_(params, config.clip if config.clip else math.inf))
            if not math.isfinite(grad_norm):
                raise diverged(step, f"the gradient norm is {grad_norm}")
            lr_now = optimizer.param_groups[0]["lr"]
            optimizer.step()
            scheduler.step()
            step += 1
            history.completed_steps = step

            if step % config.log_every == 0 or step == config.steps:
                values = {k: _as_float(v) for k, v in metrics.items()}
                if distributed and values:
                    t = torch.tensor(list(values.values()), dtype=torch.float64, device=device)
                    dist.all_reduce(t)
                    values = dict(zip(values, (t / world).tolist()))
                row = {"step": step, "loss": mean_loss, "lr": lr_now, "grad_norm": grad_norm,
                       "seconds": elapsed + time.time() - t0,
                       "process_seconds": elapsed_cpu + time.process_time() - c0, **values}
                history.train.append(row)
                if bar is not None:
                    bar.set_postfix({"loss": f"{mean_loss:.4g}", **{k: f"{v:.4g}" for k, v in values.items()}},
                                    refresh=False)
            if bar is not None:
                bar.update(1)
            due_eval = config.eval_every and step % config.eval_every == 0 and step < config.steps
            due_ckpt = config.checkpoint_every and step % config.checkpoint_every == 0 and step < config.steps
            if due_eval or due_ckpt:
                guard_invertible(step)
            if due_eval:
                run_eval(step)
            if due_ckpt:
                checkpoint(step)
        history.stopped = history.stopped or "completed"
        if history.eval and history.eval[-1]["step"] == step:
            pass  # already evaluated at this step (e.g. resumed from a finished run)
        else:
            guard_invertible(step)
            run_eval(step)
        checkpoint(step)
    finally:
        if bar is not None:
            bar.close()
    return history


# ----------------------------------------------------------------------------- command line

#: Size presets of ``python -m iconv.train flow`` (``--size``); explicit flags override them.
FLOW_PRESETS = {
    # seconds on a laptop CPU: a small flow, a few hundred steps
    "ci": dict(data="fashion-mnist", model="convflow", depth=4, kernel_size=3, hidden=None, steps=300, epochs=None,
               batch_size=64, lr=1e-3, warmup=50, clip=50.0, eval_size=1000, holdout=0),
    # minutes on one GPU: chapter 7's Fashion-MNIST flow, 10 epochs
    "gpu": dict(data="fashion-mnist", model="convflow", depth=8, kernel_size=3, hidden=None, steps=None, epochs=10,
                batch_size=64, lr=1e-3, warmup=500, clip=50.0, eval_size=None, holdout=0),
    # the paper's training recipe on CIFAR-10: Adam 3e-4, batch 32, 50 epochs, cosine, 5k held out
    "paper": dict(data="cifar10", model="convflow", depth=8, kernel_size=3, hidden=None, steps=None, epochs=50,
                  batch_size=32, lr=3e-4, warmup=500, clip=50.0, eval_size=None, holdout=5000),
}

#: Size presets of ``python -m iconv.train classify``.
CLASSIFY_PRESETS = {
    "ci": dict(data="digits", width=16, steps=300, epochs=None, batch_size=50, lr=0.05, warmup=0, eval_size=None,
               optimizer="sgd", momentum=0.9, weight_decay=5e-4, clip=None, holdout=0),
    "gpu": dict(data="cifar10", width=64, steps=None, epochs=15, batch_size=50, lr=0.1, warmup=200, eval_size=None,
                optimizer="sgd", momentum=0.9, weight_decay=5e-4, clip=None, holdout=0),
    # the paper's recipe (reproduction notes): SGD, lr 0.1, 100 epochs, batch 50, k = 64
    "paper": dict(data="cifar10", width=64, steps=None, epochs=100, batch_size=50, lr=0.1, warmup=0, eval_size=None,
                  optimizer="sgd", momentum=0.9, weight_decay=5e-4, clip=None, holdout=0),
}


def _common_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--size", choices=("ci", "gpu", "paper"), default="ci", help="preset (default: ci)")
    p.add_argument("--data", choices=("fashion-mnist", "digits", "cifar10"), help="data set (default: the preset's)")
    p.add_argument("--data-root", default=None, help="where the data files are (default: iconv.data's search path)")
    p.add_argument("--download", action="store_true", help="download the data set if it is missing")
    p.add_argument("--steps", type=int, help="optimiser steps (overrides --epochs)")
    p.add_argument("--epochs", type=float, help="epochs over the training split (converted to steps)")
    p.add_argument("--batch-size", type=int, help="global batch size")
    p.add_argument("--lr", type=float, help="peak learning rate")
    p.add_argument("--warmup", type=int, help="linear warm-up steps")
    p.add_argument("--schedule", choices=("cosine", "constant"), default="cosine")
    p.add_argument("--clip", type=float, help="max gradient norm (0: off)")
    p.add_argument("--eval-every", type=int, default=0, help="evaluate every N steps (default: at the end)")
    p.add_argument("--eval-size", type=int, help="evaluate on the first N test images (default: all)")
    p.add_argument("--holdout", type=int, help="drop the last N training images (held out, as the paper did)")
    p.add_argument("--checkpoint", default=None, help="checkpoint file, written atomically")
    p.add_argument("--checkpoint-every", type=int, default=0, help="checkpoint every N steps (default: at the end)")
    p.add_argument("--resume", action="store_true", help="continue exactly from --checkpoint if it exists")
    p.add_argument("--out", default=None, help="folder for history.json, metrics.json (and samples.png)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--time-limit", type=float, default=None, help="stop after this many seconds (checkpointed)")
    p.add_argument("--clock", choices=("wall", "process"), default="wall",
                   help="what --time-limit counts: wall-clock or this process's CPU seconds")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m iconv.train",
                                     description="Train the book's models with iconv.train.fit.")
    sub = parser.add_subparsers(dest="task", required=True)
    flow = sub.add_parser("flow", help="train a normalizing flow (ConvFlow or the Glow baseline)")
    _common_arguments(flow)
    flow.add_argument("--model", choices=("convflow", "glow"), help="ConvFlow or the Glow-style baseline")
    flow.add_argument("--depth", type=int, help="steps per scale")
    flow.add_argument("--kernel-size", type=int, help="ConvFlow's conv kernel size")
    flow.add_argument("--downsample", choices=("squeeze", "nn", "avg"), default="squeeze",
                      help="ConvFlow's downsampling")
    flow.add_argument("--hidden", type=int, help="Glow coupling width (default: match ConvFlow's parameter count)")
    flow.add_argument("--samples", type=int, default=64, help="samples drawn into samples.png at the end")
    cls = sub.add_parser("classify", help="train the (invertible) CNN classifier of iconv.classifier")
    _common_arguments(cls)
    cls.add_argument("--width", type=int)
    cls.add_argument("--padding", choices=("zeros", "circular"), default="zeros")
    cls.add_argument("--activation", choices=("relu", "sneaky"), default="relu")
    cls.add_argument("--downsample", dest="cls_downsample", choices=("maxpool", "squeeze", "nn", "avg"),
                     default="maxpool")
    cls.add_argument("--optimizer", choices=("adam", "sgd"))
    cls.add_argument("--momentum", type=float)
    cls.add_argument("--weight-decay", type=float)
    return parser


def _settings(args, presets) -> dict:
    s = dict(presets[args.size])
    for key in list(s) + ["data"]:
        value = getattr(args, key, None)
        if value is not None:
            s[key] = value
    if args.steps is not None:
        s["steps"], s["epochs"] = args.steps, None
    elif args.epochs is not None:
        s["steps"], s["epochs"] = None, args.epochs
    return s


def _load(settings: dict, args):
    from . import data

    kwargs = {}
    if args.data_root is not None:
        kwargs["root"] = args.data_root
    if args.download and settings["data"] != "digits":
        kwargs["download"] = True
    train_x, train_y = data.load(settings["data"], "train", **kwargs)
    test_x, test_y = data.load(settings["data"], "test", **kwargs)
    if settings.get("holdout"):
        train_x, train_y = train_x[:-settings["holdout"]], train_y[:-settings["holdout"]]
    if settings.get("eval_size"):
        test_x, test_y = test_x[:settings["eval_size"]], test_y[:settings["eval_size"]]
    return train_x, train_y, test_x, test_y


def _steps(settings: dict, n_train: int) -> int:
    if settings.get("steps"):
        return int(settings["steps"])
    return max(1, int(round(settings["epochs"] * (n_train // settings["batch_size"]))))


def build_flow(shape, model: str = "convflow", depth: int = 4, kernel_size: int = 3, downsample: str = "squeeze",
               hidden: int | None = None):
    """The CLI's flow: a :class:`~iconv.ConvFlow`, or a :class:`~iconv.baseline.GlowBaseline` whose
    coupling width (unless given) matches that ConvFlow's parameter count."""
    from .models.flow import ConvFlow
    from .models.glow import GlowBaseline, matching_hidden_width

    reference = ConvFlow(shape, depth=depth, kernel_size=kernel_size, downsample=downsample)
    if model == "convflow":
        return reference
    glow_depth = max(1, depth // 2)
    if hidden is None:
        hidden = matching_hidden_width(shape, reference.num_parameters(), glow_depth)
    return GlowBaseline(shape, depth=glow_depth, hidden=hidden)


def _write_outputs(out, history: History, metrics: dict, samples=None) -> None:
    if out is None or not is_main_process():
        return
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "history.json").write_text(json.dumps(history.to_dict(), indent=1))
    (out / "metrics.json").write_text(json.dumps(metrics, indent=1))
    if samples is not None:
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return
        n = samples.shape[0]
        cols = int(math.ceil(math.sqrt(n)))
        rows = int(math.ceil(n / cols))
        fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
        for ax in axes.flat:
            ax.axis("off")
        for ax, img in zip(axes.flat, samples.clamp(0, 1).cpu()):
            ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
        fig.savefig(out / "samples.png", dpi=80, bbox_inches="tight")
        plt.close(fig)


def _run_flow(args) -> dict:
    from .data import dequantize
    from .evaluation import evaluate_bits_per_dim
    from .losses import flow_loss

    s = _settings(args, FLOW_PRESETS)
    train_x, _, test_x, _ = _load(s, args)
    shape = tuple(train_x.shape[1:])
    torch.manual_seed(args.seed)
    model = build_flow(shape, s["model"], s["depth"], s["kernel_size"], args.downsample, s["hidden"])
    init_batch = dequantize(train_x[:512], generator=torch.Generator().manual_seed(args.seed))
    model.initialize(init_batch)  # same batch on every rank: DDP-safe
    config = TrainConfig(steps=_steps(s, len(train_x)), batch_size=s["batch_size"], lr=s["lr"], warmup=s["warmup"],
                         schedule=args.schedule, clip=s["clip"] or None, eval_every=args.eval_every,
                         checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device,
                         time_limit=args.time_limit, clock=args.clock, log_every=10)
    if is_main_process():
        print(f"flow: {type(model).__name__} {model.num_parameters()} parameters, {s['data']} {shape}, "
              f"{config.steps} steps of {config.batch_size}, size {args.size}, {world_size()} process(es)")
    history = fit(model, flow_loss, train_x, config=config, checkpoint_path=args.checkpoint, resume=args.resume,
                  evaluate=lambda m: {"test_bits/dim": evaluate_bits_per_dim(m, test_x, seed=args.seed)},
                  progress=not args.no_progress)
    metrics = {"model": type(model).__name__, "parameters": model.num_parameters(), "data": s["data"],
               "size": args.size, "steps": history.steps, "stopped": history.stopped, **(history.last_eval or {})}
    samples = None
    if is_main_process() and args.samples:
        model.eval()
        samples = model.sample(args.samples, temperature=0.7, generator=torch.Generator(
            device=next(model.parameters()).device).manual_seed(args.seed))
    _write_outputs(args.out, history, metrics, samples)
    return metrics


def _run_classify(args) -> dict:
    from .evaluation import evaluate_accuracy
    from .losses import classification_loss
    from .models.classifier import ConvNet

    s = _settings(args, CLASSIFY_PRESETS)
    train_x, train_y, test_x, test_y = _load(s, args)
    torch.manual_seed(args.seed)
    model = ConvNet(in_channels=train_x.shape[1], num_classes=10, width=s["width"], padding=args.padding,
                               activation=args.activation, downsample=args.cls_downsample)
    config = TrainConfig(steps=_steps(s, len(train_x)), batch_size=s["batch_size"], lr=s["lr"], warmup=s["warmup"],
                         optimizer=s["optimizer"], momentum=s["momentum"], weight_decay=s["weight_decay"],
                         schedule=args.schedule, clip=s["clip"] or None, eval_every=args.eval_every,
                         checkpoint_every=args.checkpoint_every, seed=args.seed, device=args.device,
                         time_limit=args.time_limit, clock=args.clock, log_every=10)
    history = fit(model, classification_loss, train_x, train_y, config=config,
                  checkpoint_path=args.checkpoint, resume=args.resume, progress=not args.no_progress,
                  evaluate=lambda m: {"test_accuracy": evaluate_accuracy(m, test_x, test_y, 500)})
    metrics = {"model": "ConvNet", "parameters": sum(p.numel() for p in model.parameters()), "data": s["data"],
               "size": args.size, "steps": history.steps, "stopped": history.stopped, **(history.last_eval or {})}
    _write_outputs(args.out, history, metrics)
    return metrics


def main(argv=None) -> int:
    """Entry point of ``python -m iconv.train``; see ``--help``."""
    args = _parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        metrics = _run_flow(args) if args.task == "flow" else _run_classify(args)
    except TrainingDiverged as err:
        if is_main_process():
            print(f"error: {err}", file=sys.stderr)
        return 2
    finally:
        cleanup_distributed()
    if is_main_process():
        print(json.dumps(metrics))
    return 0


if __name__ == "__main__":
    sys.exit(main())
