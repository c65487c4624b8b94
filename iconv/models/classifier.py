r"""The paper's "path to invertibility" (Table 1) as one configurable classifier.

Finzi, Izmailov, Maddox, Kirichenko, Wilson, "Invertible Convolutional Networks" (2019), Table 1,
start from an ordinary CIFAR-10 convnet and swap its non-invertible parts one at a time:

    zero padding  -> circular padding       (the conv becomes a circulant, block-diagonal in Fourier)
    ReLU          -> SneakyReLU             (a smooth bijection of R)
    MaxPool2d     -> an invertible 2x2 downsampling (checkerboard / "iINN" / "iAvgPool2d")

:class:`ConvNet` has one switch per change, so each row of :data:`TABLE1` is one configuration.

Architecture (``k = width``)
----------------------------
Three stages of three blocks ``conv 3x3 -> BatchNorm -> activation``, stage widths
``k -> 2k -> 2k``, a 2x2 downsampling between stages, and a head ``global average pool ->
linear``. Every conv is square (``c -> c``); where the channel count grows, the input is first
padded with zero channels (:class:`ChannelPad`). A square conv applied to ``[x, 0]`` is exactly an
ordinary ``c_in -> c_out`` conv (the weight's columns that meet the zero channels never matter), so
this changes nothing for the ordinary rows and lets every row use the same layers and the same
initialisation; only the switches differ.

* ``downsample="maxpool"`` (rows 1-3): ``pad C_in -> k``, stage 1 at ``k``, max-pool,
  ``pad k -> 2k``, stage 2 at ``2k``, max-pool, stage 3 at ``2k``. ``features(x)`` is the
  ``(B, 2k, H/4, W/4)`` map of stage 3.

* ``downsample`` in ``"squeeze" | "nn" | "avg"`` (rows 4-6). An invertible 2x2 downsampling turns
  ``c`` channels into ``4c``, so it cannot follow a stage of ``k`` channels and feed a stage of
  ``2k`` without losing information. As in multi-scale flows (RealNVP, Glow, and the paper's own
  flow), half of stage 1's channels (the first ones) are *factored out* (set aside untouched) and the other
  ``k/2`` are downsampled to ``4 * k/2 = 2k``; after stage 2, ``k/2`` of its ``2k`` channels are
  downsampled to ``2k`` again and ``3k/2`` are set aside. The stage widths stay ``k, 2k, 2k``
  and the net has the same nine 3x3 convs. Which channels are kept is fixed (the last ones); the
  stage's last conv mixes all channels, so it learns what to put there.
  ``features(x)`` packs everything into one ``(B, 16k, H/4, W/4)`` tensor:
  ``[stage-3 output (2k), S_2(z2) (6k), S_4(z1) (8k)]`` with ``S_r`` space-to-depth by ``r``
  (``F.pixel_unshuffle``), i.e. exactly ``k H W`` numbers
  per image (the size of the channel-padded input). The head pools only the first ``2k`` channels
  (:attr:`ConvNet.head_channels`), the same number as in the ordinary rows; the factored-out parts
  are kept only so that the input can be recovered.

Invertibility (padding ``"circular"``, activation ``"sneaky"``, an invertible downsampling)
-------------------------------------------------------------------------------------------
* Convs: :class:`iconv.InvertibleConv2d`, inverted frequency by frequency (equation (1)).
* BatchNorm: in evaluation mode it is the fixed per-channel affine map
  :math:`y = \gamma (x - \mu) / \sqrt{v + \epsilon} + \beta` with running statistics
  :math:`\mu, v`, invertible whenever every :math:`\gamma \ne 0`. In training mode it normalises
  with the statistics of the batch itself, so one image's output depends on the other images in
  the batch: it is not a function of the image, and :meth:`ConvNet.inverse` refuses it (call
  ``net.eval()``).
* SneakyReLU: closed-form inverse.
* Downsampling: :class:`iconv.Squeeze`, :class:`iconv.NNDownsample`, :class:`iconv.AvgDownsample`.
* Channels: the input's ``C_in`` channels are padded with zeros to ``k``. That is injective, not
  onto: :meth:`ConvNet.inverse` returns the first ``C_in`` channels of the recovered padded input
  (its left inverse); for features of a real image the dropped channels come back as zeros (up to
  rounding): ``net.extractor.inverse(features)`` returns them too.

Structure. The invertible configurations' feature extractor is built from the package's
containers: ``ChannelPad`` (outside, injective), then
``MultiScale([blocks, (downsample, blocks), (downsample, blocks)], factor_out=[k/2, 3k/2])`` with
each block an ``InvertibleSequential(InvertibleConv2d, InvertibleBatchNorm2d, SneakyReLU)``; it
sets aside the *first* channels of each stage. The max-pooling rows use an ordinary
``nn.Sequential`` of the same layers (used through :class:`iconv.layers.Forward`). The Table 1 rows
are in :mod:`iconv.configs`, the loss in :mod:`iconv.losses`, the diagnostics
(conditioning, reconstruction) in :mod:`iconv.evaluation`.
"""

