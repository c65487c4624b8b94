"""Invertible 2x2 downsampling: (B, C, H, W) -> (B, 4C, H/2, W/2) and back.

The three replacements for MaxPool2d in Finzi, Izmailov, Maddox, Kirichenko, Wilson,
"Invertible Convolutional Networks" (2019), Table 1: "Checkerboard DS" (:class:`Squeeze`),
"iINN" (:class:`NNDownsample`) and "iAvgPool2d" (:class:`AvgDownsample`).

Each 2x2 block of a channel holds the pixels

    x00 x01
    x10 x11        (x_ij = x[:, :, 2h + i, 2w + j]),

and a layer maps those 4 numbers to 4 numbers. NNDownsample and AvgDownsample put their 4 outputs
in 4 channel groups of C channels each, [g0, g1, g2, g3], so the first C channels are a
downsampled image.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_even_spatial, check_image
from .base import InvertibleModule, at_boundary


def _check_down(x: torch.Tensor) -> None:
    if not at_boundary():
        return
    check_image(x)  # 4-d, floating, finite
    check_even_spatial(x)


def _check_up(y: torch.Tensor) -> None:
    if not at_boundary():
        return
    check_image(y)
    if y.shape[1] % 4:
        raise ValueError(
            f"input to inverse has {y.shape[1]} channels (shape {tuple(y.shape)}); "
            "2x2 invertible downsampling inverts only a channel count divisible by 4"
        )


def _unshuffle(x: torch.Tensor) -> torch.Tensor:
    """``F.pixel_unshuffle(x, 2)``, also for an empty batch (where torch returns its input unchanged)."""
    if x.shape[0]:
        return F.pixel_unshuffle(x, 2)
    b, c, h, w = x.shape
    return x.new_zeros(b, 4 * c, h // 2, w // 2)


def _shuffle(y: torch.Tensor) -> torch.Tensor:
    """``F.pixel_shuffle(y, 2)``, also for an empty batch."""
    if y.shape[0]:
        return F.pixel_shuffle(y, 2)
    b, c, h, w = y.shape
    return y.new_zeros(b, c // 4, 2 * h, 2 * w)


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(B, C, H, W) -> x00, x01, x10, x11, each (B, C, H/2, W/2)."""
    b, c, h, w = x.shape
    return _unshuffle(x).reshape(b, c, 4, h // 2, w // 2).unbind(2)


def _unblocks(x00, x01, x10, x11) -> torch.Tensor:
    """Inverse of :func:`_blocks`: four (B, C, h, w) tensors -> (B, C, 2h, 2w)."""
    b, c, h, w = x00.shape
    return _shuffle(torch.stack([x00, x01, x10, x11], 2).reshape(b, 4 * c, h, w))  # any memory layout


def _zeros(x: torch.Tensor) -> torch.Tensor:
    return x.new_zeros(x.shape[0])  # (B,)


class Downsample2x2(InvertibleModule):
    """Common base of the 2x2 invertible downsamplings: ``(C, H, W) -> (4C, H/2, W/2)``."""

    def output_shape(self, shape):
        c, h, w = shape
        if h % 2 or w % 2:
            raise ValueError(f"2x2 invertible downsampling needs even H and W, got {h}x{w}")
        return 4 * c, h // 2, w // 2


class Squeeze(Downsample2x2):
    """The paper's "checkerboard" downsampling: space-to-depth.

    y[:, 4c + 2i + j, h, w] = x[:, c, 2h + i, 2w + j], exactly ``F.pixel_unshuffle(x, 2)``.
    A permutation of the entries, so log|det J| = 0.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_down(x)
        return _unshuffle(x), _zeros(x)  # (B, 4C, H/2, W/2), (B,)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        _check_up(y)
        return _shuffle(y)  # (B, C, 2h, 2w)


class NNDownsample(Downsample2x2):
    """The paper's "iINN": nearest-neighbour subsample plus the three residual sub-grids.

    Per 2x2 block: (x00, x01, x10, x11) -> (x00, x01 - x00, x10 - x00, x11 - x00), stored as the
    channel groups [g0, g1, g2, g3]; g0 = x[:, :, ::2, ::2] is the nearest-neighbour downsampled
    image. The block map is unit lower triangular (det 1) and the rest is a permutation, so
    log|det J| = 0. Inverse: x00 = g0, x0j = gj + g0.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_down(x)
        x00, x01, x10, x11 = _blocks(x)  # each (B, C, H/2, W/2)
        y = torch.cat([x00, x01 - x00, x10 - x00, x11 - x00], 1)  # (B, 4C, H/2, W/2)
        return y, _zeros(x)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        _check_up(y)
        g0, g1, g2, g3 = y.chunk(4, 1)  # each (B, C, h, w)
        return _unblocks(g0, g1 + g0, g2 + g0, g3 + g0)  # (B, C, 2h, 2w)


class AvgDownsample(Downsample2x2):
    """The paper's "iAvgPool2d": the 2x2 mean plus three residuals.

    Per 2x2 block: (x00, x01, x10, x11) -> (m, x01 - m, x10 - m, x11 - m) with
    m = (x00 + x01 + x10 + x11) / 4, stored as channel groups [g0, g1, g2, g3];
    g0 = F.avg_pool2d(x, 2).

    Log-determinant. The block map is the composition of
      (x00, x01, x10, x11) -> (m, x01, x10, x11): Jacobian rows (1/4, 1/4, 1/4, 1/4), e2, e3, e4,
          upper triangular with diagonal (1/4, 1, 1, 1), det 1/4;
      (m, x01, x10, x11) -> (m, x01 - m, x10 - m, x11 - m): unit lower triangular, det 1.
    So each block contributes log(1/4), and a sample has C (H/2) (W/2) blocks:

        log|det J| = -(C H W / 4) log 4       (the reordering into channels is a permutation).

    Inverse: m = g0, x0j = gj + m, and x00 = 4m - x01 - x10 - x11 = m - (g1 + g2 + g3) (the three
    residuals and x00 - m sum to 0); the second form avoids the 4x scaling of m.
    """

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_down(x)
        b, c, h, w = x.shape
        x00, x01, x10, x11 = _blocks(x)  # each (B, C, H/2, W/2)
        m = (x00 + x01 + x10 + x11) / 4
        y = torch.cat([m, x01 - m, x10 - m, x11 - m], 1)  # (B, 4C, H/2, W/2)
        return y, x.new_full((b,), -(c * h * w / 4) * math.log(4))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        _check_up(y)
        m, g1, g2, g3 = y.chunk(4, 1)  # each (B, C, h, w)
        return _unblocks(m - (g1 + g2 + g3), g1 + m, g2 + m, g3 + m)  # (B, C, 2h, 2w)
