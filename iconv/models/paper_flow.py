r"""The paper's own flow (Finzi et al., 2019, Table 2): noise-padded channels, so a bound.

The paper padded the image's ``C`` channels with Gaussian noise channels :math:`u \sim
\mathcal N(0, I)` (3 -> 96 on CIFAR-10) and trained a flow :math:`f` on the joint
:math:`(x, u)`. The flow gives the exact joint density

.. math:: \log p(x, u) = \log\mathcal N(f(x, u); 0, I) + \log|\det Df(x, u)| ,

but the density of :math:`x` alone is the integral :math:`p(x) = \int p(x, u)\,du`, which is not
available. With :math:`q(u \mid x) = \mathcal N(u; 0, I)` (how the noise is drawn), Jensen's
inequality gives the variational lower bound (ELBO)

.. math:: \log p(x) \ \ge\ \mathbb E_{u \sim q}\big[\log p(x, u) - \log q(u)\big],

and :meth:`PaperFlow.log_prob_bound` returns the term inside for one draw of :math:`u` (an
unbiased estimate of the bound). The importance-weighted estimate (IWAE, Burda et al., 2016)

.. math:: \log \frac1K \sum_{k=1}^K \frac{p(x, u_k)}{q(u_k)}, \qquad u_k \sim q,

is a lower bound in expectation too, increases with :math:`K` in expectation, and tends to
:math:`\log p(x)` as :math:`K \to \infty` (:meth:`PaperFlow.importance_weighted_log_prob`). What
the paper reported as a likelihood is the first of these: a bound, and the book labels it so.

The architecture, as the reproduction notes describe it, at any image size: the joint input
``[x, u]`` ``(C + P, H, W)`` (image channels first), the logit preprocessing of ConvFlow on the
image channels only, then ``scales`` levels: each but the last is ``depth`` x (InvertibleConv2d,
SneakyReLU), a nearest-neighbour 2x2 downsampling (:class:`~iconv.layers.NNDownsample`), an
invertible 1x1 conv, and half of the channels factored out; the last level is ``depth`` x (conv,
SneakyReLU) then a conv. Standard normal prior on all latents. Built only from the package's
containers: the logit on the image channels alone is a :class:`~iconv.layers.MultiScale` whose
first level is the identity and sets the noise channels aside (see :meth:`PaperFlow.__init__`).
"""
from __future__ import annotations

import math

import torch

from ..checks import check_image
from ..data import check_image_shape, check_uint8_images, dequantize
from ..layers.activations import SneakyReLU
from ..layers.affine import ActNorm, LogitTransform
from ..layers.base import InvertibleSequential, MultiScale
from ..layers.conv import InvertibleConv2d
from ..layers.downsample import NNDownsample
from .flow import FlowModel, halvings, level_depths, nll_to_bits_per_dim, standard_normal_log_prob

__all__ = ["PaperFlow"]


