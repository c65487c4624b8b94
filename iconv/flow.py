r"""The fully convolutional normalizing flow of Finzi et al. (2019), with an exact likelihood.

A normalizing flow is a bijection :math:`f` from images :math:`x` to latents :math:`z = f(x)`
with a simple density :math:`p_Z` (here a standard normal); the change of variables gives

.. math:: \log p_X(x) = \log p_Z(f(x)) + \log|\det Df(x)| .

For the invertible CNN of the paper the Jacobian factorises over layers,

.. math:: \log|\det Df(x)| = \sum_{i=1}^{L}\Big(\log|\det \mathrm{Conv}_{W_i}|
          + \sum_{j,h,w}\log\sigma'\big(a^{(i)}_{jhw}\big)\Big) + \dots ,

with each conv term exact from its Fourier blocks (:func:`iconv.fourier.logabsdet`), the
SneakyReLU term data-dependent, and the dots the preprocessing, per-channel affine and
downsampling layers below (all exact).

What this module fixes relative to the paper's own code (reproduction notes): no channels are
padded with Gaussian noise (the likelihood is exact, not a bound; channels come from invertible
space-to-depth downsampling instead), the logit preprocessing is inverted exactly and its
log-determinant is counted, the only normalisation is an affine layer with ordinary parameters
(so the map is the same in train and eval mode), and nothing assumes CUDA.

The affine layers (:class:`ActNorm` per channel, :class:`PixelAffine` per pixel) start at the
identity; their data-dependent start is an explicit, one-time call, :meth:`FlowModel.initialize`,
made with the same batch on every process before training, after which they are ordinary
parameters. That keeps them deterministic in train and eval mode and safe under
DistributedDataParallel (Glow's implicit first-batch initialisation is a known source of
multi-GPU bugs). The one per-pixel affine is the only layer that is not translation-equivariant:
see :class:`PixelAffine` for why it is there (``pixel_affine=False`` removes it).

Layers follow the protocol of :mod:`iconv`: ``forward(x) -> (y, logabsdet of shape (B,))`` and
``inverse(y) -> x``.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .activations import SneakyReLU
from .checks import check_finite, check_image
from .conv import InvertibleConv2d
from .downsample import AvgDownsample, NNDownsample, Squeeze
from .errors import NotInvertibleError
from .fourier import MAX_RELATIVE_ERROR

__all__ = [
    "ActNorm", "ConvFlow", "DOWNSAMPLERS", "FlowModel", "FlowStep", "LogitTransform", "PixelAffine",
    "check_uint8_images", "evaluate_bits_per_dim", "flow_loss", "nll_to_bits_per_dim", "standard_normal_log_prob",
]

DOWNSAMPLERS = {"squeeze": Squeeze, "nn": NNDownsample, "avg": AvgDownsample}
LOG_2PI = math.log(2 * math.pi)


def standard_normal_log_prob(z: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_i \\log \\mathcal N(z_i; 0, 1)` over all but the batch dimension: ``(B,)``."""
    return -0.5 * (z.pow(2) + LOG_2PI).reshape(z.shape[0], -1).sum(1)


# ----------------------------------------------------------------------------- layers


class LogitTransform(nn.Module):
    r"""Map pixel intensities in :math:`[0, 1]` to the real line.

    :math:`y = \operatorname{logit}(\alpha + (1 - 2\alpha) x)`.

    RealNVP's preprocessing (Dinh et al., 2017) with :math:`\alpha = 0.05`: squeezing into
    :math:`[\alpha, 1 - \alpha]` first keeps the logit finite at 0 and 1. Elementwise, so

    .. math:: \log|\det Dy| = \sum_i \Big(\log(1 - 2\alpha) - \log s_i - \log(1 - s_i)\Big),
              \qquad s_i = \alpha + (1 - 2\alpha) x_i ,

    and the inverse :math:`x = (\operatorname{sigmoid}(y) - \alpha)/(1 - 2\alpha)` undoes it
    exactly (the paper's code forgot the division).
    """

    def __init__(self, alpha: float = 0.05):
        super().__init__()
        if not 0.0 < alpha < 0.5:
            raise ValueError(f"alpha must lie strictly between 0 and 0.5, got {alpha!r}")
        self.alpha = float(alpha)

    @property
    def margin(self) -> float:
        """The map is a bijection from :math:`(-m, 1 + m)`, :math:`m = \\alpha/(1 - 2\\alpha)`, onto the real line."""
        return self.alpha / (1 - 2 * self.alpha)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        a = self.alpha
        s = a + (1 - 2 * a) * x  # in [a, 1 - a]
        y = torch.log(s) - torch.log1p(-s)
        logabsdet = (math.log(1 - 2 * a) - torch.log(s) - torch.log1p(-s)).reshape(x.shape[0], -1).sum(1)
        return y, logabsdet

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (torch.sigmoid(y) - self.alpha) / (1 - 2 * self.alpha)

    def extra_repr(self) -> str:
        return f"alpha={self.alpha}"


