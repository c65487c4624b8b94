r"""BatchNorm as an invertible layer (in evaluation mode).

In evaluation mode BatchNorm is the fixed per-channel affine map

.. math:: y_c = \gamma_c \frac{x_c - \mu_c}{\sqrt{v_c + \epsilon}} + \beta_c
          = s_c x_c + t_c, \qquad s_c = \frac{\gamma_c}{\sqrt{v_c + \epsilon}},

with running statistics :math:`\mu, v`: invertible whenever every :math:`s_c \ne 0`, with
:math:`\log|\det| = HW \sum_c \log|s_c|` and inverse :math:`x_c = (y_c - \beta_c)/s_c + \mu_c`. In
training mode it normalises with the batch's own statistics, so one image's output depends on the
others: not a function of the image. ``forward`` then reports the log-determinant of the affine map
it applied (batch statistics held fixed), and ``inverse`` refuses.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from ..errors import NotInvertibleError
from .base import InvertibleModule

__all__ = ["InvertibleBatchNorm2d"]


class InvertibleBatchNorm2d(InvertibleModule, nn.BatchNorm2d):
    """``nn.BatchNorm2d`` with the invertible-module contract (inverse in evaluation mode only)."""

    def _scale(self, x: torch.Tensor | None = None) -> torch.Tensor:
        """Per-channel slope ``s = gamma / sqrt(var + eps)`` of the map applied to ``x``: ``(C,)``."""
        if self.training and x is not None:
            var = x.detach().var(dim=(0, 2, 3), unbiased=False)
        else:
            var = self.running_var
        gamma = self.weight if self.affine else torch.ones_like(var)
        return gamma / torch.sqrt(var + self.eps)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        y = nn.BatchNorm2d.forward(self, x)
        h, w = x.shape[-2:]
        logabsdet = h * w * self._scale(x).abs().log().sum()
        return y, logabsdet.to(x.dtype).expand(x.shape[0])

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        return nn.BatchNorm2d.forward(self, x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if self.training:
            raise NotInvertibleError(
                "BatchNorm in training mode normalises with the batch's own statistics, so it is not a function "
                "of one image; call .eval() to invert it")
        scale = self._scale()  # (C,)
        tiny = scale.abs() <= torch.finfo(y.dtype).eps * scale.abs().max().clamp_min(torch.finfo(y.dtype).tiny)
        if bool(tiny.any()):
            channel = int(tiny.nonzero()[0])
            raise NotInvertibleError(
                f"BatchNorm scale gamma/sqrt(var + eps) is {float(scale[channel].detach()):.3g} in channel {channel}, "
                "numerically zero relative to the largest: the normalisation is not invertible",
                condition_number=math.inf)
        beta = self.bias if self.affine else torch.zeros_like(scale)
        view = (1, -1, 1, 1)
        return (y - beta.view(view)) / scale.view(view) + self.running_mean.view(view)