class PaperFlow(FlowModel):
    r"""The paper's flow on noise-padded images; reports a variational bound on :math:`\log p(x)`.

    ``PaperFlow(shape, pad_channels=3, depth=2, scales=None, kernel_size=3, ...)`` for images of
    ``shape = (C, H, W)``. As an :class:`~iconv.layers.InvertibleModule` (and a
    :class:`FlowModel`) it is the bijection of the *joint* input ``[x, u]`` of shape
    ``(C + pad_channels, H, W)`` (:attr:`shape`; :attr:`image_shape` is ``(C, H, W)``):
    ``forward(xu) -> (z, logabsdet)``, ``inverse``, and ``log_prob(xu)`` the exact joint density.
    For images alone:

    * :meth:`log_prob_bound` ``(x)``: :math:`\log p(x, u) - \log\mathcal N(u; 0, I)` for one draw
      :math:`u \sim \mathcal N(0, I)`, an unbiased estimate of a lower bound on :math:`\log p(x)`;
    * :meth:`importance_weighted_log_prob` ``(x, samples=K)``: the IWAE estimate, tighter as K grows;
    * :meth:`bits_per_dim_bound` ``(images)``: bits/dim of ``uint8`` images from the bound, with
      :math:`D = CHW` (only the image's dimensions; the noise's density was subtracted), so it is
      an upper bound on the code length and comparable with an exact flow's bits/dim;
    * :meth:`sample` ``(n, temperature)``: images ``(n, C, H, W)`` (the noise channels dropped).

    ``depth``: an int or one per level (the paper: 3, 2, 2 on CIFAR-10); ``scales=None`` uses as
    many levels (up to 3) as the image allows (each downsampling needs even sides); ``actnorm=True``
    puts an :class:`~iconv.layers.ActNorm` before every conv (not in the paper; off by default).
    :meth:`bits_per_dim` is refused: this model has no exact likelihood of images.
    """

    def __init__(self, shape, *, pad_channels: int = 3, depth=2, scales: int | None = None, kernel_size: int = 3,
                 slope: float = 0.1, alpha: float = 0.05, backend: str = "complex", init_scale: float = 0.1,
                 actnorm: bool = False):
        super().__init__()
        c, h, w = check_image_shape(shape)
        if isinstance(pad_channels, bool) or not isinstance(pad_channels, int) or pad_channels < 1:
            raise ValueError(f"pad_channels must be a positive int (the Gaussian noise channels), got {pad_channels!r}")
        possible = halvings(h, w) + 1  # levels: one more than the downsamplings
        scales, depths = level_depths(depth, scales, possible, (h, w))
        if not isinstance(actnorm, bool):
            raise ValueError(f"actnorm must be True or False, got {actnorm!r}")
        self.image_shape = (c, h, w)
        self.pad_channels = pad_channels
        joint = c + pad_channels

        def conv(channels, k=kernel_size):
            layer = InvertibleConv2d(channels, k, True, backend, init_scale)
            return [ActNorm(channels), layer] if actnorm else [layer]

        levels, factor_out, channels = [], [], joint
        for i, d in enumerate(depths):
            layers = [layer for _ in range(d) for layer in (*conv(channels), SneakyReLU(slope))]
            if i < scales - 1:  # NN downsample, 1x1 conv, factor out half
                layers += [NNDownsample(), *conv(4 * channels, 1)]
                factor_out.append(2 * channels)
                channels *= 2
            else:
                layers += conv(channels)
            levels.append(InvertibleSequential(*layers))
        identity = InvertibleSequential
        self.net = InvertibleSequential(
            # [x, u] -> [u, x]: an identity level that sets x aside, then an identity on u (MultiScale packs
            # the last level's output first); then [u, x] -> [logit(x), u] the same way with the logit on x.
            MultiScale([identity(), identity()], [c], in_channels=joint),
            MultiScale([identity(), InvertibleSequential(LogitTransform(alpha))], [pad_channels], in_channels=joint),
            MultiScale(levels, factor_out, in_channels=joint),
        )
        self._finish((joint, h, w), {})
        self.arguments = dict(pad_channels=pad_channels, depth=depths, scales=scales, kernel_size=kernel_size,
                              slope=slope, alpha=alpha, backend=backend, init_scale=init_scale, actnorm=actnorm,
                              shape=[c, h, w])

    # ------------------------------------------------------------------ the joint map

    @property
    def preprocess(self) -> LogitTransform:
        """The logit applied to the image channels (inside the second container)."""
        return self.net[1].levels[1][0]

    @property
    def image_dim(self) -> int:
        """:math:`D = CHW`, the dimensions of an image (bits/dim divide by this, not by :attr:`dim`)."""
        c, h, w = self.image_shape
        return c * h * w

    def check_input(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise unless ``x`` is a finite joint batch ``(B, C + P, H, W)`` whose image channels lie in [0, 1]."""
        check_image(x, name)
        if tuple(x.shape[1:]) != tuple(self.shape):
            want = ", ".join(map(str, self.shape))
            raise ValueError(f"{name} has shape {tuple(x.shape)}; PaperFlow's joint map takes (B, {want}): the "
                             f"{self.image_shape[0]} image channels, then {self.pad_channels} noise channels "
                             "(use log_prob_bound(x) for images alone)")
        self.check_images(x[:, :self.image_shape[0]], name + "'s image channels")

    def check_images(self, x: torch.Tensor, name: str = "x") -> None:
        """Raise unless ``x`` is a finite float batch ``(B, C, H, W)`` of images in [0, 1]."""
        check_image(x, name)
        if tuple(x.shape[1:]) != tuple(self.image_shape):
            want = ", ".join(map(str, self.image_shape))
            raise ValueError(f"{name} has shape {tuple(x.shape)}; this flow's images have shape (B, {want})")
        lo, hi = (float(v) for v in x.detach().aminmax()) if x.numel() else (0.0, 1.0)
        margin = self.preprocess.margin
        if lo <= -margin or hi >= 1 + margin:
            raise ValueError(f"{name} must hold dequantized pixel values in [0, 1], found values in "
                             f"[{lo:.3g}, {hi:.3g}]; use iconv.data.dequantize(images) on uint8 images")

    def pad(self, x: torch.Tensor, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``([x, u], u)`` with :math:`u \\sim \\mathcal N(0, I)` of shape ``(B, P, H, W)``."""
        _, h, w = self.image_shape
        u = torch.randn(x.shape[0], self.pad_channels, h, w, generator=generator, dtype=x.dtype, device=x.device)
        return torch.cat([x, u], 1), u

    # ------------------------------------------------------------------ bounds

    def log_prob_bound(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        r""":math:`\log p(x, u) - \log\mathcal N(u; 0, I)` for one :math:`u \sim \mathcal N(0, I)`: ``(B,)`` nats.

        ``x``: dequantized images ``(B, C, H, W)`` in [0, 1]. In expectation over :math:`u` this is
        the ELBO with :math:`q(u|x) = \mathcal N(0, I)`, a lower bound on :math:`\log p(x)`.
        """
        self.check_images(x)
        joint, u = self.pad(x, generator)
        return self.log_prob(joint) - standard_normal_log_prob(u)

    def importance_weighted_log_prob(self, x: torch.Tensor, samples: int = 16,
                                     generator: torch.Generator | None = None, chunk: int = 4096) -> torch.Tensor:
        r""":math:`\log \frac1K\sum_k \exp(\log p(x, u_k) - \log\mathcal N(u_k))`, ``K`` = ``samples``: ``(B,)``.

        The IWAE estimate: ``samples=1`` is :meth:`log_prob_bound`; its expectation increases with
        :math:`K` towards :math:`\log p(x)`. Computed with ``logsumexp``; at most ``chunk`` joint
        samples per forward pass.
        """
        if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
            raise ValueError(f"samples must be a positive int (the number of noise draws K), got {samples!r}")
        self.check_images(x)
        b = x.shape[0]
        repeated = x.repeat(samples, *([1] * (x.dim() - 1)))  # (K*B, C, H, W): draw k of image i at k*B + i
        per = max(1, chunk)
        weights = torch.cat([self.log_prob_bound(part, generator) for part in repeated.split(per)]) if b else \
            x.new_zeros(0)
        return torch.logsumexp(weights.reshape(samples, b), 0) - math.log(samples)

    def bits_per_dim_bound(self, images: torch.Tensor, generator: torch.Generator | None = None,
                           samples: int = 1) -> torch.Tensor:
        """Bits/dim of ``uint8`` images ``(B, C, H, W)`` from the bound (``samples`` > 1: the IW estimate): ``(B,)``.

        One uniform dequantization and ``samples`` noise draws per image, both from ``generator``;
        :math:`(-\\text{bound} + D\\ln 256)/(D\\ln 2)` with :math:`D = CHW` (the image's dimensions).
        An upper bound (in expectation) on the code length per sub-pixel.
        """
        check_uint8_images(images, self.image_shape)
        x = dequantize(images.to(self._param_device()), generator=generator, dtype=self._param_dtype())
        log_p = self.log_prob_bound(x, generator) if samples == 1 else \
            self.importance_weighted_log_prob(x, samples, generator)
        return nll_to_bits_per_dim(-log_p, self.image_dim)

    def bits_per_dim(self, images, generator=None):
        """Refused: PaperFlow has no exact likelihood of images; use :meth:`bits_per_dim_bound`."""
        raise TypeError("PaperFlow reports a variational bound, not a likelihood: use bits_per_dim_bound(images) "
                        "(or bits_per_dim_bound(images, samples=K) for the importance-weighted estimate)")

    # ------------------------------------------------------------------ sampling and initialisation

    @torch.no_grad()
    def sample(self, n: int, temperature: float = 1.0, generator: torch.Generator | None = None) -> torch.Tensor:
        """``n`` images ``(n, C, H, W)``: the image channels of the joint sample (the noise channels dropped)."""
        return super().sample(n, temperature, generator)[:, :self.image_shape[0]]

    @torch.no_grad()
    def initialize(self, x: torch.Tensor, generator: torch.Generator | None = None) -> "PaperFlow":
        """Data-dependent start of the ActNorm layers (``actnorm=True``) from images ``x`` ``(B, C, H, W)``
        padded with noise from ``generator``; also accepts a joint batch. Returns ``self``."""
        if x.dim() == 4 and x.shape[1] == self.image_shape[0]:
            self.check_images(x)
            x = self.pad(x, generator)[0]
        return super().initialize(x)
