"""The training loop :func:`fit`: one trainer for every model in the book.

:func:`fit` runs mini-batch training on ``uint8`` images with Adam or SGD, a linear warm-up and a
cosine (or constant) learning-rate schedule, gradient-norm clipping, a tqdm progress bar,
periodic evaluation, atomic self-describing checkpoints (:mod:`iconv.train.checkpoint`) that
resume exactly, a divergence guard and, when started by ``torchrun``, DistributedDataParallel over
all processes. The model-specific part is one function, ``loss_fn(model, images, labels) -> (loss,
metrics)``.

Exact resume. The data order and the random numbers of every step are functions of
``(seed, step, rank)`` only (:class:`GlobalBatches`, :func:`step_seed`), and the checkpoint holds
the model, the optimiser, the scheduler and the RNG state, so continuing from a checkpoint
replays exactly the steps an uninterrupted run would have taken.

A resume accepts only its own checkpoint. The checkpoint records the run's *definition*: the
model's class and constructor arguments, a sha256 digest of the training images (and labels),
the seed, the training settings of :data:`DEFINING_FIELDS` and whatever the caller adds
(``run=``: the data set and split, the loss settings...). A resume whose definition differs is
refused with the differing keys listed. What may change on resume (:data:`RESUMABLE_CHANGES`):
``steps`` (continue a finished run for longer, or stop earlier; with the cosine schedule the
remaining decay follows the new length), ``time_limit`` and ``clock``, ``eval_every``,
``checkpoint_every``, ``log_every``, ``device``, the evaluation (what ``evaluate`` measures), the
number of processes (the run then draws other dequantization noise than an uninterrupted one),
and everything outside the run: the output folder, the progress bar, the thread count.
"""
from __future__ import annotations

import dataclasses
import hashlib
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from .. import distributed as ddp
from ..distributed import is_main_process, rank, world_size
from ..errors import NotInvertibleError
from .checkpoint import CheckpointError, model_record, read_checkpoint, write_checkpoint
from .files import check_output_file, remove_stale_temporaries

__all__ = ["DEFINING_FIELDS", "RESUMABLE_CHANGES", "GlobalBatches", "History", "ResumeError", "TrainConfig",
           "TrainingDiverged", "fit", "load_checkpoint", "lr_factor", "run_definition", "seed_everything",
           "step_seed"]

#: TrainConfig fields that define the trajectory: a resumed run must agree on them.
DEFINING_FIELDS = ("batch_size", "lr", "optimizer", "momentum", "weight_decay", "warmup", "schedule", "clip", "seed")
#: TrainConfig fields a resume may change (see the module docstring).
RESUMABLE_CHANGES = ("steps", "time_limit", "clock", "eval_every", "checkpoint_every", "log_every", "device")
#: Values of ``fit(resume=...)``.
RESUME_MODES = (False, True, "if-exists")


class ResumeError(ValueError):
    """A checkpoint cannot be used as asked: missing on resume, present without resume or overwrite,
    or written by a run with another definition (the differing keys are listed)."""


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
    """The settings of one call of :func:`fit` (resolved: a number of steps, not epochs).

    ``batch_size`` is the global batch: under DDP each of the ``W`` processes takes
    ``batch_size // W`` rows of it. Learning rate at step ``s`` (0-based) is
    ``lr * lr_factor(s)``: linear warm-up ``(s + 1) / warmup`` for ``s < warmup``, then cosine
    decay to 0 at ``steps`` (or constant). ``eval_every`` and ``checkpoint_every`` (0: only at
    the end) count steps. ``time_limit`` (seconds, counted over resumes) stops
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


def _rng_state() -> dict:
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available() and len(state["cuda"]) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------- helpers


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




# ----------------------------------------------------------------------------- the run's definition


def _data_digest(images: torch.Tensor, labels: torch.Tensor | None) -> str:
    """sha256 of the training images (and labels): which data set and split a run trains on."""
    h = hashlib.sha256()
    for t in (images, labels):
        if t is None:
            continue
        t = t.detach().cpu().contiguous()
        h.update(f"{tuple(t.shape)}|{t.dtype}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    return "sha256:" + h.hexdigest()


def run_definition(model: nn.Module, config: TrainConfig, train_images: torch.Tensor,
                   train_labels: torch.Tensor | None = None, run: dict | None = None) -> dict:
    """What a resume must match: model class and arguments, the training data's digest, the
    :data:`DEFINING_FIELDS` of ``config`` and the caller's ``run`` dict (data set, split, loss...)."""
    return {
        "model": model_record(model),
        "train_data": {"digest": _data_digest(train_images, train_labels), "shape": list(train_images.shape)},
        "training": {name: getattr(config, name) for name in DEFINING_FIELDS},
        "run": dict(run or {}),
    }


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))  # an empty dict adds no key
        else:
            out[f"{prefix}{key}"] = value
    return out


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


