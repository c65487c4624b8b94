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
from collections import OrderedDict
from typing import Iterable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..checks import check_image

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
    r"""Base class of every invertible layer and model: ``forward(x) -> (y, logabsdet)``, ``inverse(y) -> x``.

    A subclass implements a bijection :math:`f` acting on each sample of a batch separately:
    ``forward(x)`` returns :math:`y_b = f(x_b)` and :math:`\log|\det Df(x_b)|` with shape ``(B,)``
    (the Jacobian of the flattened sample, so a sample's :math:`D` numbers map to :math:`D`
    numbers), ``inverse(y)`` returns :math:`f^{-1}(y_b)`. Both keep the input's dtype and device.
    It overrides ``output_shape`` when it reshapes, and ``transform`` when the log-determinant
    costs extra work. Validation of the caller's input is done only :func:`at_boundary`.
    tests/test_protocol.py checks every subclass the package exports against this contract.
    """

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
    r"""Composition :math:`f = f_L \circ \dots \circ f_1` of invertible modules.

    * ``forward``: :math:`x_0 = x`, :math:`x_i = f_i(x_{i-1})`, and by the chain rule
      :math:`\log|\det Df(x)| = \sum_i \log|\det Df_i(x_{i-1})|`;
    * ``inverse``: :math:`x = f_1^{-1}(\dots f_L^{-1}(y))`, the layers backwards;
    * ``output_shape``: the layers' ``output_shape`` composed.

    Validation: the layer that meets the caller's input (the first in ``forward``, the last in
    ``inverse``) runs at the caller's level, so it checks its input when the caller is the user;
    the others run :func:`inside`. An empty sequence is the identity.
    """

    def __init__(self, *layers: InvertibleModule):
        # One OrderedDict {name: layer} is accepted too, as nn.Sequential does (slicing builds one).
        named = layers[0] if len(layers) == 1 and isinstance(layers[0], OrderedDict) else None
        for i, layer in enumerate(named.values() if named is not None else layers):
            if not isinstance(layer, InvertibleModule):
                raise TypeError(f"layer {i} of InvertibleSequential must be an iconv InvertibleModule, "
                                f"got {type(layer).__name__}")
        nn.Sequential.__init__(self, *layers)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(self) == 0:
            return x, x.new_zeros(x.shape[0])
        first, *rest = self
        x, total = first(x)  # validates x when the caller is the user
        with inside():
            for layer in rest:
                x, logabsdet = layer(x)
                total = total + logabsdet
        return x, total

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if len(self) == 0:
            return y
        *rest, last = self
        y = last.inverse(y)  # validates y when the caller is the user
        with inside():
            for layer in reversed(rest):
                y = layer.inverse(y)
        return y

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if len(self) == 0:
            return x
        first, *rest = self
        x = first.transform(x)
        with inside():
            for layer in rest:
                x = layer.transform(x)
        return x

    def output_shape(self, shape: Sequence[int]) -> Shape:
        shape = tuple(shape)
        for layer in self:
            shape = layer.output_shape(shape)
        return tuple(shape)


