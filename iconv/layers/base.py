r"""The one contract every invertible layer and model of iconv follows, and its two containers.

An invertible module :math:`f` maps a batch ``x`` of shape ``(B, ...)`` to

* ``forward(x) -> (y, logabsdet)``: :math:`y = f(x)` and :math:`\log|\det Df(x_b)|` for every
  sample, shape ``(B,)``;
* ``inverse(y) -> x``: :math:`f^{-1}(y)`, the same signature in every class (options are
  constructor arguments or attributes, never extra ``inverse`` parameters);
* ``transform(x) -> y``: :math:`f(x)` alone, for callers that do not need the log-determinant
  (a classifier); layers whose log-determinant costs extra work override it;
* ``output_shape(shape) -> shape``: the shape ``(C, H, W)`` of one output sample for one input
  sample of ``shape``, without running the layer (the identity unless the layer reshapes).

Two containers build every model of the package:

* :class:`InvertibleSequential`: :math:`f = f_L \circ \dots \circ f_1`; log-determinants add
  (chain rule: :math:`\det D(f_2 \circ f_1) = \det Df_2 \cdot \det Df_1`), the inverse runs the
  layers backwards.
* :class:`MultiScale`: the factor-out architecture of RealNVP and Glow. After each level but the
  last, the first ``factor_out[i]`` channels are set aside unchanged (identity: no log-determinant)
  and the remaining channels go on to the next level, which usually starts with a 2x2
  downsampling. The set-aside parts are packed with the last level's output into one image-shaped
  tensor by space-to-depth (a permutation), so the output is again ``(B, C', h, w)``.
"""
from __future__ import annotations

import contextlib
import threading
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["InvertibleModule", "InvertibleSequential", "MultiScale", "Forward", "at_boundary", "inside"]

Shape = tuple[int, int, int]

_calls = threading.local()


def at_boundary() -> bool:
    """True when the caller is the outermost iconv module: the place where inputs are validated.

    A model checks its input once (shape, dtype, finiteness) and runs its layers :func:`inside`, so
    the layers skip their own checks: no host synchronisation per layer and training step.
    """
    return getattr(_calls, "depth", 0) == 0


@contextlib.contextmanager
def inside():
    """Run the enclosed calls as internal ones (inputs already validated by the caller)."""
    _calls.depth = getattr(_calls, "depth", 0) + 1
    try:
        yield
    finally:
        _calls.depth -= 1


