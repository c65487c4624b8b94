"""The Colab sizes stay runnable: ``gpu`` and ``paper`` of :mod:`iconv.configs`, end to end on a CPU.

Each test takes a configured experiment (:func:`iconv.configs.flow`, :func:`iconv.configs.classifier`)
and changes only what makes it small: one or two optimiser steps instead of its epochs, the
held-out count, and the number of images (a synthetic ``cifar-10-python.tar.gz`` in the real
pickled format, or the first images of Debian's Fashion-MNIST). Architecture (width, depth),
optimiser, learning-rate schedule, augmentation and evaluation stay as configured. The data are
found the way a user's are (``data_root=`` or ``$ICONV_DATA``, never ``data=``), the run goes
through :func:`iconv.train.run` (the classifier's resume through ``python -m iconv.train``), and
the checkpoint is reopened with :func:`iconv.load`.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

import iconv
from iconv import configs
from iconv.data import DEBIAN_FASHION_MNIST_DIR
from iconv.train import main as train_main
from iconv.train import read_checkpoint, run
from tests.cifar_files import write_cifar_tarball

#: Synthetic CIFAR-10: five training batches of 26 images (130: one batch of 128, the ``gpu``
#: classifier's) and 16 test images.
CIFAR_BATCH_IMAGES, CIFAR_TEST_IMAGES = 26, 16
CIFAR_TRAIN_IMAGES = 5 * CIFAR_BATCH_IMAGES
#: The ``paper`` flow holds out the last 5,000 training images; the smoke run holds out 2.
SMOKE_HOLDOUT = 2


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread (the budget of this file is counted on one; two threads on a busy 2-core
    machine spin against each other and cost ten times as much)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cifar_root(tmp_path_factory) -> Path:
    """A folder holding only ``cifar-10-python.tar.gz`` (real layout, random images)."""
    root = tmp_path_factory.mktemp("cifar")
    write_cifar_tarball(root / "cifar-10-python.tar.gz", sizes=(CIFAR_BATCH_IMAGES,) * 5, n_test=CIFAR_TEST_IMAGES)
    return root


@pytest.fixture
def debian_fashion_mnist(tmp_path, monkeypatch):
    """``$ICONV_DATA`` at an empty folder, so the loader falls through to Debian's Fashion-MNIST."""
    if not (DEBIAN_FASHION_MNIST_DIR / "train-images-idx3-ubyte.gz").is_file():
        pytest.skip(f"Debian's Fashion-MNIST is not installed ({DEBIAN_FASHION_MNIST_DIR}; "
                    "apt-get install dataset-fashion-mnist)")
    monkeypatch.setenv("ICONV_DATA", str(tmp_path / "empty"))


def smoke(experiment: configs.Experiment, steps: int, **data) -> configs.Experiment:
    """``experiment`` with ``steps`` optimiser steps (instead of its epochs) and the data counts ``data``."""
    return experiment.replace(training={"steps": steps, "epochs": None}, data=data)


