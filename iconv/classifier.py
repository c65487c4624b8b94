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
  flow), half of stage 1's channels are *factored out* (set aside untouched) and the other
  ``k/2`` are downsampled to ``4 * k/2 = 2k``; after stage 2, ``k/2`` of its ``2k`` channels are
  downsampled to ``2k`` again and ``3k/2`` are set aside. The stage widths stay ``k, 2k, 2k``
  and the net has the same nine 3x3 convs. Which channels are kept is fixed (the first ones); the
  stage's last conv mixes all channels, so it learns what to put there.
  ``features(x)`` packs everything into one ``(B, 16k, H/4, W/4)`` tensor:
  ``[stage-3 output (2k), squeeze(z2) (6k), squeeze^2(z1) (8k)]``, i.e. exactly ``k H W`` numbers
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
  rounding), which :meth:`ConvNet.inverse` can report via ``return_padding=True``.

Everything else lives here too: :func:`classification_loss` and :func:`evaluate_accuracy` for the
shared trainer (:mod:`iconv.train`), :func:`conditioning_report` (the worst-conditioned frequency
of every conv) and :func:`spectral_penalty` (a regulariser that keeps each conv's smallest
per-frequency singular values away from zero, relative to its largest).
"""
from __future__ import annotations

import dataclasses
import math
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from . import fourier
from ._threads import safe_factorization_threads
from .activations import _SneakyReLUWithLogDerivative, sneaky_relu_inverse
from .checks import check_image
from .conv import InvertibleConv2d, well_conditioned_weight
from .downsample import AvgDownsample, NNDownsample, Squeeze
from .errors import NotInvertibleError

__all__ = [
    "PADDINGS", "ACTIVATIONS", "DOWNSAMPLES", "INVERTIBLE_DOWNSAMPLES", "INPUT_MEAN", "INPUT_STD",
    "Table1Row", "TABLE1", "ConfigurationNotInvertibleError", "ChannelPad", "ZeroPaddedConv2d",
    "ConvBlock", "ConvNet", "prepare_images", "augment_images", "classification_loss",
    "evaluate_accuracy", "conditioning_report", "spectral_penalty", "make_loss", "reconstruction_error",
    "conditioning_summary", "evaluate_classifier",
]

PADDINGS = ("zeros", "circular")
ACTIVATIONS = ("relu", "sneaky")
DOWNSAMPLES = ("maxpool", "squeeze", "nn", "avg")
INVERTIBLE_DOWNSAMPLES = ("squeeze", "nn", "avg")
_DOWNSAMPLE_LAYERS = {"squeeze": Squeeze, "nn": NNDownsample, "avg": AvgDownsample}

#: ``prepare_images`` maps uint8 pixels p to (p / 255 - INPUT_MEAN) / INPUT_STD, about [-2, 2].
INPUT_MEAN = 0.5
INPUT_STD = 0.25


# --------------------------------------------------------------------------- Table 1


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


def _sneaky(x: torch.Tensor, slope: float) -> torch.Tensor:
    """SneakyReLU with the core layer's analytic backward (autograd through the accurate formulas is slow)."""
    return _SneakyReLUWithLogDerivative.apply(x, slope)[0]


def _batchnorm_inverse(bn: nn.BatchNorm2d, y: torch.Tensor, name: str) -> torch.Tensor:
    r"""Invert evaluation-mode BatchNorm: :math:`x = (y - \beta)\sqrt{v + \epsilon}/\gamma + \mu`."""
    std = torch.sqrt(bn.running_var + bn.eps)  # (C,)
    gamma = bn.weight if bn.affine else torch.ones_like(std)
    beta = bn.bias if bn.affine else torch.zeros_like(std)
    scale = gamma / std  # (C,) the map's per-channel slope
    tiny = scale.abs() <= torch.finfo(y.dtype).eps * scale.abs().max().clamp_min(torch.finfo(y.dtype).tiny)
    if bool(tiny.any()):
        channel = int(tiny.nonzero()[0])
        raise NotInvertibleError(
            f"{name}: BatchNorm scale gamma/sqrt(var + eps) is {float(scale[channel].detach()):.3g} in channel {channel}, "
            "numerically zero relative to the largest: the normalisation is not invertible",
            condition_number=math.inf,
        )
    view = (1, -1, 1, 1)
    return (y - beta.view(view)) / scale.view(view) + bn.running_mean.view(view)