class _Missing:
    def __repr__(self):
        return "<missing>"


_MISSING = _Missing()


def check_same_run(saved: dict, now: dict, path) -> None:
    """Raise :class:`ResumeError` listing every key where two run definitions differ."""
    a, b = _flatten(saved or {}), _flatten(now)
    differ = [k for k in sorted(set(a) | set(b)) if a.get(k, _MISSING) != b.get(k, _MISSING)]
    if differ:
        lines = "; ".join(f"{k}: checkpoint {_short(a.get(k, _MISSING))}, now {_short(b.get(k, _MISSING))}"
                          for k in differ)
        raise ResumeError(f"cannot resume from {path}: it was written by a different run ({len(differ)} differing "
                          f"key(s): {lines}). A resume may change only {', '.join(RESUMABLE_CHANGES)} and the "
                          "outputs; start a new run with another checkpoint path, or overwrite this one")


def _open_checkpoint(path, resume, overwrite: bool):
    """Preflight of the checkpoint location; returns the checkpoint to resume from, or None."""
    if resume not in RESUME_MODES:
        raise ValueError(f"resume must be False, True or 'if-exists', got {resume!r}")
    if path is None:
        if resume is True:
            raise ResumeError("resume=True needs a checkpoint path to resume from (checkpoint_path / --checkpoint)")
        return None
    path = check_output_file(path, "checkpoint")
    if is_main_process():
        remove_stale_temporaries(path)  # left by a killed write
    exists = path.exists()
    if resume is True and not exists:
        raise ResumeError(f"cannot resume: checkpoint {path} does not exist (use resume='if-exists' / "
                          "--resume-if-exists to start a new run when it is missing)")
    if exists and resume:
        state = read_checkpoint(path)
        if not isinstance(state.get("training"), dict):
            raise ResumeError(f"cannot resume from {path}: it holds a trained model only, no training state")
        return state
    if exists and not overwrite:
        raise ResumeError(f"checkpoint {path} already exists: resume it (resume=True / --resume), replace it "
                          "(overwrite=True / --overwrite) or choose another path")
    return None


def _parameters_finite(params) -> bool:
    return all(bool(torch.isfinite(p).all()) for p in params)


def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return lines[0] if lines else type(err).__name__


# ----------------------------------------------------------------------------- the loop