from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_image
from ..errors import NotInvertibleError
from ..layers.activations import SneakyReLU
from ..layers.base import Forward, InvertibleModule, InvertibleSequential, MultiScale, inside
from ..layers.conv import InvertibleConv2d, well_conditioned_weight
from ..layers.normalization import InvertibleBatchNorm2d
from .flow import DOWNSAMPLERS

__all__ = ["ACTIVATIONS", "DOWNSAMPLES", "INVERTIBLE_DOWNSAMPLES", "PADDINGS", "ChannelPad",
           "ConfigurationNotInvertibleError", "ConvNet", "ZeroPaddedConv2d"]

PADDINGS = ("zeros", "circular")
ACTIVATIONS = ("relu", "sneaky")
INVERTIBLE_DOWNSAMPLES = tuple(DOWNSAMPLERS)  # ("squeeze", "nn", "avg")
DOWNSAMPLES = ("maxpool",) + INVERTIBLE_DOWNSAMPLES


class ConfigurationNotInvertibleError(NotInvertibleError):
    """:meth:`ConvNet.inverse` was asked of a configuration (or a mode) that is not invertible."""


# --------------------------------------------------------------------------- layers


class ChannelPad(nn.Module):
    """``(B, c_in, H, W) -> (B, c_out, H, W)``: append ``c_out - c_in`` zero channels.

    Injective with left inverse "keep the first ``c_in`` channels" (:meth:`inverse`); followed by a
    square conv it is an ordinary ``c_in -> c_out`` conv.
    """

    def __init__(self, in_channels: int, out_channels: int):
        super().__init__()
        if not 1 <= in_channels <= out_channels:
            raise ValueError(f"ChannelPad needs 1 <= in_channels <= out_channels, got {in_channels} -> {out_channels}")
        self.in_channels, self.out_channels = in_channels, out_channels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        return torch.cat([x, x.new_zeros(b, self.out_channels - self.in_channels, h, w)], 1)  # (B, c_out, H, W)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return y[:, : self.in_channels]  # (B, c_in, H, W)

    def extra_repr(self) -> str:
        return f"{self.in_channels} -> {self.out_channels}"


class ZeroPaddedConv2d(nn.Module):
    """A square ``c -> c`` conv (odd ``k``) with zero padding: the ordinary conv of the "zeros" rows.

    Initialised like :class:`iconv.InvertibleConv2d` (:func:`iconv.conv.well_conditioned_weight`)
    so that the zero- and circular-padding rows differ in the padding only. Not invertible: the
    zero border makes the matrix a non-circulant (Toeplitz-block) one with no frequency-wise inverse.
    """

    def __init__(self, channels: int, kernel_size: int = 3, init_scale: float = 0.1):
        super().__init__()
        self.channels, self.kernel_size = channels, kernel_size
        self.weight = nn.Parameter(well_conditioned_weight(channels, kernel_size, init_scale))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(x, self.weight, None, padding=self.kernel_size // 2)

    def extra_repr(self) -> str:
        return f"{self.channels}, kernel_size={self.kernel_size}, padding='zeros'"


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)



def _check_sizes(in_channels, num_classes, width) -> tuple[int, int, int]:
    in_channels = _check_positive_int("in_channels", in_channels)
    num_classes = _check_positive_int("num_classes", num_classes)
    width = _check_positive_int("width", width)
    if width % 2:
        raise ValueError(f"width must be even (half of stage 1's channels are downsampled), got {width}")
    if width < in_channels:
        raise ValueError(f"width ({width}) must be at least in_channels ({in_channels}): channels never shrink")
    return in_channels, num_classes, width


def _check_switches(padding, activation, downsample, init_scale, slope) -> None:
    _check_choice("padding", padding, PADDINGS)
    _check_choice("activation", activation, ACTIVATIONS)
    _check_choice("downsample", downsample, DOWNSAMPLES)
    if not (isinstance(init_scale, numbers.Real) and 0 < init_scale < 1e3):
        raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
    if not (isinstance(slope, numbers.Real) and 0 < slope < 1):
        raise ValueError(f"slope must lie strictly between 0 and 1, got {slope!r}")
    if downsample in INVERTIBLE_DOWNSAMPLES and (padding, activation) != ("circular", "sneaky"):
        raise ValueError(f"downsample={downsample!r} builds the invertible factor-out network, which needs "
                         f"padding='circular' and activation='sneaky'; got padding={padding!r}, "
                         f"activation={activation!r} (use downsample='maxpool' for the other rows)")