class ConvBlock(nn.Module):
    """``[ChannelPad ->] conv 3x3 -> BatchNorm2d -> activation``, all at ``channels`` channels."""

    def __init__(self, in_channels: int, channels: int, padding: str, activation: str, init_scale: float,
                 slope: float):
        super().__init__()
        self.pad = ChannelPad(in_channels, channels) if in_channels != channels else None
        if padding == "circular":
            self.conv = InvertibleConv2d(channels, 3, bias=False, init_scale=init_scale)
        else:
            self.conv = ZeroPaddedConv2d(channels, 3, init_scale=init_scale)
        self.norm = nn.BatchNorm2d(channels)
        self.activation, self.slope = activation, slope

    @property
    def dead_parameters(self) -> int:
        """Weights that only ever meet the zero channels of :attr:`pad` (their gradient is 0)."""
        if self.pad is None:
            return 0
        c, c_in = self.pad.out_channels, self.pad.in_channels
        return c * (c - c_in) * self.conv.kernel_size**2

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pad is not None:
            x = self.pad(x)
        x = self.conv.conv(x) if isinstance(self.conv, InvertibleConv2d) else self.conv(x)
        x = self.norm(x)
        return F.relu(x) if self.activation == "relu" else _sneaky(x, self.slope)

    def inverse(self, y: torch.Tensor, name: str = "block", drop_padding: bool = True) -> torch.Tensor:
        """Undo the block (evaluation-mode BatchNorm, SneakyReLU, circular conv). With
        ``drop_padding=False`` the padded channels are returned too: ``(B, channels, H, W)``."""
        x = sneaky_relu_inverse(y, self.slope)
        x = _batchnorm_inverse(self.norm, x, f"{name}.norm")
        x = self.conv.inverse(x)
        return self.pad.inverse(x) if self.pad is not None and drop_padding else x


def _check_choice(name: str, value, choices: tuple[str, ...]) -> str:
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}; got {value!r}")
    return value


def _check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return int(value)


# --------------------------------------------------------------------------- the network