class MultiScale(InvertibleModule):
    r"""Levels with factor-out between them (the multi-scale architecture of RealNVP and Glow).

    ``MultiScale(levels, factor_out, in_channels)`` with ``L`` levels :math:`g_0, \dots, g_{L-1}`
    (each an :class:`InvertibleModule`, usually an :class:`InvertibleSequential` that starts with
    a 2x2 downsampling) and ``L - 1`` channel counts :math:`n_i` = ``factor_out[i]``:

    .. math::
        h_0 = g_0(x), \qquad
        (z_i, r_i) = (h_i[:n_i],\ h_i[n_i:]), \qquad
        h_{i+1} = g_{i+1}(r_i) \quad (i < L - 1),

    i.e. after level :math:`i` the *first* :math:`n_i` channels :math:`z_i` are set aside unchanged
    and the *last* ones go on. The output is one image,

    .. math:: y = \big[\, h_{L-1},\ S_{L-2}(z_{L-2}),\ \dots,\ S_0(z_0) \,\big]
              \quad\text{(channels; latest part first)},

    where :math:`S_i` is space-to-depth (``F.pixel_unshuffle``) by the ratio of part :math:`i`'s side
    to the last level's, so every part has the last level's ``h x w``. Setting aside, concatenating
    and :math:`S_i` permute entries, so

    .. math:: \log|\det Dy(x)| = \sum_{i=0}^{L-1} \log|\det Dg_i|,

    and the inverse unpacks :math:`y`, then runs :math:`r_{i-1} = g_i^{-1}(h_i)`,
    :math:`h_{i-1} = [z_{i-1}, r_{i-1}]` from the last level down to :math:`x = g_0^{-1}(h_0)`.

    Requirements, checked when the container is built: at least one level, one positive count per
    split, each smaller than the channels the level outputs. Every part's side must be the last
    level's times the same integer for height and width (:meth:`output_shape` says which part
    cannot be packed otherwise); the ratios are fixed at construction (from the levels'
    ``output_shape`` on a large probe image), so a level's downsampling factor must not depend
    on the image size.
    """

    def __init__(self, levels: Iterable[InvertibleModule], factor_out: Sequence[int], in_channels: int):
        super().__init__()
        self.in_channels = int(in_channels)
        if self.in_channels < 1:
            raise ValueError(f"in_channels of MultiScale must be positive, got {in_channels!r}")
        self.levels = nn.ModuleList(levels)
        if len(self.levels) == 0:
            raise ValueError("MultiScale needs at least one level")
        for i, level in enumerate(self.levels):
            if not isinstance(level, InvertibleModule):
                raise TypeError(f"level {i} of MultiScale must be an iconv InvertibleModule, got {type(level).__name__}")
        self.factor_out = [int(n) for n in factor_out]
        if len(self.factor_out) != len(self.levels) - 1:
            raise ValueError(f"factor_out needs one channel count per split between the {len(self.levels)} levels "
                             f"({len(self.levels) - 1}), got {list(factor_out)!r}")
        if any(n < 1 for n in self.factor_out):
            raise ValueError(f"factor_out must be positive channel counts, got {list(factor_out)!r}")
        # Each part's side over the last level's, and the packed channel counts, from a large probe image.
        probe = 1 << 12
        parts, (last_channels, h, _), _ = self._plan((self.in_channels, probe, probe))
        self._scales = [ph // h for _, ph, _ in parts]
        self.out_channels = self.output_shape((self.in_channels, probe, probe))[0]
        self._last_channels = last_channels

    def level_shapes(self, shape: Sequence[int]) -> list[Shape]:
        """The shape of one sample entering each level, for an input sample of ``shape``."""
        return self._plan(shape)[2]

    def _plan(self, shape: Sequence[int]) -> tuple[list[Shape], Shape, list[Shape]]:
        """Shapes of the set-aside parts, of the last level's output and of each level's input."""
        parts, inputs = [], []
        shape = tuple(shape)
        for i, level in enumerate(self.levels):
            inputs.append(shape)
            shape = level.output_shape(shape)
            if i < len(self.factor_out):
                n = self.factor_out[i]
                if n >= shape[0]:
                    raise ValueError(f"level {i} of MultiScale outputs {shape[0]} channels; it cannot set aside "
                                     f"{n} and keep any")
                parts.append((n, *shape[1:]))
                shape = (shape[0] - n, *shape[1:])
        return parts, shape, inputs

    def output_shape(self, shape: Sequence[int]) -> Shape:
        if len(shape) != 3 or int(shape[0]) != self.in_channels:
            raise ValueError(f"MultiScale takes samples of shape ({self.in_channels}, H, W), got {tuple(shape)}")
        parts, (c, h, w), _ = self._plan(shape)
        for i, (n, ph, pw) in enumerate(parts):
            if ph % h or pw % w or ph // h != pw // w:
                raise ValueError(f"the part set aside after level {i} is {ph}x{pw}; it cannot be packed at the last "
                                 f"level's {h}x{w} (its sides must be the same multiple of the last level's)")
            c += n * (ph // h) ** 2
        return c, h, w

    def _check_input(self, x: torch.Tensor) -> None:
        check_image(x, "x", channels=self.in_channels)
        self.output_shape(x.shape[1:])  # a clear error when the sizes do not fit the levels

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if at_boundary():
            self._check_input(x)
        total = x.new_zeros(x.shape[0])
        aside = []
        with inside():
            for i, level in enumerate(self.levels):
                x, logabsdet = level(x)
                total = total + logabsdet
                x = self._set_aside(i, x, aside)
        return self._pack(x, aside), total

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if at_boundary():
            self._check_input(x)
        aside = []
        with inside():
            for i, level in enumerate(self.levels):
                x = self._set_aside(i, level.transform(x), aside)
        return self._pack(x, aside)

    def _set_aside(self, i: int, x: torch.Tensor, aside: list[torch.Tensor]) -> torch.Tensor:
        """After level ``i`` (not the last): append the first ``factor_out[i]`` channels to ``aside``, return the rest."""
        if i < len(self.factor_out):
            aside.append(x[:, : self.factor_out[i]])
            x = x[:, self.factor_out[i]:]
        return x

    def _pack(self, x: torch.Tensor, aside: list[torch.Tensor]) -> torch.Tensor:
        """``[x, S(z_{L-2}), ..., S(z_0)]`` along channels; ``S`` = space-to-depth to ``x``'s size."""
        packed = [F.pixel_unshuffle(z, s) for z, s in zip(aside, self._scales)]
        return torch.cat([x] + packed[::-1], 1)

    def _unpack(self, y: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Inverse of :meth:`_pack`: the last level's output and the parts, in level order."""
        sizes = [n * s * s for n, s in zip(self.factor_out, self._scales)]  # packed channels of each part
        last, *packed = torch.split(y, [self._last_channels] + sizes[::-1], 1)
        aside = [F.pixel_shuffle(p, s) for p, s in zip(packed[::-1], self._scales)]
        return last, aside

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        if at_boundary():
            check_image(y, "y", channels=self.out_channels)
        x, aside = self._unpack(y)
        with inside():
            for i in reversed(range(len(self.levels))):
                if i < len(self.factor_out):
                    x = torch.cat([aside[i], x], 1)
                x = self.levels[i].inverse(x)
        return x

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, factor_out={self.factor_out}"


class Forward(nn.Module):
    """Use an invertible module as an ordinary one: ``Forward(f)(x) = f.transform(x)``."""

    def __init__(self, module: InvertibleModule):
        super().__init__()
        self.module = module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.module.transform(x)
