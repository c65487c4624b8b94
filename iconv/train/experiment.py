"""Run a whole configured experiment: :func:`run` (data, model, loss, :func:`fit`, evaluation, outputs).

:func:`run` takes an :class:`iconv.configs.Experiment` and does what the command line and the
chapters need, in one place: load the data (:func:`load_data`), build and initialise the model
(:func:`build_model`), train it with :func:`iconv.train.fit` (checkpoints, resume, divergence
guard), evaluate it and, given ``out``, write ``history.json``, ``metrics.json`` (and a flow's
``samples.png``) atomically. Every output location is checked before step 1.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from .. import configs
from ..distributed import is_main_process, world_size
from .files import atomic_write, atomic_write_json, check_output_dir, check_output_file, remove_stale_temporaries
from .loop import History, TrainConfig, fit

__all__ = ["OUTPUT_FILES", "Result", "build_flow", "build_model", "load_data", "run", "write_outputs"]

#: The files :func:`run` writes in ``out``.
OUTPUT_FILES = ("history.json", "metrics.json", "samples.png")
#: Images of the training split that :meth:`iconv.models.FlowModel.initialize` sees.
INIT_IMAGES = 512


@dataclass
class Result:
    """What :func:`run` returns: the trained ``model`` (training mode), its :class:`History`, the
    ``metrics`` written to ``metrics.json``, the ``experiment`` and the test images it used."""

    model: nn.Module
    history: History
    metrics: dict
    experiment: configs.Experiment
    test_images: torch.Tensor
    test_labels: torch.Tensor


def load_data(data: configs.Data, root=None, download: bool = False):
    """``(train_x, train_y, test_x, test_y)`` for ``data``: the training split minus its last
    ``holdout`` images, then at most ``train_images`` of them; at most ``test_images`` test images."""
    from .. import data as datasets

    kwargs = {} if root is None else {"root": root}
    if download and data.name != "digits":
        kwargs["download"] = True
    train_x, train_y = datasets.load(data.name, "train", **kwargs)
    test_x, test_y = datasets.load(data.name, "test", **kwargs)
    if data.holdout:
        if data.holdout >= len(train_x):
            raise ValueError(f"holdout (--holdout) must be less than the {len(train_x)} training images of "
                             f"{data.name}, got {data.holdout}")
        train_x, train_y = train_x[:-data.holdout], train_y[:-data.holdout]
    if data.train_images:
        train_x, train_y = train_x[:data.train_images], train_y[:data.train_images]
    if data.test_images:
        test_x, test_y = test_x[:data.test_images], test_y[:data.test_images]
    return train_x, train_y, test_x, test_y


def build_flow(shape, model: str = "convflow", depth: int = 4, kernel_size: int = 3, downsample: str = "squeeze",
               hidden: int | None = None):
    """A :class:`~iconv.ConvFlow`, or a :class:`~iconv.GlowBaseline` of depth ``depth // 2`` whose
    coupling width (unless given) matches that ConvFlow's parameter count."""
    from ..models.flow import ConvFlow
    from ..models.glow import GlowBaseline, matching_hidden_width

    reference = ConvFlow(shape, depth=depth, kernel_size=kernel_size, downsample=downsample)
    if model == "convflow":
        return reference
    glow_depth = max(1, depth // 2)
    if hidden is None:
        hidden = matching_hidden_width(shape, reference.num_parameters(), glow_depth)
    return GlowBaseline(shape, depth=glow_depth, hidden=hidden)


def build_model(experiment: configs.Experiment, train_images: torch.Tensor) -> nn.Module:
    """The experiment's untrained model for images like ``train_images`` ``(N, C, H, W)``, seeded
    with ``experiment.seed``; a flow is initialised (:meth:`~iconv.models.FlowModel.initialize`)
    on the dequantized first :data:`INIT_IMAGES` training images (the same on every process)."""
    from ..data import dequantize
    from ..models.classifier import ConvNet

    m = experiment.model
    torch.manual_seed(experiment.seed)
    if experiment.task == "flow":
        model = build_flow(tuple(train_images.shape[1:]), m.kind, m.depth, m.kernel_size, m.downsample, m.hidden)
        generator = torch.Generator().manual_seed(experiment.seed)
        return model.initialize(dequantize(train_images[:INIT_IMAGES], generator=generator))
    return ConvNet(in_channels=train_images.shape[1], num_classes=10, width=m.width, **m.switches)


def _loss_and_evaluation(experiment: configs.Experiment, test_x, test_y):
    from .. import evaluation, losses

    if experiment.task == "flow":
        seed = experiment.seed
        return losses.flow_loss, lambda m: {"test_bits/dim": evaluation.evaluate_bits_per_dim(m, test_x, seed=seed)}
    t = experiment.training
    loss = losses.make_loss(augment=t.augment, spectral_weight=t.spectral_weight, spectral_floor=t.spectral_floor)
    return loss, lambda m: evaluation.evaluate_classifier(m, test_x, test_y, 500, reconstruct=64)


def train_config(experiment: configs.Experiment, n_train: int, device="auto", log_every: int | None = None):
    """The :class:`TrainConfig` of ``experiment`` for ``n_train`` training images."""
    t = experiment.training
    steps = t.total_steps(n_train)
    return TrainConfig(steps=steps, batch_size=t.batch_size, lr=t.lr, optimizer=t.optimizer, momentum=t.momentum,
                       weight_decay=t.weight_decay, warmup=t.warmup, schedule=t.schedule, clip=t.clip,
                       eval_every=experiment.evaluation.every, checkpoint_every=t.checkpoint_every,
                       log_every=log_every or max(1, steps // 1000), seed=experiment.seed, device=str(device),
                       time_limit=t.time_limit, clock=t.clock)


def _run_keys(experiment: configs.Experiment) -> dict:
    """The caller's part of the run definition (see :func:`iconv.train.fit`)."""
    d, t = experiment.data, experiment.training
    keys = {"task": experiment.task,
            "data": {"name": d.name, "split": "train", "holdout": d.holdout, "train_images": d.train_images}}
    if experiment.task == "classify":
        keys["loss"] = {"augment": t.augment, "spectral_weight": t.spectral_weight,
                        "spectral_floor": t.spectral_floor if t.spectral_weight else None}
    return keys


def check_outputs(out) -> Path | None:
    """Preflight of ``out``: a writable folder (created) whose output files can be replaced."""
    if out is None:
        return None
    out = check_output_dir(out, "--out")
    for name in OUTPUT_FILES:
        check_output_file(out / name, "--out")
        if is_main_process():
            remove_stale_temporaries(out / name)
    return out


def run(experiment: configs.Experiment, *, checkpoint=None, out=None, resume=False, overwrite: bool = False,
        device="auto", progress: bool = True, data=None, data_root=None, download: bool = False,
        log_every: int | None = None) -> Result:
    """Run ``experiment`` end to end and return a :class:`Result`.

    ``checkpoint``, ``resume`` (False, True, ``"if-exists"``) and ``overwrite`` as in
    :func:`iconv.train.fit`; ``out``: folder for ``history.json``, ``metrics.json`` and (flows,
    ``evaluation.samples > 0``) ``samples.png``; ``data``: ``(train_x, train_y, test_x, test_y)``
    already loaded with :func:`load_data` (else loaded from ``data_root``, downloading if asked);
    ``log_every``: training-history rows (default: about 1,000 per run).
    """
    if not isinstance(experiment, configs.Experiment):
        raise TypeError(f"experiment must be an iconv.configs.Experiment, got {type(experiment).__name__}")
    out = check_outputs(out)
    if checkpoint is not None:
        check_output_file(checkpoint, "checkpoint")
    train_x, train_y, test_x, test_y = data if data is not None else load_data(experiment.data, data_root, download)
    model = build_model(experiment, train_x)
    config = train_config(experiment, len(train_x), device, log_every)
    loss_fn, evaluate = _loss_and_evaluation(experiment, test_x, test_y)
    if is_main_process() and progress:
        print(f"{experiment.task} ({experiment.size}): {type(model).__name__}, "
              f"{sum(p.numel() for p in model.parameters()):,} parameters, {experiment.data.name} "
              f"{tuple(train_x.shape[1:])}, {config.steps:,} steps of {config.batch_size}, "
              f"{world_size()} process(es)")
    history = fit(model, loss_fn, train_x, train_y if experiment.task == "classify" else None, config=config,
                  evaluate=evaluate, checkpoint_path=checkpoint, resume=resume, overwrite=overwrite,
                  run=_run_keys(experiment), experiment=experiment.to_dict(), progress=progress)
    metrics = {"model": type(model).__name__, "parameters": sum(p.numel() for p in model.parameters()),
               "data": experiment.data.name, "size": experiment.size, "steps": history.steps,
               "stopped": history.stopped, **(history.last_eval or {})}
    samples = None
    if experiment.task == "flow" and experiment.evaluation.samples and out is not None and is_main_process():
        model.eval()
        generator = torch.Generator(device=next(model.parameters()).device).manual_seed(experiment.seed)
        with torch.no_grad():
            samples = model.sample(experiment.evaluation.samples, temperature=0.7, generator=generator)
        model.train()
    if out is not None and is_main_process():
        write_outputs(out, history, metrics, samples)
    return Result(model, history, metrics, experiment, test_x, test_y)


def write_outputs(out, history: History, metrics: dict, samples: torch.Tensor | None = None) -> None:
    """``history.json``, ``metrics.json`` and (given ``samples`` in [0, 1]) ``samples.png`` in ``out``, atomically."""
    out = Path(out)
    atomic_write_json(out / "history.json", history.to_dict())
    atomic_write_json(out / "metrics.json", metrics)
    if samples is None:
        return
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # pragma: no cover - matplotlib is optional
        return
    n = samples.shape[0]
    cols = int(math.ceil(math.sqrt(n)))
    rows = int(math.ceil(n / cols))
    fig, axes = plt.subplots(rows, cols, figsize=(cols, rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, img in zip(axes.flat, samples.clamp(0, 1).cpu()):
        ax.imshow(img.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1)
    try:
        atomic_write(out / "samples.png", lambda f: fig.savefig(f, format="png", dpi=80, bbox_inches="tight"))
    finally:
        plt.close(fig)