def fit(model: nn.Module, loss_fn: Callable, train_images: torch.Tensor, train_labels: torch.Tensor | None = None,
        *, config: TrainConfig, evaluate: Callable | None = None, checkpoint_path=None, resume=False,
        overwrite: bool = False, run: dict | None = None, experiment: dict | None = None,
        progress: bool = True) -> History:
    """Train ``model`` in place by minimising ``loss_fn`` over mini-batches of ``train_images``.

    ``loss_fn(model, images_uint8, labels) -> (loss, {name: value})`` gets this process's share
    of the global batch on the training device; ``evaluate(model) -> {name: value}`` runs on rank
    0 in eval mode without gradients, every ``config.eval_every`` steps and at the end. Returns the
    :class:`History` (also kept in the checkpoint).

    Checkpoints (``checkpoint_path``, every ``config.checkpoint_every`` steps and at the end) are
    written atomically in the format of :mod:`iconv.train.checkpoint`. ``resume``: ``False`` starts
    a new run and refuses an existing checkpoint unless ``overwrite=True``; ``True`` continues from
    the checkpoint, which must exist; ``"if-exists"`` continues when it exists and starts otherwise
    (for job schedulers that restart the same command). A resume checks that the checkpoint was
    written by the same run (see the module docstring; ``run`` adds the caller's keys, e.g. the
    data set and split). ``experiment`` (a dict, e.g. :meth:`iconv.configs.Experiment.to_dict`) is
    stored in the checkpoint as a description. The checkpoint location is checked before step 1.

    Raises :class:`TrainingDiverged` (keeping the last good checkpoint) on a non-finite loss,
    gradient or parameter, or when a layer is found singular; :class:`ResumeError` or
    :class:`iconv.train.CheckpointError` before training for a checkpoint it must not use.
    """
    if not isinstance(config, TrainConfig):
        raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
    _check_data(train_images, train_labels)
    state = _open_checkpoint(checkpoint_path, resume, overwrite)
    definition = run_definition(model, config, train_images, train_labels, run)
    if state is not None:
        check_same_run(state.get("run"), definition, checkpoint_path)
    trainer = _Trainer(model, loss_fn, config, evaluate, checkpoint_path, definition, run, experiment)
    if state is not None:
        trainer.restore(state)
    return trainer.train(train_images, train_labels, progress)


