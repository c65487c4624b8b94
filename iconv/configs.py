r"""Experiment settings, in one place: named, typed configurations of the book's experiments.

An :class:`Experiment` is everything that defines a run: the :class:`Data` (data set, how much of the
training split, how many test images), the model (:class:`FlowModel` or :class:`ClassifierModel`:
the constructor arguments; the image shape comes from the data), the :class:`Training` recipe and
the :class:`Evaluation`. The command line ``python -m iconv.train``, ``tools/run_table1.py``,
``tools/make_flow_results.py`` and the chapters all read them from here::

    from iconv import configs
    experiment = configs.flow("ci")                 # chapter 7 at its CI size
    experiment = configs.classifier("ci", row=2)    # chapter 9, row 3 of Table 1 (0-based index)
    configs.TABLE1[4].change                        # 'MaxPool2d -> iINN (nearest neighbour)'

Sizes (``ICONV_SIZE``): ``ci`` (seconds on a CPU, what CI runs), ``gpu`` (minutes on one GPU),
``paper`` (the paper's recipe, opt-in). ``cpu`` is the longer CPU run measured offline whose
results the book ships in ``book/results/`` (flow: :func:`flow` ``("cpu")``; Table 1:
:func:`classifier` ``("cpu")``).

The flow sizes (one definition; chapter 7 used these, the old command-line presets disagreed):

======  ==============  =======================  =====  ====  ======  =====  =========
size    data            training images          steps  lr    warmup  depth  test imgs
======  ==============  =======================  =====  ====  ======  =====  =========
ci      Fashion-MNIST   first 10,000             150    3e-3  30      4      1,000
cpu     Fashion-MNIST   all 60,000               1e6 *  3e-3  200     8      1,000 **
gpu     Fashion-MNIST   all 60,000               10 ep  3e-3  200     8      all
paper   CIFAR-10        45,000 (5,000 held out)  50 ep  3e-4  500     8      all
======  ==============  =======================  =====  ====  ======  =====  =========

(batch 64, 32 at ``paper``; gradient clip 50; Adam; cosine schedule, constant at ``cpu``.
\* stopped by a 1,200 CPU-second budget per model; \** every 500 steps, all 10,000 at the end.)

The classifier sizes (chapter 9 and ``tools/run_table1.py`` used these; the old command-line
``ci`` preset, digits / width 16 / 300 steps, is gone): SGD with momentum 0.9, weight decay
5e-4, cosine schedule;

======  ==============  =====  ============  =====  ====  ======  ========  ==========  =========
size    data            width  steps         batch  lr    warmup  augment   eval every  test imgs
======  ==============  =====  ============  =====  ====  ======  ========  ==========  =========
ci      Fashion-MNIST   8      60            32     0.1   10      no        20          2,000
cpu     Fashion-MNIST   16     1,000         64     0.05  50      no        at the end  all
gpu     CIFAR-10        64     15 epochs     128    0.1   200     yes       500         all
paper   CIFAR-10        64     100 epochs    50     0.1   0       yes       5,000       all
======  ==============  =====  ============  =====  ====  ======  ========  ==========  =========

Every configuration is a frozen dataclass: change one field with :func:`dataclasses.replace` or
:meth:`Experiment.replace` (``experiment.replace(training={"steps": 20})``), turn it into plain
data with :meth:`Experiment.to_dict` (what a checkpoint stores) and back with
:meth:`Experiment.from_dict`. Constructing one checks every field (name, allowed range, value).
"""
from __future__ import annotations

import dataclasses
import math
import numbers
from dataclasses import dataclass, field

__all__ = ["SIZES", "FLOW_SIZES", "CLASSIFIER_SIZES", "TABLE1", "TABLE1_PENALTY", "ClassifierModel", "Data",
           "Evaluation", "Experiment", "FlowModel", "Table1Row", "Training", "classifier", "flow", "flow_models"]

