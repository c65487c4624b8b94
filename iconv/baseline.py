r"""A Glow-style flow, written plainly, as the baseline for :class:`iconv.ConvFlow`.

Glow (Kingma & Dhariwal, 2018) stacks, at each scale, steps of

1. ActNorm: per-channel affine (:class:`iconv.flow.ActNorm`, the same layer ConvFlow uses);
2. an invertible 1x1 conv: a ``c x c`` matrix :math:`W` applied at every pixel,
   :math:`\log|\det| = HW\log|\det W|`;
3. an affine coupling layer (RealNVP, Dinh et al., 2017): split the channels into halves
   :math:`(x_a, x_b)`, keep :math:`x_a`, and map
   :math:`y_b = (x_b + t(x_a)) \odot s(x_a)` with :math:`s = \operatorname{sigmoid}(\cdot + 2) > 0`
   computed by a small CNN; :math:`\log|\det| = \sum \log s`. Inverse:
   :math:`x_b = y_b / s(x_a) - t(x_a)`.

Between scales it squeezes (space-to-depth) and factors out half of the channels, as ConvFlow
does. Preprocessing (dequantization, :class:`iconv.flow.LogitTransform`) and the standard normal
prior are the same as ConvFlow's, so bits/dim are comparable. Two simplifications against the
original Glow, both applied to ConvFlow too: the factored-out latents get a standard normal
prior (Glow learns a conditional Gaussian for them), and the 1x1 conv is a plain matrix
(Glow's LU parameterisation only makes it faster).

The API is ConvFlow's (:class:`iconv.flow.FlowModel`): ``forward(x) -> (z, logabsdet)``,
``inverse``, ``log_prob``, ``bits_per_dim``, ``sample``, ``initialize``.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .downsample import Squeeze
from .flow import ActNorm, FlowModel, LogitTransform, _check_shape, _halvings

__all__ = ["AffineCoupling", "GlowBaseline", "GlowStep", "Invertible1x1Conv", "matching_hidden_width"]


class Invertible1x1Conv(nn.Module):
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


class AffineCoupling(nn.Module):
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


class GlowStep(nn.Module):
    """ActNorm -> invertible 1x1 conv -> affine coupling."""

    def __init__(self, channels: int, hidden: int):
        super().__init__()
        self.layers = nn.ModuleList([ActNorm(channels), Invertible1x1Conv(channels), AffineCoupling(channels, hidden)])

    def forward(self, x):
        total = x.new_zeros(x.shape[0])
        for layer in self.layers:
            x, lad = layer(x)
            total = total + lad
        return x, total

    def inverse(self, y):
        for layer in reversed(self.layers):
            y = layer.inverse(y)
        return y


class GlowBaseline(FlowModel):
    """A multi-scale Glow: logit preprocessing, then per scale: squeeze, ``depth`` Glow steps, split.

    ``GlowBaseline(shape, depth=4, hidden=16, scales=None)``; ``scales=None`` uses as many scales
    (up to 3) as the image size allows, exactly like :class:`iconv.ConvFlow`. Latent layout:
    the factored-out halves in order, then the last scale's output, one ``(B, C*H*W)`` tensor.
    Use :func:`matching_hidden_width` to give it the parameter count of another model.
    """

    def __init__(self, shape, *, depth: int = 4, hidden: int = 16, scales: int | None = None, alpha: float = 0.05):
        super().__init__()
        c, h, w = _check_shape(shape)
        possible = _halvings(h, w)
        if possible < 1:
            raise ValueError(f"GlowBaseline needs even image height and width (it starts with a squeeze), got {h}x{w}")
        scales = min(3, possible) if scales is None else scales
        if not isinstance(scales, int) or not 1 <= scales <= possible:
            raise ValueError(f"scales must be an int in 1..{possible} for {h}x{w} images, got {scales!r}")
        if not isinstance(depth, int) or depth < 1 or not isinstance(hidden, int) or hidden < 1:
            raise ValueError(f"depth and hidden must be positive ints, got depth={depth!r}, hidden={hidden!r}")
        self.shape = (c, h, w)
        self.config = dict(depth=depth, hidden=hidden, scales=scales, alpha=alpha)
        self.preprocess = LogitTransform(alpha)
        self.squeeze = Squeeze()
        self.levels = nn.ModuleList()
        self._latent_shapes = []
        channels, size = c, (h, w)
        for i in range(scales):
            channels, size = 4 * channels, (size[0] // 2, size[1] // 2)
            self.levels.append(nn.ModuleList(GlowStep(channels, hidden) for _ in range(depth)))
            if i < scales - 1:
                self._latent_shapes.append((channels // 2, *size))
                channels //= 2
        self._latent_shapes.append((channels, *size))

    def extra_repr(self) -> str:
        return f"shape={self.shape}, " + ", ".join(f"{k}={v!r}" for k, v in self.config.items())

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        self.check_input(x)
        x, total = self.preprocess(x)
        latents = []
        for i, level in enumerate(self.levels):
            x, _ = self.squeeze(x)
            for step in level:
                x, lad = step(x)
                total = total + lad
            if i < len(self.levels) - 1:
                z_out, x = x.chunk(2, dim=1)
                latents.append(z_out.reshape(x.shape[0], -1))
        latents.append(x.reshape(x.shape[0], -1))
        return torch.cat(latents, 1), total

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        self.check_latent(z)
        b = z.shape[0]
        sizes = [math.prod(s) for s in self._latent_shapes]
        parts = [p.reshape(b, *s) for p, s in zip(z.split(sizes, dim=1), self._latent_shapes)]
        x = parts[-1]
        for i in reversed(range(len(self.levels))):
            if i < len(self.levels) - 1:
                x = torch.cat([parts[i], x], dim=1)
            for step in reversed(self.levels[i]):
                x = step.inverse(x)
            if not bool(torch.isfinite(x).all()):
                raise FloatingPointError(
                    f"GlowBaseline.inverse overflowed at scale {i}: the affine couplings divide by their scales "
                    f"s = sigmoid(.) and some 1/s products exceed the {x.dtype} range; sample at a lower temperature "
                    "or in float64")
            x = self.squeeze.inverse(x)
        return self.preprocess.inverse(x)


def matching_hidden_width(shape, target_parameters: int, depth: int, scales: int | None = None,
                          max_hidden: int = 1024) -> int:
    """The ``hidden`` width whose :class:`GlowBaseline` has the parameter count closest to ``target_parameters``."""
    def count(hidden):
        return GlowBaseline(shape, depth=depth, hidden=hidden, scales=scales).num_parameters()

    lo, hi = 1, max_hidden
    while lo < hi:  # smallest hidden with count >= target (count grows with hidden)
        mid = (lo + hi) // 2
        if count(mid) >= target_parameters:
            hi = mid
        else:
            lo = mid + 1
    candidates = [h for h in (lo - 1, lo) if h >= 1]
    return min(candidates, key=lambda h: abs(count(h) - target_parameters))
