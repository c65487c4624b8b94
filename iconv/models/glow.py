r"""A Glow-style flow, written plainly, as the baseline for :class:`iconv.ConvFlow`.

Glow (Kingma & Dhariwal, 2018) stacks, at each scale, steps of

1. ActNorm: per-channel affine (:class:`iconv.layers.ActNorm`, the same layer ConvFlow uses);
2. an invertible 1x1 conv: a ``c x c`` matrix :math:`W` applied at every pixel,
   :math:`\log|\det| = HW\log|\det W|`;
3. an affine coupling layer (RealNVP, Dinh et al., 2017): split the channels into halves
   :math:`(x_a, x_b)`, keep :math:`x_a`, and map
   :math:`y_b = (x_b + t(x_a)) \odot s(x_a)` with :math:`s = \operatorname{sigmoid}(\cdot + 2) > 0`
   computed by a small CNN; :math:`\log|\det| = \sum \log s`. Inverse:
   :math:`x_b = y_b / s(x_a) - t(x_a)`.

Between scales it squeezes (space-to-depth) and factors out half of the channels, as ConvFlow
does. Preprocessing (dequantization, :class:`iconv.layers.LogitTransform`) and the standard normal
prior are the same as ConvFlow's, so bits/dim are comparable. Two simplifications against the
original Glow, both applied to ConvFlow too: the factored-out latents get a standard normal
prior (Glow learns a conditional Gaussian for them), and the 1x1 conv is a plain matrix
(Glow's LU parameterisation only makes it faster).

Built from the same containers as ConvFlow: ``InvertibleSequential(logit, MultiScale(levels))``
with each level ``InvertibleSequential(Squeeze, glow_step, ...)``. The API is ConvFlow's
(:class:`iconv.models.FlowModel`): ``forward(x) -> (z, logabsdet)``,
``inverse``, ``log_prob``, ``bits_per_dim``, ``sample``, ``initialize``.
"""

from __future__ import annotations

import torch

from ..data import check_image_shape
from ..layers.affine import ActNorm, LogitTransform
from ..layers.base import InvertibleSequential, MultiScale
from ..layers.coupling import AffineCoupling, Invertible1x1Conv
from ..layers.downsample import Squeeze
from .flow import FlowModel, halvings

__all__ = ["GlowBaseline", "glow_step", "matching_hidden_width"]


def glow_step(channels: int, hidden: int) -> InvertibleSequential:
    """One Glow step: ActNorm -> invertible 1x1 conv -> affine coupling."""
    return InvertibleSequential(ActNorm(channels), Invertible1x1Conv(channels), AffineCoupling(channels, hidden))


class GlowBaseline(FlowModel):
    """A multi-scale Glow: logit preprocessing, then per scale: squeeze, ``depth`` Glow steps, split.

    ``GlowBaseline(shape, depth=4, hidden=16, scales=None)``; ``scales=None`` uses as many scales
    (up to 3) as the image size allows, exactly like :class:`iconv.ConvFlow`. The latent is
    :class:`~iconv.layers.MultiScale`'s packed image, flattened to ``(B, C*H*W)``.
    Use :func:`matching_hidden_width` to give it the parameter count of another model.
    """

    def __init__(self, shape, *, depth: int = 4, hidden: int = 16, scales: int | None = None, alpha: float = 0.05):
        super().__init__()
        c, h, w = check_image_shape(shape)
        possible = halvings(h, w)
        if possible < 1:
            raise ValueError(f"GlowBaseline needs even image height and width (it starts with a squeeze), got {h}x{w}")
        scales = min(3, possible) if scales is None else scales
        if isinstance(scales, bool) or not isinstance(scales, int) or not 1 <= scales <= possible:
            raise ValueError(f"scales must be an int in 1..{possible} for {h}x{w} images, got {scales!r}")
        for name, value in (("depth", depth), ("hidden", hidden)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        levels, factor_out, channels = [], [], c
        for i in range(scales):
            channels *= 4
            levels.append(InvertibleSequential(Squeeze(), *(glow_step(channels, hidden) for _ in range(depth))))
            if i < scales - 1:
                factor_out.append(channels // 2)
                channels //= 2
        self.net = InvertibleSequential(LogitTransform(alpha), MultiScale(levels, factor_out, in_channels=c))
        self._finish((c, h, w), dict(depth=depth, hidden=hidden, scales=scales, alpha=alpha))

    def inverse(self, z: torch.Tensor) -> torch.Tensor:
        x = super().inverse(z)
        if not bool(torch.isfinite(x).all()):
            raise FloatingPointError(
                "GlowBaseline.inverse overflowed: the affine couplings divide by their scales s = sigmoid(.) and "
                f"some 1/s products exceed the {x.dtype} range; sample at a lower temperature or in float64")
        return x


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