#: The sizes every chapter knows (``ICONV_SIZE``).
SIZES = ("ci", "gpu", "paper")
#: The flow's sizes: :data:`SIZES` plus ``cpu``, the offline CPU run of ``book/results/flow``.
FLOW_SIZES = ("ci", "cpu", "gpu", "paper")
#: The classifier's sizes: :data:`SIZES` plus ``cpu``, the offline run of ``book/results/classifier``.
CLASSIFIER_SIZES = ("ci", "cpu", "gpu", "paper")

INVERTIBLE_DOWNSAMPLES = ("squeeze", "nn", "avg")
DATA_SETS = ("fashion-mnist", "digits", "cifar10")


# ----------------------------------------------------------------------------- field checks


def _require(ok: bool, owner: str, name: str, expected: str, value) -> None:
    if not ok:
        raise ValueError(f"{owner}.{name} must be {expected}, got {value!r}")


def _int_at_least(owner, name, value, low, optional=False):
    if optional and value is None:
        return
    ok = isinstance(value, numbers.Integral) and not isinstance(value, bool) and value >= low
    _require(ok, owner, name, f"an int >= {low}" + (" or None" if optional else ""), value)


def _positive_number(owner, name, value, optional=False, allow_zero=False):
    if optional and value is None:
        return
    ok = (isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)
          and (value >= 0 if allow_zero else value > 0))
    what = "a finite number >= 0" if allow_zero else "a finite number > 0"
    _require(ok, owner, name, what + (" or None" if optional else ""), value)


def _choice(owner, name, value, choices):
    _require(value in choices, owner, name, "one of " + ", ".join(map(repr, choices)), value)


# ----------------------------------------------------------------------------- the parts


@dataclass(frozen=True)
class Data:
    """Which images: ``name`` (``"fashion-mnist"``, ``"digits"``, ``"cifar10"``), the training split
    minus its last ``holdout`` images (held out, as the paper did), then its first
    ``train_images`` (all when None); the test split's first ``test_images`` (all when None)."""

    name: str = "fashion-mnist"
    train_images: int | None = None
    holdout: int = 0
    test_images: int | None = None

    def __post_init__(self):
        _choice("Data", "name", self.name, DATA_SETS)
        _int_at_least("Data", "train_images", self.train_images, 1, optional=True)
        _int_at_least("Data", "holdout", self.holdout, 0)
        _int_at_least("Data", "test_images", self.test_images, 1, optional=True)


@dataclass(frozen=True)
class FlowModel:
    """A flow's constructor arguments: ``kind`` ``"convflow"`` (:class:`iconv.ConvFlow` with
    ``depth`` steps per scale, ``kernel_size``, ``downsample``) or ``"glow"`` (the Glow baseline
    with ``depth // 2`` steps per scale and coupling width ``hidden``; None matches the parameter
    count of the ConvFlow of the same settings)."""

    kind: str = "convflow"
    depth: int = 4
    kernel_size: int = 3
    downsample: str = "squeeze"
    hidden: int | None = None

    def __post_init__(self):
        _choice("FlowModel", "kind", self.kind, ("convflow", "glow"))
        _int_at_least("FlowModel", "depth", self.depth, 1)
        _int_at_least("FlowModel", "kernel_size", self.kernel_size, 1)
        _require(self.kernel_size % 2 == 1, "FlowModel", "kernel_size", "odd", self.kernel_size)
        _choice("FlowModel", "downsample", self.downsample, INVERTIBLE_DOWNSAMPLES)
        _int_at_least("FlowModel", "hidden", self.hidden, 1, optional=True)


@dataclass(frozen=True)
class ClassifierModel:
    """:class:`iconv.ConvNet`'s arguments: ``width`` ``k`` and the Table 1 switches."""

    width: int = 8
    padding: str = "zeros"
    activation: str = "relu"
    downsample: str = "maxpool"

    def __post_init__(self):
        _int_at_least("ClassifierModel", "width", self.width, 2)
        _require(self.width % 2 == 0, "ClassifierModel", "width", "even", self.width)
        _choice("ClassifierModel", "padding", self.padding, ("zeros", "circular"))
        _choice("ClassifierModel", "activation", self.activation, ("relu", "sneaky"))
        _choice("ClassifierModel", "downsample", self.downsample, ("maxpool",) + INVERTIBLE_DOWNSAMPLES)

    @property
    def switches(self) -> dict:
        return {"padding": self.padding, "activation": self.activation, "downsample": self.downsample}