# --------------------------------------------------------------------------- the network


class ConvNet(nn.Module):
    """The Table 1 classifier; see the module docstring for the architecture and the inverse.

    ``ConvNet(in_channels=3, num_classes=10, width=64, padding="zeros", activation="relu",
    downsample="maxpool")`` is the paper's base convnet (row 1 of :data:`iconv.configs.TABLE1`);
    ``padding="circular", activation="sneaky"`` and ``downsample`` in ``"squeeze" | "nn" | "avg"``
    make the feature extractor invertible (an invertible downsampling needs the other two: its
    factor-out architecture is built from invertible layers only).

    * ``net(x) -> logits (B, num_classes)`` for ``x`` of shape ``(B, in_channels, H, W)`` with
      ``H, W`` divisible by 4 (see :func:`iconv.data.prepare_images` for turning uint8 images into ``x``);
    * ``net.features(x)`` -> the map the head pools (see :attr:`head_channels`);
    * ``net.inverse(features) -> x`` (invertible configuration, evaluation mode only).

    ``width`` (``k``) must be even; ``init_scale`` is the relative size of the random part of each
    conv's initial kernel around an orthogonal centre tap (:func:`iconv.layers.conv.well_conditioned_weight`);
    ``slope`` is SneakyReLU's slope as ``x -> -inf``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64, *,
                 padding: str = "zeros", activation: str = "relu", downsample: str = "maxpool",
                 init_scale: float = 0.1, slope: float = 0.1):
        super().__init__()
        in_channels, num_classes, width = _check_sizes(in_channels, num_classes, width)
        _check_switches(padding, activation, downsample, init_scale, slope)
        self.padding, self.activation, self.downsample = padding, activation, downsample
        self.factor_out = downsample in INVERTIBLE_DOWNSAMPLES
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        self.init_scale, self.slope = init_scale, slope
        #: The keyword arguments that rebuild this model: ``ConvNet(**net.arguments)``.
        self.arguments = dict(in_channels=in_channels, num_classes=num_classes, width=width, padding=padding,
                              activation=activation, downsample=downsample, init_scale=init_scale, slope=slope)
        k = width
        self.pad = ChannelPad(in_channels, k) if in_channels != k else None
        self._convs: list[tuple[str, nn.Module, int]] = []  # (name, conv, stage) in order
        if self.factor_out:
            down = DOWNSAMPLERS[downsample]
            self.extractor = MultiScale(
                [InvertibleSequential(*self._stage(1, k)), InvertibleSequential(down(), *self._stage(2, 2 * k)),
                 InvertibleSequential(down(), *self._stage(3, 2 * k))],
                factor_out=[k // 2, 3 * k // 2], in_channels=k)
        else:
            self.extractor = nn.Sequential(*self._stage(1, k), nn.MaxPool2d(2), ChannelPad(k, 2 * k),
                                           *self._stage(2, 2 * k), nn.MaxPool2d(2), *self._stage(3, 2 * k))
        #: The head averages the first ``head_channels`` channels of ``features(x)``.
        self.head_channels = 2 * k
        self.feature_channels = 16 * k if self.factor_out else 2 * k
        self.head = nn.Linear(self.head_channels, num_classes)
        self.image_size: tuple[int, int] | None = None  # (H, W) of the last input seen

    def _stage(self, s: int, c: int) -> list[nn.Module]:
        """The three blocks ``conv 3x3 -> BatchNorm -> activation`` of stage ``s`` at ``c`` channels.

        Invertible (``InvertibleSequential`` of invertible layers) in the factor-out
        configurations, ordinary ``nn.Sequential`` otherwise; every conv is recorded in ``_convs``.
        """
        blocks = []
        for b in range(1, 4):
            conv = (InvertibleConv2d(c, 3, bias=False, init_scale=self.init_scale) if self.padding == "circular"
                    else ZeroPaddedConv2d(c, 3, init_scale=self.init_scale))
            self._convs.append((f"stage{s}.block{b}", conv, s))
            if self.factor_out:
                blocks.append(InvertibleSequential(conv, InvertibleBatchNorm2d(c), SneakyReLU(self.slope)))
            else:
                act = nn.ReLU() if self.activation == "relu" else Forward(SneakyReLU(self.slope))
                blocks.append(nn.Sequential(Forward(conv) if self.padding == "circular" else conv,
                                            nn.BatchNorm2d(c), act))
        return blocks

    def extra_repr(self) -> str:
        return ", ".join(f"{k}={v!r}" for k, v in self.arguments.items())

    # ---------------------------------------------------------------- structure

    @property
    def switches(self) -> dict:
        return {"padding": self.padding, "activation": self.activation, "downsample": self.downsample}

    def invertibility_problems(self) -> list[str]:
        """Why the feature extractor is not invertible (empty when it is, in evaluation mode)."""
        problems = []
        if self.padding != "circular":
            problems.append("padding='zeros' (a zero-padded conv has no frequency-wise inverse; use 'circular')")
        if self.activation != "sneaky":
            problems.append("activation='relu' (ReLU sends every negative number to 0; use 'sneaky')")
        if self.downsample not in INVERTIBLE_DOWNSAMPLES:
            problems.append("downsample='maxpool' (max-pooling keeps 1 of 4 numbers; use 'squeeze', 'nn' or 'avg')")
        return problems

    @property
    def is_invertible(self) -> bool:
        """Whether the configuration's feature extractor is invertible (in evaluation mode)."""
        return not self.invertibility_problems()

    def convs(self) -> list[tuple[str, nn.Module]]:
        """``(name, conv)`` for the nine square convs, in order: ``"stage1.block1"``, ..."""
        return [(name, conv) for name, conv, _ in self._convs]

    def conv_sizes(self, image_size: tuple[int, int] | None = None) -> dict[str, tuple[int, int]]:
        """The ``(h, w)`` each conv sees for inputs of ``image_size`` (default: the last input's)."""
        h, w = self._image_size(image_size)
        return {name: (h >> (s - 1), w >> (s - 1)) for name, _, s in self._convs}

    def dead_parameters(self) -> int:
        """Conv weights that only ever meet zero channels of a :class:`ChannelPad` (their gradient is 0)."""
        dead = 0
        first = {1: self.in_channels, 2: self.width if not self.factor_out else 2 * self.width}
        for name, conv, s in self._convs:
            if name.endswith("block1") and s in first and first[s] < conv.channels:
                dead += conv.channels * (conv.channels - first[s]) * conv.kernel_size ** 2
        return dead

    def effective_parameter_count(self) -> int:
        """Trainable numbers that can affect the output (excludes :meth:`dead_parameters`)."""
        return sum(p.numel() for p in self.parameters() if p.requires_grad) - self.dead_parameters()

    def _image_size(self, image_size):
        if image_size is None:
            if self.image_size is None:
                raise ValueError("give image_size=(H, W): the network has not seen an input yet")
            return self.image_size
        if len(image_size) != 2:
            raise ValueError(f"image_size must be (H, W), got {image_size!r}")
        return int(image_size[0]), int(image_size[1])

    def _check_input(self, x: torch.Tensor) -> None:
        check_image(x, "x", channels=self.in_channels)  # (B, C_in, H, W)
        h, w = x.shape[-2:]
        if h % 4 or w % 4:
            raise ValueError(f"x has spatial size {h}x{w}; ConvNet halves it twice, so H and W must be divisible by 4")

    # ---------------------------------------------------------------- forward and inverse

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The map before the pooled head: ``(B, 2k, H/4, W/4)``, or ``(B, 16k, H/4, W/4)`` with
        the factored-out parts when the downsampling is invertible (first ``2k`` channels pooled)."""
        self._check_input(x)
        self.image_size = tuple(x.shape[-2:])
        if self.pad is not None:
            x = self.pad(x)  # (B, k, H, W)
        with inside():  # x is checked: the layers skip their own checks
            if isinstance(self.extractor, InvertibleModule):
                return self.extractor.transform(x)
            return self.extractor(x)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, : self.head_channels].mean((2, 3))  # (B, 2k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))  # (B, num_classes)

    def inverse(self, features: torch.Tensor) -> torch.Tensor:
        """Recover ``x`` ``(B, C_in, H, W)`` from ``features(x)`` (invertible configuration, ``net.eval()``).

        ``net.extractor.inverse(features)`` gives the whole recovered input ``(B, k, H, W)``,
        including the channels :class:`ChannelPad` appended (zeros, up to rounding, for the
        features of a real input).
        """
        problems = self.invertibility_problems()
        if problems:
            raise ConfigurationNotInvertibleError(
                "this ConvNet's feature extractor is not invertible: " + "; ".join(problems))
        if self.training:
            raise ConfigurationNotInvertibleError(
                "inverse needs evaluation mode (call net.eval()): in training mode BatchNorm normalises "
                "with the batch's own mean and variance, so the features are not a fixed function of one image")
        check_image(features, "features", channels=self.feature_channels)  # (B, 16k, h, w)
        with inside():
            return self.extractor.inverse(features)[:, : self.in_channels]  # (B, C_in, H, W)