class ActNorm(nn.Module):
    r"""Per-channel affine :math:`y_c = e^{s_c} x_c + b_c` (Glow's ActNorm, Kingma & Dhariwal, 2018).

    :math:`\log|\det| = H W \sum_c s_c` for every sample. The parameters start at the identity
    and are ordinary parameters: the layer computes the same function in train and eval mode and
    under DDP. Glow's data-dependent start (zero mean, unit variance per channel on a batch) is
    available, but only explicitly, once, through :meth:`ConvFlow.initialize` (which calls
    :meth:`initialize_from` on every ActNorm in order); nothing happens behind the user's back in
    ``forward``. Call it with the same batch on every process (or only on rank 0 before DDP
    broadcasts the parameters) and multi-GPU training stays consistent.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.channels = channels
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self._initialize_next = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._initialize_next:
            self.initialize_from(x)
        h, w = x.shape[-2:]
        y = x * self.log_scale.exp().view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y, (h * w * self.log_scale.sum()).to(x.dtype).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.bias.view(1, -1, 1, 1)) * torch.exp(-self.log_scale).view(1, -1, 1, 1)

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor, eps: float = 1e-6) -> None:
        """Set ``s, b`` so that this batch leaves the layer with zero mean and unit variance per channel."""
        self._initialize_next = False
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3), unbiased=False)
        self.log_scale.copy_(-torch.log(std + eps))
        self.bias.copy_(-mean / (std + eps))

    def extra_repr(self) -> str:
        return str(self.channels)


class PixelAffine(nn.Module):
    r"""An affine map with its own scale and shift at every position: :math:`y_{chw} = e^{s_{chw}} x_{chw} + b_{chw}`.

    :math:`\log|\det| = \sum_{chw} s_{chw}`. Circular convolutions, SneakyReLU and per-channel
    affines all commute with (even) circular shifts of the image, so a flow made only of them
    gives every shifted copy of an image the same density: it cannot learn that the border of a
    Fashion-MNIST image is black. One per-pixel affine at the input (``2 C H W`` parameters)
    removes that blind spot while keeping every other layer convolutional. Like :class:`ActNorm` it
    starts at the identity and has an optional explicit data-dependent start (per-pixel mean and
    standard deviation of a batch; the standard deviation floored at ``min_std`` so that a pixel
    that is always 0 does not get an enormous scale on the first step).
    """

    def __init__(self, shape, min_std: float = 0.05):
        super().__init__()
        self.shape, self.min_std = tuple(shape), float(min_std)
        self.log_scale = nn.Parameter(torch.zeros(self.shape))
        self.bias = nn.Parameter(torch.zeros(self.shape))
        self._initialize_next = False

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self._initialize_next:
            self.initialize_from(x)
        y = x * self.log_scale.exp() + self.bias
        return y, self.log_scale.sum().to(x.dtype).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        return (y - self.bias) * torch.exp(-self.log_scale)

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        """Per-pixel zero mean and unit variance on this batch (standard deviations floored at ``min_std``)."""
        self._initialize_next = False
        std = x.std(dim=0, unbiased=False).clamp_min(self.min_std)
        self.log_scale.copy_(-torch.log(std))
        self.bias.copy_(-x.mean(dim=0) / std)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"


# ----------------------------------------------------------------------------- shared flow API


class FlowModel(nn.Module):
    r"""What every image flow of the book shares: the likelihood, bits/dim and sampling.

    Subclasses set ``self.shape = (C, H, W)`` and implement ``forward(x) -> (z, logabsdet)`` with
    ``z`` of shape ``(B, C*H*W)`` and ``inverse(z) -> x``, for ``x`` in :math:`[0, 1]`
    (dequantized images). Then

    * ``log_prob(x)`` :math:`= \log\mathcal N(z; 0, I) + \log|\det Df(x)|`, the exact log density
      of :math:`x` in the unit cube (``forward`` accepts the logit's slightly larger domain, so
      that ``forward(inverse(z))`` works for every ``z``; the density lives on :math:`[0, 1]^D`
      only up to the mass the flow puts outside it);
    * ``bits_per_dim(images)`` for ``uint8`` images: dequantize :math:`x = (k + u)/256`,
      :math:`u \sim U[0,1)^D`, and return :math:`(-\log p(x) + D\log 256)/(D \ln 2)`. The
      :math:`D \log 256` converts the density on :math:`[0,1]^D` to one on :math:`[0,256)^D`,
      whose integral over a unit bin bounds the probability of the 8-bit image, so this is an
      unbiased estimate of an upper bound on the discrete model's code length per sub-pixel.
    """

    shape: tuple[int, int, int]

    @property
    def dim(self) -> int:
        c, h, w = self.shape
        return c * h * w

    def _param_dtype(self) -> torch.dtype:
        return next(self.parameters()).dtype

    def _param_device(self) -> torch.device:
        return next(self.parameters()).device

    def check_input(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise unless ``x`` is a finite float batch ``(B, C, H, W)`` of this flow's shape with values in [0, 1]."""
        check_image(x, name)
        if tuple(x.shape[1:]) != tuple(self.shape):
            want = ", ".join(map(str, self.shape))
            raise ValueError(f"{name} has shape {tuple(x.shape)}; this flow takes images of shape (B, {want})")
        lo, hi = (float(v) for v in x.detach().aminmax())
        margin = self.preprocess.margin  # the logit is defined a little beyond [0, 1]
        if lo <= -margin or hi >= 1 + margin:
            raise ValueError(f"{name} must hold dequantized pixel values in [0, 1], found values in "
                             f"[{lo:.3g}, {hi:.3g}]; "
                             "use iconv.data.dequantize(images) on uint8 images, or bits_per_dim(images)")

    def check_latent(self, z: torch.Tensor) -> None:
        if not isinstance(z, torch.Tensor) or not z.is_floating_point():
            got = getattr(z, "dtype", type(z).__name__)
            raise TypeError(f"z must be a floating tensor of shape (B, {self.dim}), got {got}")
        if z.dim() != 2 or z.shape[1] != self.dim:
            raise ValueError(f"z must have shape (B, {self.dim}) (all latents of a {self.shape} image), "
                             f"got {tuple(z.shape)}")
        check_finite(z, "z")

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """Exact log density of dequantized images ``x`` ``(B, C, H, W)`` in [0, 1]: ``(B,)`` nats."""
        z, logabsdet = self(x)
        return standard_normal_log_prob(z) + logabsdet

    def bits_per_dim(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Bits per dimension of ``uint8`` images ``(B, C, H, W)``, one uniform dequantization each: ``(B,)``."""
        from .data import dequantize

        check_uint8_images(images, self.shape)
        x = dequantize(images.to(self._param_device()), generator=generator, dtype=self._param_dtype())
        return nll_to_bits_per_dim(-self.log_prob(x), self.dim)

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images ``(n, C, H, W)`` from :math:`z \\sim \\mathcal N(0, T^2 I)`, mapped back by ``inverse``.

        ``temperature`` :math:`T < 1` trades diversity for typical-looking samples (Glow). The
        result can leave [0, 1] slightly (the inverse logit covers
        :math:`(-\\alpha/(1-2\\alpha), 1 + \\alpha/(1-2\\alpha))`); clamp it to display.
        """
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if not temperature >= 0:
            raise ValueError(f"temperature must be >= 0, got {temperature!r}")
        z = torch.randn(n, self.dim, generator=generator, dtype=self._param_dtype(), device=self._param_device())
        return self.inverse(z * temperature)

    @torch.no_grad()
    def initialize(self, x: torch.Tensor) -> "FlowModel":
        """Data-dependent start of every :class:`ActNorm`, once, from a batch ``x`` (dequantized, [0, 1]).

        Runs one forward pass in which each ActNorm, in order, sets itself so that its output on
        this batch has zero mean and unit variance per channel. Deterministic given ``x``; use the
        same batch on every process. Returns ``self``.
        """
        actnorms = [m for m in self.modules() if isinstance(m, (ActNorm, PixelAffine))]
        for m in actnorms:
            m._initialize_next = True
        try:
            self(x)
        finally:
            for m in actnorms:
                m._initialize_next = False
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters() if p.requires_grad)