@dataclass(frozen=True)
class Training:
    """The recipe: ``steps``, or ``epochs`` over the training images when ``steps`` is None;
    ``batch_size`` (global), Adam or SGD (``optimizer``, ``momentum``, ``weight_decay``), peak
    ``lr`` after ``warmup`` linear steps, then ``schedule`` ``"cosine"`` (to 0) or ``"constant"``;
    gradient-norm ``clip`` (None: off); the classifier's ``augment`` (flips and crops) and spectral
    penalty (``spectral_weight``, ``spectral_floor``, :func:`iconv.losses.make_loss`); an optional
    ``time_limit`` in seconds of ``clock`` (``"wall"`` or ``"process"`` CPU time); a checkpoint
    every ``checkpoint_every`` steps (0: at the end)."""

    steps: int | None = 150
    epochs: float | None = None
    batch_size: int = 64
    lr: float = 3e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    warmup: int = 0
    schedule: str = "cosine"
    clip: float | None = 50.0
    augment: bool = False
    spectral_weight: float = 0.0
    spectral_floor: float = 0.1
    time_limit: float | None = None
    clock: str = "wall"
    checkpoint_every: int = 0

    def __post_init__(self):
        _require((self.steps is None) != (self.epochs is None), "Training", "steps",
                 "given exactly when epochs is None", self.steps)
        _int_at_least("Training", "steps", self.steps, 1, optional=True)
        _positive_number("Training", "epochs", self.epochs, optional=True)
        _int_at_least("Training", "batch_size", self.batch_size, 1)
        _positive_number("Training", "lr", self.lr)
        _choice("Training", "optimizer", self.optimizer, ("adam", "sgd"))
        _require(isinstance(self.momentum, numbers.Real) and 0 <= self.momentum < 1, "Training", "momentum",
                 "a number in [0, 1)", self.momentum)
        _positive_number("Training", "weight_decay", self.weight_decay, allow_zero=True)
        _int_at_least("Training", "warmup", self.warmup, 0)
        _choice("Training", "schedule", self.schedule, ("cosine", "constant"))
        _positive_number("Training", "clip", self.clip, optional=True)
        _require(isinstance(self.augment, bool), "Training", "augment", "True or False", self.augment)
        _positive_number("Training", "spectral_weight", self.spectral_weight, allow_zero=True)
        _require(isinstance(self.spectral_floor, numbers.Real) and 0 < self.spectral_floor < 1, "Training",
                 "spectral_floor", "a number in (0, 1)", self.spectral_floor)
        _positive_number("Training", "time_limit", self.time_limit, optional=True)
        _choice("Training", "clock", self.clock, ("wall", "process"))
        _int_at_least("Training", "checkpoint_every", self.checkpoint_every, 0)

    def total_steps(self, n_train: int) -> int:
        """``steps``, or ``round(epochs * (n_train // batch_size))`` (at least 1)."""
        if self.steps is not None:
            return self.steps
        return max(1, int(round(self.epochs * (n_train // self.batch_size))))


@dataclass(frozen=True)
class Evaluation:
    """Evaluate on the test images every ``every`` steps (0: only at the end); a flow also draws
    ``samples`` images into ``samples.png`` at the end (0: none)."""

    every: int = 0
    samples: int = 64

    def __post_init__(self):
        _int_at_least("Evaluation", "every", self.every, 0)
        _int_at_least("Evaluation", "samples", self.samples, 0)


_PARTS = {"data": Data, "training": Training, "evaluation": Evaluation}
_MODELS = {"flow": FlowModel, "classify": ClassifierModel}


@dataclass(frozen=True)
class Experiment:
    """One run: ``task`` (``"flow"`` or ``"classify"``), ``size`` (its name), ``data``, ``model``,
    ``training``, ``evaluation`` and the ``seed``. :func:`iconv.train.run` runs it."""

    task: str
    size: str
    data: Data = field(default_factory=Data)
    model: FlowModel | ClassifierModel = field(default_factory=FlowModel)
    training: Training = field(default_factory=Training)
    evaluation: Evaluation = field(default_factory=Evaluation)
    seed: int = 0

    def __post_init__(self):
        _choice("Experiment", "task", self.task, tuple(_MODELS))
        _require(isinstance(self.model, _MODELS[self.task]), "Experiment", "model",
                 f"a {_MODELS[self.task].__name__} for task {self.task!r}", self.model)
        for name, cls in _PARTS.items():
            _require(isinstance(getattr(self, name), cls), "Experiment", name, f"a {cls.__name__}",
                     getattr(self, name))
        _require(isinstance(self.size, str), "Experiment", "size", "a name", self.size)
        _int_at_least("Experiment", "seed", self.seed, 0)

    def replace(self, **changes) -> "Experiment":
        """A copy with some fields changed; a part may be given as a dict of its fields to change:
        ``experiment.replace(training={"steps": 20}, seed=1)``."""
        for name, value in list(changes.items()):
            if isinstance(value, dict):
                changes[name] = dataclasses.replace(getattr(self, name), **value)
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        """Plain data (str, int, float, bool, None, dicts): what a checkpoint stores."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Experiment":
        """The inverse of :meth:`to_dict`."""
        parts = {name: kind(**d[name]) for name, kind in _PARTS.items() if name in d}
        return cls(task=d["task"], size=d["size"], model=_MODELS[d["task"]](**d["model"]), seed=d.get("seed", 0),
                   **parts)


# ----------------------------------------------------------------------------- the named sizes

_FLOW_SIZES = {
    "ci": Experiment(
        "flow", "ci", Data("fashion-mnist", train_images=10_000, test_images=1_000), FlowModel(depth=4),
        Training(steps=150, batch_size=64, lr=3e-3, warmup=30, clip=50.0, checkpoint_every=7),
        Evaluation(every=50)),
    "cpu": Experiment(
        "flow", "cpu", Data("fashion-mnist", test_images=1_000), FlowModel(depth=8),
        Training(steps=1_000_000, batch_size=64, lr=3e-3, warmup=200, schedule="constant", clip=50.0,
                 time_limit=1200.0, clock="process", checkpoint_every=250),
        Evaluation(every=500)),
    "gpu": Experiment(
        "flow", "gpu", Data("fashion-mnist"), FlowModel(depth=8),
        Training(steps=None, epochs=10, batch_size=64, lr=3e-3, warmup=200, clip=50.0, checkpoint_every=500),
        Evaluation(every=3000)),
    "paper": Experiment(
        "flow", "paper", Data("cifar10", holdout=5_000), FlowModel(depth=8),
        Training(steps=None, epochs=50, batch_size=32, lr=3e-4, warmup=500, clip=50.0, checkpoint_every=2000),
        Evaluation(every=10_000)),
}

_CLASSIFIER_TRAINING = dict(optimizer="sgd", momentum=0.9, weight_decay=5e-4, clip=None)
_CLASSIFIER_SIZES = {
    "ci": Experiment(
        "classify", "ci", Data("fashion-mnist", test_images=2_000), ClassifierModel(width=8),
        Training(steps=60, batch_size=32, lr=0.1, warmup=10, checkpoint_every=20, **_CLASSIFIER_TRAINING),
        Evaluation(every=20, samples=0)),
    "cpu": Experiment(
        "classify", "cpu", Data("fashion-mnist"), ClassifierModel(width=16),
        Training(steps=1000, batch_size=64, lr=0.05, warmup=50, checkpoint_every=250, **_CLASSIFIER_TRAINING),
        Evaluation(every=0, samples=0)),
    "gpu": Experiment(
        "classify", "gpu", Data("cifar10"), ClassifierModel(width=64),
        Training(steps=None, epochs=15, batch_size=128, lr=0.1, warmup=200, augment=True, checkpoint_every=500,
                 **_CLASSIFIER_TRAINING),
        Evaluation(every=500, samples=0)),
    "paper": Experiment(
        "classify", "paper", Data("cifar10"), ClassifierModel(width=64),
        Training(steps=None, epochs=100, batch_size=50, lr=0.1, warmup=0, augment=True, checkpoint_every=5000,
                 **_CLASSIFIER_TRAINING),
        Evaluation(every=5000, samples=0)),
}


def _size(size: str, table: dict, what: str) -> Experiment:
    if size not in table:
        raise ValueError(f"size must be one of {', '.join(map(repr, table))} for the {what}, got {size!r}")
    return table[size]


def flow(size: str = "ci", model: str = "convflow") -> Experiment:
    """The flow experiment of chapter 7 at ``size``, for ``model`` ``"convflow"`` or ``"glow"``
    (the Glow baseline with ConvFlow's parameter count)."""
    experiment = _size(size, _FLOW_SIZES, "flow")
    return experiment.replace(model={"kind": model})


def flow_models(size: str = "ci") -> tuple[str, ...]:
    """The flows chapter 7 trains at ``size``: ConvFlow alone at ``ci`` (the baseline comes from the
    offline results), ConvFlow and the Glow baseline otherwise."""
    _size(size, _FLOW_SIZES, "flow")
    return ("convflow",) if size == "ci" else ("convflow", "glow")


def classifier(size: str = "ci", row: int = 0, penalty: bool = False) -> Experiment:
    """Chapter 9's classifier at ``size`` with the switches of :data:`TABLE1` ``[row]`` (0-based;
    row 0 is the base convnet) and, with ``penalty=True``, the spectral penalty
    :data:`TABLE1_PENALTY` (the chapter's ``row6+penalty`` run)."""
    experiment = _size(size, _CLASSIFIER_SIZES, "classifier")
    if isinstance(row, bool) or not isinstance(row, int) or not 0 <= row < len(TABLE1):
        raise ValueError(f"row must be an int in 0..{len(TABLE1) - 1} (an index into TABLE1), got {row!r}")
    training = dict(TABLE1_PENALTY) if penalty else {}
    return experiment.replace(model=TABLE1[row].switches, training=training)


# ----------------------------------------------------------------------------- Table 1


@dataclasses.dataclass(frozen=True)
class Table1Row:
    """One row of the paper's Table 1: the change, the switches, and the paper's CIFAR-10 numbers.

    ``paper_change`` is the accuracy difference the paper reports, measured against row
    ``compared_with`` (an index into :data:`TABLE1`; ``None`` for the base net). The three
    downsampling rows are alternatives, each compared with the SneakyReLU row.
    """

    change: str
    padding: str
    activation: str
    downsample: str
    paper_accuracy: float
    paper_change: float | None
    compared_with: int | None

    @property
    def switches(self) -> dict:
        """The keyword arguments of :class:`ConvNet` for this row."""
        return {"padding": self.padding, "activation": self.activation, "downsample": self.downsample}

    @property
    def invertible(self) -> bool:
        return (self.padding == "circular" and self.activation == "sneaky"
                and self.downsample in INVERTIBLE_DOWNSAMPLES)


TABLE1: tuple[Table1Row, ...] = (
    Table1Row("Base convnet", "zeros", "relu", "maxpool", 94.6, None, None),
    Table1Row("Zero padding -> circular padding", "circular", "relu", "maxpool", 94.6, 0.0, 0),
    Table1Row("ReLU -> SneakyReLU", "circular", "sneaky", "maxpool", 93.0, -1.6, 1),
    Table1Row("MaxPool2d -> checkerboard downsampling", "circular", "sneaky", "squeeze", 92.0, -1.0, 2),
    Table1Row("MaxPool2d -> iINN (nearest neighbour)", "circular", "sneaky", "nn", 92.5, -0.5, 2),
    Table1Row("MaxPool2d -> iAvgPool2d", "circular", "sneaky", "avg", 92.6, -0.4, 2),
)
"""The paper's Table 1 (CIFAR-10 test accuracy in %), one :class:`Table1Row` per configuration."""

#: The spectral penalty of chapter 9's last run (``row6+penalty``): :func:`iconv.losses.make_loss` arguments.
TABLE1_PENALTY = {"spectral_weight": 1.0, "spectral_floor": 0.2}
