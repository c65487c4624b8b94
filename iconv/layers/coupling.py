r"""Glow's layers (Kingma & Dhariwal, 2018): the invertible 1x1 convolution and the affine coupling.

Used by the Glow-style baseline :class:`iconv.models.GlowBaseline`; both follow
:class:`iconv.layers.InvertibleModule`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import InvertibleModule

__all__ = ["AffineCoupling", "Invertible1x1Conv"]


class Invertible1x1Conv(InvertibleModule):
    """Glow's invertible 1x1 convolution: ``y[:, :, i, j] = W x[:, :, i, j]``, initialised orthogonal."""

    def __init__(self, channels: int):
        super().__init__()
        q, r = torch.linalg.qr(torch.randn(channels, channels, dtype=torch.float64))
        self.weight = nn.Parameter((q * torch.sign(torch.diagonal(r))).float())  # (c, c)

    def forward(self, x):
        h, w = x.shape[-2:]
        y = F.conv2d(x, self.weight[:, :, None, None])
        return y, (h * w * torch.linalg.slogdet(self.weight)[1]).to(x.dtype).expand(x.shape[0])

    def inverse(self, y):
        return F.conv2d(y, torch.linalg.inv(self.weight)[:, :, None, None])


class AffineCoupling(InvertibleModule):
    """RealNVP/Glow affine coupling with a three-layer CNN (3x3, 1x1, 3x3; zero padding, ReLU).

    The last conv starts at zero, so the layer starts as the identity (Glow's ``ZeroConv2d``).
    """

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        if channels < 2:
            raise ValueError(f"an affine coupling needs at least 2 channels, got {channels}")
        self.split = channels // 2
        out = channels - self.split
        self.net = nn.Sequential(
            nn.Conv2d(self.split, hidden, 3, padding=1), nn.ReLU(),
            nn.Conv2d(hidden, hidden, 1), nn.ReLU(),
            nn.Conv2d(hidden, 2 * out, 3, padding=1),
        )
        nn.init.zeros_(self.net[-1].weight)
        nn.init.zeros_(self.net[-1].bias)

    def _scale_shift(self, xa):
        h = self.net(xa)
        shift, raw = h[:, 0::2], h[:, 1::2]
        log_scale = F.logsigmoid(raw + 2.0)
        return log_scale, shift

    def forward(self, x):
        xa, xb = x[:, :self.split], x[:, self.split:]
        log_scale, shift = self._scale_shift(xa)
        yb = (xb + shift) * log_scale.exp()
        return torch.cat([xa, yb], 1), log_scale.reshape(x.shape[0], -1).sum(1)

    def inverse(self, y):
        ya, yb = y[:, :self.split], y[:, self.split:]
        log_scale, shift = self._scale_shift(ya)
        return torch.cat([ya, yb * torch.exp(-log_scale) - shift], 1)