def nll_to_bits_per_dim(nll: torch.Tensor, dim: int) -> torch.Tensor:
    r"""Nats of a density on :math:`[0, 1]^D` -> bits per dimension of 8-bit data.

    :math:`(\text{nll} + D\ln 256)/(D\ln 2)`, see :class:`FlowModel`.
    """
    return (nll + dim * math.log(256)) / (dim * math.log(2))


def check_uint8_images(images: torch.Tensor, shape=None, name: str = "images") -> None:
    """Raise unless ``images`` is a ``uint8`` batch ``(B, C, H, W)`` (of ``shape`` if given)."""
    if not isinstance(images, torch.Tensor):
        raise TypeError(f"{name} must be a uint8 torch.Tensor (B, C, H, W), got {type(images).__name__}")
    if images.dtype != torch.uint8:
        raise TypeError(f"{name} must be uint8 pixel values 0..255 (got dtype {images.dtype}); "
                        "for float images in [0, 1] use log_prob(x) instead")
    if images.dim() != 4 or (shape is not None and tuple(images.shape[1:]) != tuple(shape)):
        want = "(B, C, H, W)" if shape is None else f"(B, {', '.join(map(str, shape))})"
        raise ValueError(f"{name} has shape {tuple(images.shape)}, expected {want}")


