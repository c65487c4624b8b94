r"""Elementwise and per-channel invertible affine maps: the flows' preprocessing and normalisation.

* :class:`LogitTransform`: pixel intensities in :math:`[0, 1]` to the real line (RealNVP);
* :class:`ActNorm`: a per-channel affine map (Glow);
* :class:`PixelAffine`: an affine map with its own scale and shift at every position.

All follow :class:`iconv.layers.InvertibleModule`. :class:`ActNorm` and :class:`PixelAffine` start
at the identity; their data-dependent start is explicit (``initialize_from``), called once through
:meth:`iconv.models.FlowModel.initialize`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..checks import check_image
from .base import InvertibleModule, at_boundary

__all__ = ["ActNorm", "LogitTransform", "PixelAffine"]


class LogitTransform(InvertibleModule):
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


class ActNorm(InvertibleModule):
    r"""Per-channel affine :math:`y_c = e^{s_c} x_c + b_c` (Glow's ActNorm, Kingma & Dhariwal, 2018).

    :math:`\log|\det| = H W \sum_c s_c` for every sample. The parameters start at the identity
    and are ordinary parameters: the layer computes the same function in train and eval mode and
    under DDP. Glow's data-dependent start (zero mean, unit variance per channel on a batch) is
    available, but only explicitly, once, through :meth:`iconv.models.FlowModel.initialize` (which calls
    :meth:`initialize_from` on every ActNorm in order); nothing happens behind the user's back in
    ``forward``. Call it with the same batch on every process (or only on rank 0 before DDP
    broadcasts the parameters) and multi-GPU training stays consistent.

    A channel whose standard deviation on that batch is below ``min_std`` (a constant batch, a
    single image after a per-pixel normalisation) carries no scale information: it is only
    centred, its scale stays 1. Dividing by such a deviation instead gave scales of 1e6 that
    compound from layer to layer (bits/dim of 1e15 after initialising a flow on one image).
    """

    def __init__(self, channels: int, min_std: float = 1e-3):
        super().__init__()
        self.channels, self.min_std = channels, float(min_std)
        self.log_scale = nn.Parameter(torch.zeros(channels))
        self.bias = nn.Parameter(torch.zeros(channels))

    def _check(self, x: torch.Tensor, name: str) -> None:
        if at_boundary():
            check_image(x, name, channels=self.channels, dtype=self.log_scale.dtype)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "x")
        h, w = x.shape[-2:]
        y = x * self.log_scale.exp().view(1, -1, 1, 1) + self.bias.view(1, -1, 1, 1)
        return y, (h * w * self.log_scale.sum()).to(x.dtype).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, "y")
        return (y - self.bias.view(1, -1, 1, 1)) * torch.exp(-self.log_scale).view(1, -1, 1, 1)

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        """Set ``s, b`` so that this batch leaves the layer with zero mean and unit variance per channel.

        Channels with standard deviation below ``min_std`` are only centred (scale 1).
        """
        check_image(x, "x", channels=self.channels, dtype=self.log_scale.dtype)
        if x.shape[0] == 0:
            raise ValueError("initialize_from needs at least one image, got a batch of 0")
        mean = x.mean(dim=(0, 2, 3))
        std = x.std(dim=(0, 2, 3), unbiased=False)
        std = torch.where(std < self.min_std, torch.ones_like(std), std)
        self.log_scale.copy_(-torch.log(std))
        self.bias.copy_(-mean / std)

    def extra_repr(self) -> str:
        return f"{self.channels}, min_std={self.min_std}"


class PixelAffine(InvertibleModule):
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

    def _check(self, x: torch.Tensor, name: str) -> None:
        if at_boundary():
            check_image(x, name, channels=self.shape[0], dtype=self.log_scale.dtype)
            if tuple(x.shape[1:]) != self.shape:
                raise ValueError(f"{name} has samples of shape {tuple(x.shape[1:])}, expected {self.shape}")

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self._check(x, "x")
        y = x * self.log_scale.exp() + self.bias
        return y, self.log_scale.sum().to(x.dtype).expand(x.shape[0])

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        self._check(y, "y")
        return (y - self.bias) * torch.exp(-self.log_scale)

    @torch.no_grad()
    def initialize_from(self, x: torch.Tensor) -> None:
        """Per-pixel zero mean and unit variance on this batch (standard deviations floored at ``min_std``)."""
        check_image(x, "x", channels=self.shape[0], dtype=self.log_scale.dtype)
        if tuple(x.shape[1:]) != self.shape or x.shape[0] == 0:
            raise ValueError(f"initialize_from needs a batch of at least one {self.shape} sample, "
                             f"got shape {tuple(x.shape)}")
        std = x.std(dim=0, unbiased=False).clamp_min(self.min_std)
        self.log_scale.copy_(-torch.log(std))
        self.bias.copy_(-x.mean(dim=0) / std)

    def extra_repr(self) -> str:
        return f"shape={self.shape}"