def finite_numbers(d: dict) -> dict:
    """The numeric entries of ``d`` (bools excluded), after checking each is finite."""
    numbers = {k: v for k, v in d.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
    bad = {k: v for k, v in numbers.items() if not math.isfinite(v)}
    assert not bad, f"non-finite values: {bad}"
    return numbers


def expected_lr(t: configs.Training, step: int) -> float:
    """The configured learning rate at 0-based ``step`` of ``t.steps``: linear warm-up, then cosine
    decay to 0 at ``t.steps`` (or constant)."""
    if step < t.warmup:
        return t.lr * (step + 1) / t.warmup
    if t.schedule == "constant":
        return t.lr
    progress = min((step - t.warmup) / max(t.steps - t.warmup, 1), 1.0)
    return t.lr * 0.5 * (1 + math.cos(math.pi * progress))


def check_run(result, experiment: configs.Experiment, checkpoint: Path, out: Path) -> dict:
    """What every smoke run must show: its steps ran with finite losses at the configured learning
    rate, the metrics are finite (also in ``metrics.json``), and the checkpoint records the
    experiment and the configured optimiser. Returns the checkpoint's state."""
    t, steps = experiment.training, experiment.training.steps
    history = result.history
    assert history.steps == steps and history.stopped == "completed"
    assert [row["step"] for row in history.train] == list(range(1, steps + 1))
    for row in history.train:
        finite_numbers(row)
        assert row["grad_norm"] > 0
        assert row["lr"] == pytest.approx(expected_lr(t, row["step"] - 1), rel=1e-12)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(json.dumps(result.metrics))
    assert metrics["steps"] == steps and metrics["size"] == experiment.size and metrics["data"] == experiment.data.name
    finite_numbers(metrics)
    assert json.loads((out / "history.json").read_text())["train"] == json.loads(json.dumps(history.train))

    state = read_checkpoint(checkpoint)
    assert state["step"] == steps
    assert configs.Experiment.from_dict(state["experiment"]) == experiment
    group = state["training"]["optimizer"]["param_groups"][0]
    assert group["initial_lr"] == t.lr and group["weight_decay"] == t.weight_decay
    if t.optimizer == "sgd":
        assert group["momentum"] == t.momentum and "betas" not in group
    else:
        assert "betas" in group and "momentum" not in group
        assert all(int(s["step"]) == steps for s in state["training"]["optimizer"]["state"].values())
    return state


def check_load(checkpoint: Path, result) -> torch.nn.Module:
    """:func:`iconv.load` rebuilds the trained model: same class, arguments and weights."""
    model = iconv.load(checkpoint)
    assert type(model) is type(result.model) and not model.training
    assert model.arguments == result.model.arguments
    trained = result.model.state_dict()
    assert model.state_dict().keys() == trained.keys()
    assert all(torch.equal(v, trained[k].cpu()) for k, v in model.state_dict().items())
    return model


def resume(result, experiment, checkpoint: Path, out: Path, **where):
    """Continue ``result``'s run from its checkpoint for one more step; it keeps the first steps."""
    longer = experiment.replace(training={"steps": experiment.training.steps + 1})
    again = run(longer, checkpoint=checkpoint, resume=True, out=out, progress=False, **where)
    check_run(again, longer, checkpoint, out)
    assert again.history.train[:-1] == result.history.train
    return again


# ----------------------------------------------------------------------------- flows


def check_flow(result, experiment, shape):
    metrics = result.metrics
    assert metrics["model"] == {"convflow": "ConvFlow", "glow": "GlowBaseline"}[experiment.model.kind]
    assert 0 < metrics["test_bits/dim"] < 16  # finite; below 16 bits/dim as a density of 8-bit pixels should be
    model = result.model
    assert tuple(model.arguments["shape"]) == shape
    m = experiment.model
    if m.kind == "convflow":
        depths = model.arguments["depth"]  # per scale
        assert len(depths) >= 2 and set(depths) == {m.depth}
        assert (model.arguments["kernel_size"], model.arguments["downsample"]) == (m.kernel_size, m.downsample)
    else:  # the baseline: depth // 2 steps per scale, coupling width matching ConvFlow's parameter count
        assert model.arguments["depth"] == m.depth // 2
        reference = sum(p.numel() for p in iconv.ConvFlow(shape, depth=m.depth).parameters())
        assert abs(metrics["parameters"] - reference) < 0.05 * reference


@pytest.mark.parametrize("kind", ["convflow", "glow"])
def test_flow_gpu_size_on_fashion_mnist(kind, tmp_path, debian_fashion_mnist):
    """``configs.flow("gpu")``: Fashion-MNIST (Debian's files via the search path), 10 epochs cut to
    one step, then resumed for a second."""
    e = smoke(configs.flow("gpu", kind), 1, train_images=256, test_images=64)
    assert (e.model.depth, e.training.batch_size, e.training.warmup) == (8, 64, 200)
    ckpt, out = tmp_path / "flow.pt", tmp_path / "out"
    result = run(e, checkpoint=ckpt, out=out, progress=False)
    check_run(result, e, ckpt, out)
    check_flow(result, e, (1, 28, 28))
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    check_load(ckpt, result)
    if kind == "convflow":  # the resume path is the same for both flows; run it once (CPU budget)
        resume(result, e, ckpt, tmp_path / "out2")


@pytest.mark.parametrize("kind", ["convflow", "glow"])
def test_flow_paper_size_on_cifar10(kind, tmp_path, cifar_root):
    """``configs.flow("paper")``: CIFAR-10 from the tarball at ``data_root``, the held-out images
    cut from 5,000 to 2, 50 epochs cut to one step; a model of (3, 32, 32) images that samples."""
    e = smoke(configs.flow("paper", kind), 1, holdout=SMOKE_HOLDOUT)
    assert configs.flow("paper").data.holdout == 5000 and e.data.name == "cifar10"
    ckpt, out = tmp_path / "flow.pt", tmp_path / "out"
    result = run(e, checkpoint=ckpt, out=out, progress=False, data_root=cifar_root)
    assert result.test_images.shape == (CIFAR_TEST_IMAGES, 3, 32, 32)
    check_run(result, e, ckpt, out)
    check_flow(result, e, (3, 32, 32))
    assert read_checkpoint(ckpt)["run"]["train_data"]["shape"] == [CIFAR_TRAIN_IMAGES - SMOKE_HOLDOUT, 3, 32, 32]
    model = check_load(ckpt, result)
    with torch.no_grad():
        samples = model.sample(2, temperature=0.7, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (2, 3, 32, 32) and torch.isfinite(samples).all()
    if kind == "convflow":  # the resume path is the same for both flows; run it once
        resume(result, e, ckpt, tmp_path / "out2", data_root=cifar_root)


# ----------------------------------------------------------------------------- classifiers


def check_classifier(result, experiment, state, row):
    t, m = experiment.training, experiment.model
    assert t.augment and t.optimizer == "sgd"
    assert state["run"]["run"]["loss"] == {"augment": True, "spectral_weight": 0.0, "spectral_floor": None}
    metrics = result.metrics
    assert metrics["model"] == "ConvNet" and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["max_condition"] >= 1
    net = result.model
    assert net.arguments["width"] == m.width == 64 and net.arguments["in_channels"] == 3
    assert {k: net.arguments[k] for k in m.switches} == m.switches
    assert net.is_invertible == configs.TABLE1[row].invertible == (row == len(configs.TABLE1) - 1)
    if net.is_invertible:
        assert metrics["reconstruction_error"] < 1e-4  # float32 inverse of the trained net


#: The first and the last (invertible) row of Table 1.
ROWS = (0, len(configs.TABLE1) - 1)


@pytest.mark.parametrize("row", ROWS)
def test_classifier_gpu_size_on_cifar10(row, tmp_path, cifar_root, monkeypatch):
    """``configs.classifier("gpu", row)``: width 64, batch 128, augmentation; CIFAR-10 found
    through ``$ICONV_DATA``; 15 epochs cut to one step."""
    monkeypatch.setenv("ICONV_DATA", str(cifar_root))
    e = smoke(configs.classifier("gpu", row), 1)
    assert (e.training.batch_size, e.training.warmup, e.data.test_images) == (128, 200, None)
    ckpt, out = tmp_path / "net.pt", tmp_path / "out"
    result = run(e, checkpoint=ckpt, out=out, progress=False)
    assert result.test_images.shape == (CIFAR_TEST_IMAGES, 3, 32, 32)  # all of them, as configured
    check_classifier(result, e, check_run(result, e, ckpt, out), row)
    check_load(ckpt, result)


@pytest.mark.parametrize("row", ROWS)
def test_classifier_paper_size_on_cifar10(row, tmp_path, cifar_root, capsys):
    """``configs.classifier("paper", row)``: width 64, batch 50, no warm-up, augmentation; 100
    epochs cut to one step. The base convnet is then resumed from the command line (``python -m
    iconv.train``), as a restarted Colab job would be, for one step down the cosine schedule (the
    invertible row's evaluation alone costs seconds: its SVDs and factorizations)."""
    e = smoke(configs.classifier("paper", row), 1)
    assert (e.training.batch_size, e.training.warmup, e.training.lr) == (50, 0, 0.1)
    ckpt, out = tmp_path / "net.pt", tmp_path / "out"
    result = run(e, checkpoint=ckpt, out=out, progress=False, data_root=cifar_root)
    check_classifier(result, e, check_run(result, e, ckpt, out), row)
    check_load(ckpt, result)
    if row != 0:  # the resume path is the same for every row (CPU budget)
        return

    capsys.readouterr()
    command = ["classify", "--size", "paper", "--row", str(row + 1), "--steps", "2", "--data-root", str(cifar_root),
               "--checkpoint", str(ckpt), "--resume", "--out", str(tmp_path / "out2"), "--no-progress"]
    assert train_main(command) == 0, capsys.readouterr().err
    longer = e.replace(training={"steps": 2})
    state = read_checkpoint(ckpt)
    assert state["step"] == 2 and configs.Experiment.from_dict(state["experiment"]) == longer
    train = state["training"]["history"]["train"]
    assert train[:1] == json.loads(json.dumps(result.history.train)) and train[1]["step"] == 2
    assert train[1]["lr"] == pytest.approx(expected_lr(longer.training, 1), rel=1e-12)  # 0.05: half-way down the cosine
    assert math.isfinite(train[1]["loss"])
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["steps"] == 2 and 0 <= printed["test_accuracy"] <= 1
    assert type(iconv.load(ckpt)) is type(result.model)