class ConvNet(nn.Module):
    """The Table 1 classifier; see the module docstring for the architecture and the inverse.

    ``ConvNet(in_channels=3, num_classes=10, width=64, padding="zeros", activation="relu",
    downsample="maxpool")`` is the paper's base convnet (row 1 of :data:`TABLE1`);
    ``padding="circular", activation="sneaky"`` and ``downsample`` in ``"squeeze" | "nn" | "avg"``
    make the feature extractor invertible.

    * ``net(x) -> logits (B, num_classes)`` for ``x`` of shape ``(B, in_channels, H, W)`` with
      ``H, W`` divisible by 4 (see :func:`prepare_images` for turning uint8 images into ``x``);
    * ``net.features(x)`` -> the map the head pools (see :attr:`head_channels`);
    * ``net.inverse(features) -> x`` (invertible configuration, evaluation mode only).

    ``width`` (``k``) must be even; ``init_scale`` is the relative size of the random part of each
    conv's initial kernel around an orthogonal centre tap (:func:`iconv.conv.well_conditioned_weight`);
    ``slope`` is SneakyReLU's slope as ``x -> -inf``.
    """

    def __init__(self, in_channels: int = 3, num_classes: int = 10, width: int = 64, *,
                 padding: str = "zeros", activation: str = "relu", downsample: str = "maxpool",
                 init_scale: float = 0.1, slope: float = 0.1):
        super().__init__()
        in_channels = _check_positive_int("in_channels", in_channels)
        num_classes = _check_positive_int("num_classes", num_classes)
        width = _check_positive_int("width", width)
        if width % 2:
            raise ValueError(f"width must be even (half of stage 1's channels are downsampled), got {width}")
        if width < in_channels:
            raise ValueError(f"width ({width}) must be at least in_channels ({in_channels}): channels never shrink")
        self.padding = _check_choice("padding", padding, PADDINGS)
        self.activation = _check_choice("activation", activation, ACTIVATIONS)
        self.downsample = _check_choice("downsample", downsample, DOWNSAMPLES)
        if not (isinstance(init_scale, numbers.Real) and 0 < init_scale < 1e3):
            raise ValueError(f"init_scale must be a positive number, got {init_scale!r}")
        if not (isinstance(slope, numbers.Real) and 0 < slope < 1):
            raise ValueError(f"slope must lie strictly between 0 and 1, got {slope!r}")
        self.in_channels, self.num_classes, self.width = in_channels, num_classes, width
        k = width
        self.factor_out = self.downsample in INVERTIBLE_DOWNSAMPLES
        # Channels entering each stage: stage 2 and 3 get 2k after an invertible downsampling of
        # k/2 kept channels, or k (then padded to 2k) and 2k after max-pooling.
        stage_inputs = (in_channels, 2 * k, 2 * k) if self.factor_out else (in_channels, k, 2 * k)
        widths = (k, 2 * k, 2 * k)

        def stage(c_in: int, c: int) -> nn.ModuleList:
            return nn.ModuleList([ConvBlock(c_in if i == 0 else c, c, padding, activation, init_scale, slope)
                                  for i in range(3)])

        self.stages = nn.ModuleList([stage(c_in, c) for c_in, c in zip(stage_inputs, widths)])
        self.down = nn.MaxPool2d(2) if self.downsample == "maxpool" else _DOWNSAMPLE_LAYERS[self.downsample]()
        self.kept_channels = k // 2 if self.factor_out else None
        #: The head averages the first ``head_channels`` channels of ``features(x)``.
        self.head_channels = 2 * k
        self.feature_channels = 16 * k if self.factor_out else 2 * k
        self.head = nn.Linear(self.head_channels, num_classes)
        self.image_size: tuple[int, int] | None = None  # (H, W) of the last input seen

    def extra_repr(self) -> str:
        return (f"in_channels={self.in_channels}, num_classes={self.num_classes}, width={self.width}, "
                f"padding={self.padding!r}, activation={self.activation!r}, downsample={self.downsample!r}")

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

    def blocks(self):
        """``(name, ConvBlock)`` for the nine blocks, in order: ``"stage1.block1"``, ..."""
        for s, stage in enumerate(self.stages, 1):
            for b, block in enumerate(stage, 1):
                yield f"stage{s}.block{b}", block

    def conv_sizes(self, image_size: tuple[int, int] | None = None) -> dict[str, tuple[int, int]]:
        """The ``(h, w)`` each conv sees for inputs of ``image_size`` (default: the last input's)."""
        h, w = self._image_size(image_size)
        return {f"stage{s}.block{b}": (h >> (s - 1), w >> (s - 1))
                for s, stage in enumerate(self.stages, 1) for b in range(1, len(stage) + 1)}

    def effective_parameter_count(self) -> int:
        """Trainable numbers that can affect the output (excludes :attr:`ConvBlock.dead_parameters`)."""
        total = sum(p.numel() for p in self.parameters() if p.requires_grad)
        return total - sum(block.dead_parameters for _, block in self.blocks())

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

    # ---------------------------------------------------------------- forward

    def features(self, x: torch.Tensor) -> torch.Tensor:
        """The map before the pooled head: ``(B, 2k, H/4, W/4)``, or ``(B, 16k, H/4, W/4)`` with
        the factored-out parts when the downsampling is invertible (first ``2k`` channels pooled)."""
        self._check_input(x)
        self.image_size = tuple(x.shape[-2:])
        if not self.factor_out:
            for i, stage in enumerate(self.stages):
                if i:
                    x = self.down(x)  # (B, C, H', W') -> (B, C, H'/2, W'/2)
                for block in stage:
                    x = block(x)
            return x  # (B, 2k, H/4, W/4)
        kept = self.kept_channels
        set_aside = []
        for i, stage in enumerate(self.stages):
            if i:
                set_aside.append(x[:, kept:])  # z1 (B, k/2, H, W), then z2 (B, 3k/2, H/2, W/2)
                x, _ = self.down(x[:, :kept])  # (B, 4 * k/2 = 2k, H'/2, W'/2)
            for block in stage:
                x = block(x)
        z1, z2 = set_aside
        return torch.cat([x, F.pixel_unshuffle(z2, 2), F.pixel_unshuffle(z1, 4)], 1)  # (B, 16k, H/4, W/4)

    def pool(self, features: torch.Tensor) -> torch.Tensor:
        return features[:, : self.head_channels].mean((2, 3))  # (B, 2k)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.pool(self.features(x)))  # (B, num_classes)

    # ---------------------------------------------------------------- inverse

    def inverse(self, features: torch.Tensor, return_padding: bool = False):
        """Recover ``x`` from ``features(x)`` (invertible configuration, ``net.eval()``).

        With ``return_padding=True`` also returns the recovered zero channels that
        :class:`ChannelPad` appended to the input, ``(B, k - C_in, H, W)``: zeros up to rounding
        for the features of a real input, anything for arbitrary features.
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
        k = self.width
        x = features[:, : 2 * k]  # (B, 2k, H/4, W/4)
        z2 = F.pixel_shuffle(features[:, 2 * k : 8 * k], 2)  # (B, 3k/2, H/2, W/2)
        z1 = F.pixel_shuffle(features[:, 8 * k :], 4)  # (B, k/2, H, W)
        set_aside = [z1, z2]
        for s in range(len(self.stages) - 1, -1, -1):
            for b in range(len(self.stages[s]) - 1, -1, -1):
                x = self.stages[s][b].inverse(x, f"stage{s + 1}.block{b + 1}", drop_padding=(s, b) != (0, 0))
            if s:
                x = torch.cat([self.down.inverse(x), set_aside[s - 1]], 1)
        padding = x[:, self.in_channels :]  # (B, k - C_in, H, W)
        x = self.stages[0][0].pad.inverse(x) if self.stages[0][0].pad is not None else x  # (B, C_in, H, W)
        return (x, padding) if return_padding else x


# --------------------------------------------------------------------------- training helpers


def prepare_images(images: torch.Tensor, like: torch.Tensor | nn.Module | None = None) -> torch.Tensor:
    """uint8 images ``(B, C, H, W)`` in 0..255 -> floats ``(p / 255 - 0.5) / 0.25``, about [-2, 2].

    ``like`` (a tensor or a module) gives the dtype and device (default float32, same device).
    Floating inputs are taken as already in [0, 1] and only normalised.
    """
    if not isinstance(images, torch.Tensor) or images.dim() != 4:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, C, H, W) tensor, got {shape}")
    dtype, device = torch.float32, images.device
    if isinstance(like, nn.Module):
        p = next(like.parameters(), None)
        if p is not None:
            dtype, device = p.dtype, p.device
    elif isinstance(like, torch.Tensor):
        dtype, device = like.dtype, like.device
    if images.dtype == torch.uint8:
        x = images.to(device=device, dtype=dtype) / 255
    elif images.is_floating_point():
        x = images.to(device=device, dtype=dtype)
    else:
        raise TypeError(f"images must be uint8 (0..255) or floating (0..1), got {images.dtype}")
    return (x - INPUT_MEAN) / INPUT_STD


def augment_images(images: torch.Tensor, flip: bool = True, crop: int = 4,
                   generator: torch.Generator | None = None) -> torch.Tensor:
    """The usual CIFAR-10 augmentation on a batch: random horizontal flips and random crops
    after zero-padding ``crop`` pixels on each side. Any dtype; shape ``(B, C, H, W)`` kept."""
    b, _, h, w = images.shape
    out = images
    if flip:
        flips = torch.rand(b, generator=generator) < 0.5
        out = torch.where(flips.to(images.device).view(b, 1, 1, 1), out.flip(-1), out)
    if crop:
        padded = F.pad(out, (crop, crop, crop, crop))  # (B, C, H + 2crop, W + 2crop)
        dy = torch.randint(0, 2 * crop + 1, (b,), generator=generator).to(images.device)
        dx = torch.randint(0, 2 * crop + 1, (b,), generator=generator).to(images.device)
        rows = (dy.view(b, 1) + torch.arange(h, device=images.device)).view(b, 1, h, 1)
        cols = (dx.view(b, 1) + torch.arange(w, device=images.device)).view(b, 1, 1, w)
        c = images.shape[1]
        padded = padded.gather(2, rows.expand(b, c, h, w + 2 * crop))
        out = padded.gather(3, cols.expand(b, c, h, w))
    return out


def classification_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        augment: bool = False) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of ``model`` on a batch of uint8 ``images`` ``(B, C, H, W)`` and ``labels`` ``(B,)``.

    Returns ``(loss, {"acc": float})``; ``augment=True`` applies :func:`augment_images` (flip and
    crop) first when the model is in training mode.
    """
    if augment and model.training:
        images = augment_images(images)
    x = prepare_images(images, like=model)  # (B, C, H, W)
    labels = labels.to(x.device)
    logits = model(x)  # (B, classes)
    loss = F.cross_entropy(logits, labels)
    acc = (logits.detach().argmax(1) == labels).float().mean().item()
    return loss, {"acc": acc}


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 256) -> float:
    """Fraction of ``images`` (uint8 ``(N, C, H, W)``) classified as ``labels``, in evaluation mode
    (the model's mode is restored after)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(images), batch_size):
            x = prepare_images(images[start : start + batch_size], like=model)
            y = labels[start : start + batch_size].to(x.device)
            correct += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return correct / len(images)


# --------------------------------------------------------------------------- conditioning


def _square_convs(model: nn.Module):
    """``(name, conv)`` for every square conv of ``model`` (a ConvNet's nine, or any module's)."""
    if isinstance(model, ConvNet):
        for name, block in model.blocks():
            yield name, block.conv
        return
    for name, module in model.named_modules():
        if isinstance(module, (InvertibleConv2d, ZeroPaddedConv2d)):
            yield name, module


def _sizes(model: nn.Module, sizes) -> dict[str, tuple[int, int]]:
    if isinstance(sizes, dict):
        return {name: tuple(hw) for name, hw in sizes.items()}
    if isinstance(model, ConvNet):
        return model.conv_sizes(sizes)
    if sizes is None:
        out = {}
        for name, conv in _square_convs(model):
            if getattr(conv, "_last_size", None) is None:
                raise ValueError(f"give the sizes: conv {name!r} has not seen an input yet")
            out[name] = conv._last_size
        return out
    return {name: tuple(sizes) for name, _ in _square_convs(model)}


def _svdvals(blocks: torch.Tensor) -> torch.Tensor:
    with safe_factorization_threads(blocks):
        return torch.linalg.svdvals(blocks)  # (..., c) descending


@torch.no_grad()
def conditioning_report(model: nn.Module, sizes=None) -> list[dict]:
    r"""The worst-conditioned frequency of every conv layer.

    For each square conv (at the size it sees: ``sizes`` is the network's input ``(H, W)``, a dict
    ``{conv name: (h, w)}``, or ``None`` for the last input's), the Fourier blocks :math:`A_f` of
    the circulant with that kernel (:func:`iconv.fourier.spectrum`) and their singular values. Each
    entry has ``name``, ``size``, ``padding``, ``frequency`` (the ``(u, v)`` maximising
    :math:`\kappa_f = \sigma_1(A_f)/\sigma_c(A_f)`), ``condition`` (that :math:`\kappa_f`),
    ``sigma_min`` (the smallest singular value over all frequencies), ``sigma_max`` (the largest:
    the conv's operator norm) and ``layer_condition = sigma_max / sigma_min`` (the whole conv's
    2-norm condition number, which bounds how much its inverse can amplify relative error).
    For zero-padded convs the numbers describe the circulant with the same kernel (``padding``
    says which), not the zero-padded operator.
    """
    report = []
    for name, (h, w) in _sizes(model, sizes).items():
        conv = dict(_square_convs(model))[name]
        weight = conv.weight.detach()
        s = _svdvals(fourier.spectrum(weight, h, w))  # (h, w//2+1, c)
        kappa = s[..., 0] / s[..., -1]  # (h, w//2+1)
        flat = int(torch.argmax(torch.nan_to_num(kappa, nan=math.inf)))
        u, v = divmod(flat, kappa.shape[1])
        report.append({
            "name": name, "size": (h, w),
            "padding": "circular" if isinstance(conv, InvertibleConv2d) else "zeros",
            "frequency": (u, v), "condition": float(kappa[u, v]),
            "sigma_min": float(s[..., -1].min()), "sigma_max": float(s[..., 0].max()),
            "layer_condition": float(s[..., 0].max() / s[..., -1].min()),
        })
    return report


def spectral_penalty(model: nn.Module, sizes=None, floor: float = 0.1) -> torch.Tensor:
    r"""A differentiable penalty that keeps every conv's smallest singular values away from zero.

    For each square conv with Fourier blocks :math:`A_f` at the size it sees (``sizes`` as in
    :func:`conditioning_report`), let :math:`r_{f,i} = \sigma_i(A_f) / \max_{f,j} \sigma_j(A_f)`,
    the singular values relative to the conv's operator norm. The penalty is

    .. math::
        P = \sum_{\text{convs}} \frac{1}{h w} \sum_f m_f \sum_i
            \Bigl(\frac{\max(0,\ \phi - r_{f,i})}{\phi}\Bigr)^2 ,

    (:math:`m_f` counts a half-spectrum column once or twice, so the sum runs over all
    :math:`hw` frequencies), zero while every conv's condition number stays below
    :math:`1/\phi`, and growing as a singular value approaches zero. Relative values matter
    because BatchNorm after each conv undoes any rescaling of its weight: a floor on the raw
    :math:`\sigma` could be met by inflating the weight without improving the condition number.
    The paper's authors also penalised the per-frequency singular values (reproduction notes);
    this hinge is our own form. Add ``weight * spectral_penalty(...)`` to the loss.
    """
    if not (isinstance(floor, numbers.Real) and 0 < floor < 1):
        raise ValueError(f"floor must lie strictly between 0 and 1 (a bound on 1/condition number), got {floor!r}")
    convs = dict(_square_convs(model))
    total = None
    for name, (h, w) in _sizes(model, sizes).items():
        weight = convs[name].weight
        s = _svdvals(fourier.spectrum(weight, h, w))  # (h, w//2+1, c)
        r = s / s.max()
        hinge = (torch.relu(floor - r) / floor).pow(2).sum(-1)  # (h, w//2+1)
        mult = fourier.conjugate_multiplicity(w, device=weight.device).to(hinge.dtype)  # (w//2+1,)
        term = (hinge * mult).sum() / (h * w)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the model has no square conv to regularise")
    return total


# --------------------------------------------------------------------------- for the trainer


def make_loss(augment: bool = False, spectral_weight: float = 0.0, spectral_floor: float = 0.1):
    """A ``loss_fn(model, images, labels) -> (loss, metrics)`` for :func:`iconv.train.fit`:
    :func:`classification_loss` (with ``augment``) plus ``spectral_weight *``
    :func:`spectral_penalty` ``(model, floor=spectral_floor)`` at the batch's image size; the
    penalty's value is reported as ``metrics["penalty"]`` when it is on."""
    if not (isinstance(spectral_weight, numbers.Real) and spectral_weight >= 0):
        raise ValueError(f"spectral_weight must be a number >= 0, got {spectral_weight!r}")
    if spectral_weight:
        if not (isinstance(spectral_floor, numbers.Real) and 0 < spectral_floor < 1):
            raise ValueError(f"spectral_floor must lie strictly between 0 and 1, got {spectral_floor!r}")

    def loss_fn(model, images, labels):
        loss, metrics = classification_loss(model, images, labels, augment=augment)
        if spectral_weight:
            penalty = spectral_penalty(model, None, spectral_floor)
            loss = loss + spectral_weight * penalty
            metrics["penalty"] = penalty.item()
        return loss, metrics

    return loss_fn


@torch.no_grad()
def reconstruction_error(model: ConvNet, images: torch.Tensor, batch_size: int = 256) -> dict:
    """How well an invertible :class:`ConvNet` recovers its inputs, in the model's dtype.

    Feeds ``prepare_images(images)`` through ``features`` and ``inverse`` in evaluation mode and
    returns ``{"relative_error": ||x_hat - x|| / ||x|| over all images, "max_relative_error": the
    worst image's, "max_abs_error_grey_levels": the largest pixel error in 0..255 units,
    "padding_residual": the largest recovered value of the zero channels}``.
    """
    was_training = model.training
    model.eval()
    try:
        num = den = 0.0
        worst = worst_abs = residual = 0.0
        for start in range(0, len(images), batch_size):
            x = prepare_images(images[start : start + batch_size], like=model)
            x_hat, pad = model.inverse(model.features(x), return_padding=True)
            diff = (x_hat - x).flatten(1).double()
            ref = x.flatten(1).double()
            num += float(diff.pow(2).sum())
            den += float(ref.pow(2).sum())
            worst = max(worst, float((diff.norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).max()))
            worst_abs = max(worst_abs, float(diff.abs().max()) * INPUT_STD * 255)
            residual = max(residual, float(pad.abs().max()) if pad.numel() else 0.0)
    finally:
        model.train(was_training)
    return {"relative_error": math.sqrt(num / den), "max_relative_error": worst,
            "max_abs_error_grey_levels": worst_abs, "padding_residual": residual}


@torch.no_grad()
def conditioning_summary(model: nn.Module, sizes=None) -> dict:
    """:func:`conditioning_report` flattened for a training history: ``condition/<conv>`` (each
    conv's worst per-frequency condition number), ``max_condition`` (their maximum) and
    ``max_layer_condition`` (the largest whole-conv condition number)."""
    report = conditioning_report(model, sizes)
    out = {"max_condition": max(entry["condition"] for entry in report),
           "max_layer_condition": max(entry["layer_condition"] for entry in report)}
    out.update({f"condition/{entry['name']}": entry["condition"] for entry in report})
    return out


@torch.no_grad()
def evaluate_classifier(model: ConvNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                        reconstruct: int = 64) -> dict:
    """The trainer's ``evaluate``: ``test_accuracy``, :func:`conditioning_summary` at the images'
    size, and for an invertible configuration the relative reconstruction error of the first
    ``reconstruct`` images in the model's dtype (``reconstruction_error``)."""
    out = {"test_accuracy": evaluate_accuracy(model, images, labels, batch_size)}
    out.update(conditioning_summary(model, tuple(images.shape[-2:])))
    if isinstance(model, ConvNet) and model.is_invertible and reconstruct:
        out["reconstruction_error"] = reconstruction_error(model, images[:reconstruct], batch_size)["relative_error"]
    return out