class InvertibleModule(nn.Module):
    """Base class of every invertible layer and model: ``forward(x) -> (y, logabsdet (B,))``, ``inverse(y) -> x``."""

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement forward(x) -> (y, logabsdet)")

    def inverse(self, y: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError(f"{type(self).__name__} must implement inverse(y) -> x")

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        """``f(x)`` without the log-determinant."""
        return self(x)[0]

    def output_shape(self, shape: Sequence[int]) -> Shape:
        """Shape of one output sample for one input sample of ``shape`` (the identity by default)."""
        return tuple(int(s) for s in shape)


class InvertibleSequential(InvertibleModule, nn.Sequential):
    """Composition ``f_L o ... o f_1`` of invertible modules: log-determinants add, the inverse runs backwards."""

    def __init__(self, *layers: InvertibleModule):
        for i, layer in enumerate(layers):
            if not isinstance(layer, InvertibleModule):
                raise TypeError(f"layer {i} of InvertibleSequential must be an iconv InvertibleModule, "
                                f"got {type(layer).__name__}")
        nn.Sequential.__init__(self, *layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = x.new_zeros(x.shape[0])
        with inside():
            for layer in self:
                x, logabsdet = layer(x)
                total = total + logabsdet
        return x, total

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        with inside():
            for layer in reversed(self):
                y = layer.inverse(y)
        return y

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        with inside():
            for layer in self:
                x = layer.transform(x)
        return x

    def output_shape(self, shape: Sequence[int]) -> Shape:
        shape = tuple(shape)
        for layer in self:
            shape = layer.output_shape(shape)
        return tuple(shape)


class MultiScale(InvertibleModule):
    r"""Levels with factor-out between them (RealNVP's multi-scale architecture).

    ``MultiScale(levels, factor_out, in_channels)``: ``levels[0]`` runs on the input; after level ``i < L-1``
    the first ``factor_out[i]`` channels are set aside and the rest enter ``levels[i + 1]``. The
    output is ``[levels[-1] output, parts set aside, latest first]`` concatenated along channels,
    each set-aside part brought to the last level's spatial size by space-to-depth
    (``F.pixel_unshuffle``), so it needs every level after a split to shrink the image by a
    power of two. Setting aside and packing are permutations: the log-determinant is the sum of
    the levels'.
    """

    def __init__(self, levels: Iterable[InvertibleModule], factor_out: Sequence[int], in_channels: int):
        super().__init__()
        self.in_channels = int(in_channels)
        self.levels = nn.ModuleList(levels)
        for i, level in enumerate(self.levels):
            if not isinstance(level, InvertibleModule):
                raise TypeError(f"level {i} of MultiScale must be an iconv InvertibleModule, got {type(level).__name__}")
        self.factor_out = [int(n) for n in factor_out]
        if len(self.factor_out) != len(self.levels) - 1:
            raise ValueError(f"factor_out needs one channel count per split ({len(self.levels) - 1}), "
                             f"got {list(factor_out)!r}")
        if any(n < 1 for n in self.factor_out):
            raise ValueError(f"factor_out must be positive channel counts, got {list(factor_out)!r}")
        # Each part's side length over the last level's, from the static plan on a large probe image.
        probe = 1 << 12
        parts, (_, h, _) = self._plan((self.in_channels, probe, probe))
        self._scales = [ph // h for _, ph, _ in parts]

    def _plan(self, shape: Sequence[int]) -> tuple[list[Shape], Shape]:
        """Shapes of the set-aside parts and of the last level's output, for an input of ``shape``."""
        parts = []
        shape = tuple(shape)
        for i, level in enumerate(self.levels):
            shape = level.output_shape(shape)
            if i < len(self.factor_out):
                n = self.factor_out[i]
                if n >= shape[0]:
                    raise ValueError(f"level {i} of MultiScale outputs {shape[0]} channels; it cannot set aside "
                                     f"{n} and keep any")
                parts.append((n, *shape[1:]))
                shape = (shape[0] - n, *shape[1:])
        return parts, shape

    def output_shape(self, shape: Sequence[int]) -> Shape:
        parts, (c, h, w) = self._plan(shape)
        for n, ph, pw in parts:
            if ph % h or pw % w or ph // h != pw // w:
                raise ValueError(f"a part set aside at {ph}x{pw} cannot be packed at the last level's {h}x{w}")
            c += n * (ph // h) ** 2
        return c, h, w

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        total = x.new_zeros(x.shape[0])
        aside = []
        with inside():
            for i, level in enumerate(self.levels):
                x, logabsdet = level(x)
                total = total + logabsdet
                x = self._set_aside(i, x, aside)
        return self._pack(x, aside), total

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        aside = []
        with inside():
            for i, level in enumerate(self.levels):
                x = self._set_aside(i, level.transform(x), aside)
        return self._pack(x, aside)

    def _set_aside(self, i: int, x: torch.Tensor, aside: list) -> torch.Tensor:
        if i < len(self.factor_out):
            aside.append(x[:, : self.factor_out[i]])
            x = x[:, self.factor_out[i]:]
        return x

    def _pack(self, x: torch.Tensor, aside: list[torch.Tensor]) -> torch.Tensor:
        h = x.shape[-2]
        return torch.cat([x] + [F.pixel_unshuffle(z, z.shape[-2] // h) for z in reversed(aside)], 1)

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        sizes = [n * s * s for n, s in zip(self.factor_out, self._scales)]  # packed channels of each part
        pieces = torch.split(y, [y.shape[1] - sum(sizes)] + sizes[::-1], 1)
        x = pieces[0]
        aside = [F.pixel_shuffle(p, s) for p, s in zip(pieces[1:], self._scales[::-1])][::-1]
        with inside():
            for i in reversed(range(len(self.levels))):
                if i < len(self.factor_out):
                    x = torch.cat([aside[i], x], 1)
                x = self.levels[i].inverse(x)
        return x


class Forward(nn.Module):
    """Use an invertible module as an ordinary one: ``Forward(f)(x) = f.transform(x)``."""

    def __init__(self, module: InvertibleModule):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.transform(x)