# ----------------------------------------------------------------------------- ConvFlow


class FlowStep(nn.Sequential):
    """One step of :class:`ConvFlow`: ActNorm, an invertible ``k x k`` circular conv, SneakyReLU."""

    def __init__(self, channels: int, kernel_size: int, slope: float, backend: str, init_scale: float,
                 activation: bool = True):
        layers = [ActNorm(channels), InvertibleConv2d(channels, kernel_size, True, backend, init_scale)]
        if activation:
            layers.append(SneakyReLU(slope))
        super().__init__(*layers)

    def forward(self, x):
        total = x.new_zeros(x.shape[0])
        for layer in self:
            x, lad = layer(x)
            total = total + lad
        return x, total

    def inverse(self, y):
        for layer in reversed(self):
            y = layer.inverse(y)
        return y


class ConvFlow(FlowModel):
    r"""A multi-scale, fully convolutional normalizing flow with an exact likelihood.

    ``ConvFlow(shape)`` for ``shape = (C, H, W)`` builds, for images in :math:`[0, 1]`:

    1. :class:`LogitTransform` (``alpha``), a :class:`PixelAffine` (``pixel_affine=True``; the
       one layer that is not translation-equivariant, see its docstring), then a 2x2
       ``downsample`` (``"squeeze"`` by default, or the paper's ``"nn"`` / ``"avg"``):
       ``(C, H, W) -> (4C, H/2, W/2)``, so that even a one-channel image gives convolutions that
       mix four channels;
    2. ``scales`` levels. Each has ``depth`` steps of [ActNorm, InvertibleConv2d(``kernel_size``),
       SneakyReLU(``slope``)]; every level but the last ends with a 2x2 downsample (``4x``
       channels), an invertible 1x1 conv, and factors out half of the channels straight to the
       latent (the multi-scale architecture of RealNVP; the paper's flow does the same);
    3. a final ActNorm and invertible conv (no activation), so the last latent is an affine
       image of the features.

    Everything is a bijection of :math:`\mathbb R^{CHW}` with an exact log-determinant: no noise
    channels. ``forward(x) -> (z, logabsdet)`` returns all latents as one ``(B, C*H*W)`` tensor
    (the factored-out ones first, in order, then the last level's), ``inverse(z)`` undoes it.

    ``scales=None`` uses as many levels (up to 3) as the image size allows: every downsample
    needs even height and width (Fashion-MNIST 28x28 -> 14x14 -> 7x7 gives 2 levels,
    CIFAR-10 32x32 gives 3). ``depth`` may be an int or one int per level.

    Width. A bijection cannot change the number of dimensions, so the channel count of each
    level is fixed by the image: ``4C`` at the first level, then ``8C``, ``16C``... (after
    factoring out half). The knobs for capacity are ``depth`` and ``kernel_size``. (The paper
    padded its input with 93 Gaussian noise channels to reach 96; that adds width, but the
    likelihood it then reports is only a lower bound.)
    """

    def __init__(self, shape, *, depth=4, scales: int | None = None, kernel_size: int = 3,
                 downsample: str = "squeeze", slope: float = 0.1, alpha: float = 0.05,
                 backend: str = "complex", init_scale: float = 0.1, pixel_affine: bool = True):
        super().__init__()
        c, h, w = _check_shape(shape)
        if downsample not in DOWNSAMPLERS:
            raise ValueError(f"downsample must be one of {tuple(DOWNSAMPLERS)}, got {downsample!r}")
        possible = _halvings(h, w)
        if possible < 1:
            raise ValueError(f"ConvFlow needs even image height and width (it starts with a 2x2 downsample), "
                             f"got {h}x{w}")
        if scales is None:
            scales = min(3, possible)
        if not isinstance(scales, int) or not 1 <= scales <= possible:
            raise ValueError(f"scales must be an int in 1..{possible} for {h}x{w} images "
                             f"(each level but the last halves the size), got {scales!r}")
        depths = [depth] * scales if isinstance(depth, int) else list(depth)
        if len(depths) != scales or any((not isinstance(d, int)) or d < 0 for d in depths):
            raise ValueError(f"depth must be a non-negative int or {scales} of them, got {depth!r}")

        self.shape = (c, h, w)
        self.config = dict(depth=depths, scales=scales, kernel_size=kernel_size, downsample=downsample,
                           slope=slope, alpha=alpha, backend=backend, init_scale=init_scale, pixel_affine=pixel_affine)
        self.preprocess = LogitTransform(alpha)
        self.pixel_affine = PixelAffine((c, h, w)) if pixel_affine else None
        self.first_downsample = DOWNSAMPLERS[downsample]()
        channels, size = 4 * c, (h // 2, w // 2)
        self.levels = nn.ModuleList()
        self.downsamples = nn.ModuleList()
        self.mixers = nn.ModuleList()
        self._latent_shapes = []  # shapes of factored-out latents, then of the final one
        for i, d in enumerate(depths):
            self.levels.append(nn.ModuleList(
                FlowStep(channels, kernel_size, slope, backend, init_scale) for _ in range(d)))
            if i < scales - 1:
                self.downsamples.append(DOWNSAMPLERS[downsample]())
                channels, size = 4 * channels, (size[0] // 2, size[1] // 2)
                self.mixers.append(FlowStep(channels, 1, slope, backend, init_scale, activation=False))
                self._latent_shapes.append((channels // 2, *size))
                channels //= 2
        self.head = FlowStep(channels, kernel_size, slope, backend, init_scale, activation=False)
        self._latent_shapes.append((channels, *size))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, " + ", ".join(f"{k}={v!r}" for k, v in self.config.items())

    def convs(self) -> list[tuple[InvertibleConv2d, tuple[int, int]]]:
        """Every invertible conv with the image size ``(h, w)`` it acts on."""
        out = []
        c, h, w = self.shape
        size = (h // 2, w // 2)
        for i, level in enumerate(self.levels):
            out += [(step[1], size) for step in level]
            if i < len(self.mixers):
                size = (size[0] // 2, size[1] // 2)
                out.append((self.mixers[i][1], size))
        out.append((self.head[1], size))
        return out

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``x`` ``(B, C, H, W)`` in [0, 1] -> ``z`` ``(B, C*H*W)`` and ``log|det Df(x)|`` ``(B,)``.

        The log-determinant includes the preprocessing (logit), so ``log_prob`` is the density of ``x``.
        """
        self.check_input(x)
        x, total = self.preprocess(x)
        if self.pixel_affine is not None:
            x, lad = self.pixel_affine(x)
            total = total + lad
        x, lad = self.first_downsample(x)
        total = total + lad
        latents = []
        for i, level in enumerate(self.levels):
            for step in level:
                x, lad = step(x)
                total = total + lad
            if i < len(self.mixers):
                x, lad = self.downsamples[i](x)
                total = total + lad
                x, lad = self.mixers[i](x)
                total = total + lad
                z_out, x = x.chunk(2, dim=1)  # factor out half the channels
                latents.append(z_out.reshape(x.shape[0], -1))
        x, lad = self.head(x)
        latents.append(x.reshape(x.shape[0], -1))
        return torch.cat(latents, 1), total + lad  # (B, C*H*W), (B,)

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        """The exact inverse of :meth:`forward`: ``(B, C*H*W)`` -> ``(B, C, H, W)``."""
        self.check_latent(z)
        b = z.shape[0]
        sizes = [math.prod(s) for s in self._latent_shapes]
        parts = [p.reshape(b, *s) for p, s in zip(z.split(sizes, dim=1), self._latent_shapes)]
        x = self.head.inverse(parts[-1])
        for i in reversed(range(len(self.levels))):
            if i < len(self.mixers):
                x = torch.cat([parts[i], x], dim=1)
                x = self.mixers[i].inverse(x)
                x = self.downsamples[i].inverse(x)
            for step in reversed(self.levels[i]):
                x = step.inverse(x)
        x = self.first_downsample.inverse(x)
        if self.pixel_affine is not None:
            x = self.pixel_affine.inverse(x)
        return self.preprocess.inverse(x)

    @torch.no_grad()
    def condition_numbers(self) -> list[float]:
        """The worst per-frequency condition number of every conv, at the size it sees."""
        return [float(conv.condition_number(*size)) for conv, size in self.convs()]

    def check_invertible(self, max_condition: float | None = None) -> None:
        """Raise :class:`NotInvertibleError` if a conv is too ill-conditioned to invert in its dtype.

        The default limit is the one :func:`iconv.fourier.inverse` uses (about 8e4 in float32).
        The trainer calls this before every checkpoint, so a run stops before saving a flow it
        cannot sample from.
        """
        for index, (conv, size) in enumerate(self.convs()):
            limit = max_condition or MAX_RELATIVE_ERROR / torch.finfo(conv.weight.dtype).eps
            cond = float(conv.condition_number(*size))
            if not math.isfinite(cond) or cond > limit:
                raise NotInvertibleError(
                    f"conv {index} of the flow ({conv.channels} channels, {size[0]}x{size[1]}) has condition "
                    f"number {cond:.3g}, above {limit:.3g}", condition_number=cond)


def _check_shape(shape) -> tuple[int, int, int]:
    try:
        c, h, w = (int(s) for s in shape)
    except (TypeError, ValueError):
        raise ValueError(f"shape must be (C, H, W), got {shape!r}") from None
    if min(c, h, w) < 1 or tuple(shape) != (c, h, w):
        raise ValueError(f"shape must be three positive ints (C, H, W), got {shape!r}")
    return c, h, w


def _halvings(h: int, w: int) -> int:
    """How many times a 2x2 downsample can halve an ``h x w`` image."""
    n = 0
    while h % 2 == 0 and w % 2 == 0:
        h, w, n = h // 2, w // 2, n + 1
    return n


# ----------------------------------------------------------------------------- training helpers


def flow_loss(model: FlowModel, images: torch.Tensor, labels=None) -> tuple[torch.Tensor, dict]:
    """The training loss for :func:`iconv.train.fit`: mean bits/dim of a ``uint8`` batch.

    Bits/dim is the negative log-likelihood divided by :math:`D \\ln 2` plus 8, so minimising
    it is maximum likelihood on a scale that does not depend on the image size. The uniform
    dequantization noise comes from the global RNG, which ``fit`` seeds per step.
    """
    bpd = model.bits_per_dim(images).mean()
    return bpd, {"bits/dim": bpd.detach()}


@torch.no_grad()
def evaluate_bits_per_dim(model: FlowModel, images: torch.Tensor, batch_size: int = 500, seed: int = 0) -> float:
    """Mean bits/dim of ``uint8`` ``images`` (e.g. the test split), with seeded dequantization noise.

    The noise generator is seeded with ``seed`` so that every evaluation of every model sees the
    same noise (a common random number: differences between models are then less noisy).
    """
    check_uint8_images(images, model.shape)
    gen = torch.Generator(device=model._param_device()).manual_seed(seed)
    total = 0.0
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        total += float(model.bits_per_dim(chunk, generator=gen).double().sum())
    return total / len(images)