class _Trainer:
    """The state of one :func:`fit` call and its steps (one small method per job)."""

    def __init__(self, model, loss_fn, config, evaluate, checkpoint_path, definition, run, experiment):
        self.model, self.config, self.evaluate = model, config, evaluate
        self.checkpoint_path = None if checkpoint_path is None else Path(checkpoint_path)
        self.definition, self.data, self.experiment = definition, (run or {}).get("data"), experiment
        self.device = ddp.resolve_device(config.device)
        self.distributed = ddp.setup(self.device)
        self.world, self.rank = world_size(), rank()
        if config.batch_size % self.world:
            raise ValueError(f"batch_size {config.batch_size} is not divisible by the {self.world} processes")
        model.to(self.device)
        self.optimizer = _make_optimizer(model, config)
        self.scheduler = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, config))
        self.history = History(config=dataclasses.asdict(config))
        self.start, self.elapsed, self.elapsed_cpu = 0, 0.0, 0.0
        self.last_good = None
        self.params = [p for p in model.parameters() if p.requires_grad]
        self.wrapped = _LossModule(model, loss_fn)
        if self.distributed:
            self.wrapped = nn.parallel.DistributedDataParallel(
                self.wrapped, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        self.bar = None

    def restore(self, state: dict) -> None:
        """Continue from a checkpoint of the same run: weights, optimiser, scheduler, history, RNG."""
        training = state["training"]
        try:
            self.model.load_state_dict(state["state_dict"])
            self.optimizer.load_state_dict(training["optimizer"])
            self.scheduler.load_state_dict(training["scheduler"])
        except (RuntimeError, ValueError, KeyError) as err:
            raise CheckpointError(f"{self.checkpoint_path}: its state does not fit this model "
                                  f"({_first_line(err)})") from None
        self.history = History.from_dict(training["history"])
        self.history.config = dataclasses.asdict(self.config)
        self.start, self.elapsed = state["step"], training.get("elapsed", 0.0)
        # the saved learning rate was set by the saved run's schedule: follow this run's (``steps`` may differ)
        for group, base_lr in zip(self.optimizer.param_groups, self.scheduler.base_lrs):
            group["lr"] = base_lr * lr_factor(self.start, self.config)
        self.elapsed_cpu = training.get("elapsed_process", 0.0)
        _set_rng_state(training["rng"])
        self.last_good = self.checkpoint_path

    # ------------------------------------------------------------------ clocks and failures

    def seconds(self) -> float:
        return self.elapsed + time.time() - self.t0

    def process_seconds(self) -> float:
        return self.elapsed_cpu + time.process_time() - self.c0

    def diverged(self, step: int, reason: str) -> TrainingDiverged:
        where = f"the last good checkpoint is {self.last_good}" if self.last_good else "no checkpoint was written yet"
        return TrainingDiverged(f"training diverged at step {step}: {reason}; stopped without writing a "
                                f"checkpoint ({where})", step, reason, self.last_good)

    def as_divergence(self, step: int, err: BaseException, what: str) -> TrainingDiverged | None:
        """Divergence, or None (the error propagates): a singular layer; non-finite parameters; or a
        value error (e.g. an overflow to inf inside the model) from a loss that worked at an earlier
        step of this call, after the parameters moved."""
        if isinstance(err, NotInvertibleError):
            return self.diverged(step, f"{what} found a numerically singular layer ({_first_line(err)})")
        if not _parameters_finite(self.params):
            return self.diverged(step, f"the parameters became non-finite ({what} failed: {_first_line(err)})")
        if isinstance(err, (ValueError, FloatingPointError)) and step > self.start:
            return self.diverged(step, f"{what} failed after the parameters moved ({type(err).__name__}: "
                                       f"{_first_line(err)}); the learning rate may be too large")
        return None

    # ------------------------------------------------------------------ checkpoints and evaluation

    def checkpoint(self, step: int) -> None:
        if self.checkpoint_path is None:
            return
        if not _parameters_finite(self.params):
            raise self.diverged(step, "the parameters became non-finite")
        if is_main_process():
            training = {"optimizer": self.optimizer.state_dict(), "scheduler": self.scheduler.state_dict(),
                        "elapsed": self.seconds(), "elapsed_process": self.process_seconds(),
                        "history": self.history.to_dict(), "config": dataclasses.asdict(self.config),
                        "rng": _rng_state(), "world_size": self.world}
            write_checkpoint(self.checkpoint_path, self.model, step=step, run=self.definition,
                             experiment=self.experiment, data=self.data, seed=self.config.seed, training=training)
        if self.distributed:
            dist.barrier()
        self.last_good = self.checkpoint_path

    def guard_invertible(self, step: int) -> None:
        check = getattr(self.model, "check_invertible", None)
        if callable(check):
            try:
                _on_main(check, self.distributed)
            except NotInvertibleError as err:
                raise self.diverged(step, f"a layer is numerically singular ({err})") from err

    def _evaluate_once(self) -> dict:
        self.model.eval()
        try:
            with torch.no_grad():
                return {k: _as_float(v) for k, v in self.evaluate(self.model).items()}
        finally:
            self.model.train()

    def run_eval(self, step: int) -> None:
        if self.evaluate is None:
            return
        try:
            metrics = _on_main(self._evaluate_once, self.distributed)
        except (NotInvertibleError, ValueError, FloatingPointError, RuntimeError) as err:
            failure = self.as_divergence(step, err, "evaluation")
            if failure is None:
                raise
            raise failure from err
        row = {"step": step, "seconds": self.seconds(), "process_seconds": self.process_seconds(), **metrics}
        self.history.eval.append(row)
        if self.bar is not None:
            self.bar.write("eval @ step {}: {}".format(step, ", ".join(f"{k} {v:.4g}" for k, v in metrics.items())))

    # ------------------------------------------------------------------ one step

    def forward(self, step: int, images, labels):
        """The loss on this process's rows, and the all-reduced decision ``(failure, mean loss, stop)``."""
        failure, loss, metrics = None, None, {}
        try:
            loss, metrics = self.wrapped(images, labels)
        except (NotInvertibleError, ValueError, FloatingPointError, RuntimeError) as err:
            error = self.as_divergence(step, err, "the loss")
            if error is None:
                raise
            failure = error.reason
        used = self.process_seconds() if self.config.clock == "process" else self.seconds()
        over_time = self.config.time_limit is not None and used > self.config.time_limit
        # one small all-reduce: [failed?, loss, stop?] so that every rank takes the same decision
        flags = torch.tensor([float(failure is not None), 0.0 if loss is None else _as_float(loss),
                              float(over_time and is_main_process())], dtype=torch.float64, device=self.device)
        if self.distributed:
            dist.all_reduce(flags)
            flags[1] /= self.world
        if flags[0] > 0:
            raise self.diverged(step, failure or "another process found a singular layer")
        mean_loss = float(flags[1])
        if not math.isfinite(mean_loss):
            raise self.diverged(step, f"the loss is {mean_loss}")
        return loss, mean_loss, metrics, bool(flags[2] > 0)

    def update(self, step: int, loss) -> tuple[float, float]:
        """Backward, clip, optimiser and scheduler step; returns ``(grad_norm, lr used)``."""
        loss.backward()
        clip = self.config.clip if self.config.clip else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.params, clip))
        if not math.isfinite(grad_norm):
            raise self.diverged(step, f"the gradient norm is {grad_norm}")
        lr_now = self.optimizer.param_groups[0]["lr"]
        self.optimizer.step()
        self.scheduler.step()
        return grad_norm, lr_now

    def log(self, step: int, mean_loss: float, metrics: dict, grad_norm: float, lr_now: float) -> None:
        values = {k: _as_float(v) for k, v in metrics.items()}
        if self.distributed and values:
            t = torch.tensor(list(values.values()), dtype=torch.float64, device=self.device)
            dist.all_reduce(t)
            values = dict(zip(values, (t / self.world).tolist()))
        self.history.train.append({"step": step, "loss": mean_loss, "lr": lr_now, "grad_norm": grad_norm,
                                   "seconds": self.seconds(), "process_seconds": self.process_seconds(), **values})
        if self.bar is not None:
            self.bar.set_postfix({"loss": f"{mean_loss:.4g}", **{k: f"{v:.4g}" for k, v in values.items()}},
                                 refresh=False)

    def after_step(self, step: int) -> None:
        """Evaluation and checkpoint when due (the final ones come after the loop)."""
        c = self.config
        due_eval = c.eval_every and step % c.eval_every == 0 and step < c.steps
        due_ckpt = c.checkpoint_every and step % c.checkpoint_every == 0 and step < c.steps
        if due_eval or due_ckpt:
            self.guard_invertible(step)
        if due_eval:
            self.run_eval(step)
        if due_ckpt:
            self.checkpoint(step)

    # ------------------------------------------------------------------ the loop

    def train(self, train_images, train_labels, progress: bool) -> History:
        c, history = self.config, self.history
        local = c.batch_size // self.world
        order = GlobalBatches(len(train_images), c.batch_size, c.seed)
        if progress and is_main_process():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=c.steps, initial=min(self.start, c.steps), desc="train", dynamic_ncols=True)
        self.t0, self.c0 = time.time(), time.process_time()
        self.model.train()
        history.stopped = ""
        step = self.start
        try:
            while step < c.steps:
                torch.manual_seed(step_seed(c.seed, step, self.rank))
                rows = order(step)[self.rank * local:(self.rank + 1) * local]
                images = train_images[rows].to(self.device, non_blocking=True)
                labels = None if train_labels is None else train_labels[rows].to(self.device, non_blocking=True)
                self.optimizer.zero_grad(set_to_none=True)
                loss, mean_loss, metrics, out_of_time = self.forward(step, images, labels)
                if out_of_time:
                    history.stopped = "time_limit"
                    break
                grad_norm, lr_now = self.update(step, loss)
                step += 1
                history.completed_steps = step
                if step % c.log_every == 0 or step == c.steps:
                    self.log(step, mean_loss, metrics, grad_norm, lr_now)
                if self.bar is not None:
                    self.bar.update(1)
                self.after_step(step)
            history.stopped = history.stopped or "completed"
            if not (history.eval and history.eval[-1]["step"] == step):  # else: evaluated already (a finished run)
                self.guard_invertible(step)
                self.run_eval(step)
            self.checkpoint(step)
        finally:
            if self.bar is not None:
                self.bar.close()
        return history


def load_checkpoint(path, model: nn.Module | None = None, map_location="cpu") -> dict:
    """Read and check a checkpoint (:func:`iconv.train.checkpoint.read_checkpoint`); load its
    weights into ``model`` if given. Returns the checkpoint's dict (``state["step"]``, ...)."""
    state = read_checkpoint(path, map_location=map_location)
    if model is not None:
        try:
            model.load_state_dict(state["state_dict"])
        except RuntimeError as err:
            raise CheckpointError(f"{path}: its weights do not fit this {type(model).__name__} "
                                  f"({_first_line(err)})") from None
    return state
