"""SneakyReLU: the smooth, bijective LeakyReLU of Finzi et al. (2019).

Finzi, Izmailov, Maddox, Kirichenko, Wilson, "Invertible Convolutional Networks" (2019),
section "Smooth Bijective Activation Function":

    sigma(x) = (x + alpha (sqrt(1 + x^2) - 1)) / (1 + alpha),    alpha = (1 - s) / (1 + s),

where s in (0, 1) is the slope as x -> -inf (the slope tends to 1 as x -> +inf). sigma is smooth,
strictly increasing, maps R onto R, and has a closed-form inverse.

The textbook formulas lose every digit in float32 for large |x| (sqrt(1 + x^2) - 1 and
x + alpha sqrt(1 + x^2) cancel, x^2 overflows). Below, every branch is rewritten so that it only
adds terms of the same sign, and only forms bounded ratios, so forward, inverse and log-derivative
are accurate to a few ulps over the whole float range we test (|x| up to 1e30 in float32). Notation:

    r = hypot(x, 1) = sqrt(1 + x^2),   c = 1 / (1 + alpha) = (1 + s) / 2,
    1 - alpha^2 = 4 s / (1 + s)^2      (computed this way: no cancellation as s -> 0).
"""
from __future__ import annotations

import math
import numbers

import torch
from torch import nn

from ..checks import check_finite
from .base import InvertibleModule, at_boundary


def _constants(slope: float) -> tuple[float, float, float]:
    """Validate ``slope`` and return (alpha, c = 1/(1+alpha), 1 - alpha^2), all in float64."""
    if isinstance(slope, bool) or not isinstance(slope, numbers.Real):
        raise TypeError(f"slope must be a real number in (0, 1), got {slope!r} of type {type(slope).__name__}")
    s = float(slope)
    if not 0.0 < s < 1.0:  # also rejects NaN
        raise ValueError(f"slope must lie strictly between 0 and 1 (the slope of SneakyReLU as x -> -inf), got {slope!r}")
    return (1.0 - s) / (1.0 + s), (1.0 + s) / 2.0, 4.0 * s / (1.0 + s) ** 2


def _check_tensor(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32 or float64), got dtype {x.dtype}")
    check_finite(x, name)


def sneaky_relu(x: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
    """sigma(x) = (x + alpha (sqrt(1 + x^2) - 1)) / (1 + alpha), elementwise.

    With sqrt(1 + x^2) - 1 = x^2 / (r + 1) and v = x / (r + 1) in (-1, 1):

        sigma(x) = c x (1 + alpha v).

    For x >= 0 both terms of 1 + alpha v are positive. For x < 0 they cancel (badly when s is
    small), so use 1 - v^2 = 2 / (r + 1) to write 1 + alpha v = (1 - alpha^2 v^2) / (1 - alpha v):

        sigma(x) = c x ((1 - alpha^2) + 2 alpha^2 / (r + 1)) / (1 - alpha v)      (x < 0),

    a sum and a quotient of positive numbers. Each branch is evaluated on x clamped into its own
    half-line so that the branch torch.where discards stays finite (no NaN gradients).
    """
    alpha, c, one_m_a2 = _constants(slope)
    _check_tensor(x, "x")
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    vp = xp / (torch.hypot(xp, torch.ones_like(xp)) + 1)
    rn = torch.hypot(xn, torch.ones_like(xn))
    vn = xn / (rn + 1)
    pos = c * xp * (1 + alpha * vp)
    neg = c * xn * ((one_m_a2 + 2 * alpha**2 / (rn + 1)) / (1 - alpha * vn))
    return torch.where(x >= 0, pos, neg)


def sneaky_relu_inverse(y: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
    """Closed-form inverse of :func:`sneaky_relu`, elementwise.

    Let z = (1 + alpha) y + alpha = x + alpha r. Squaring z - x = alpha r gives the quadratic
    (1 - alpha^2) x^2 - 2 z x + (z^2 - alpha^2) = 0, whose root with x <= z (needed because
    z - x = alpha r >= 0) is

        x = (z - alpha R) / (1 - alpha^2),    R = hypot(z, sqrt(1 - alpha^2)).

    That is cancellation-free for z < 0. For z >= 0 multiply by (z + alpha R) / (z + alpha R) and
    use z^2 - alpha^2 R^2 = (1 - alpha^2)(z^2 - alpha^2):

        x = (z - alpha)(z + alpha) / (z + alpha R),   with z - alpha = (1 + alpha) y taken from y
                                                      directly (z - alpha would cancel for small y).
    z >= 0 means y >= -alpha c; each branch sees its input clamped to its own side.
    """
    alpha, c, one_m_a2 = _constants(slope)
    _check_tensor(y, "y")
    sq = math.sqrt(one_m_a2)  # sqrt(1 - alpha^2) = 2 sqrt(s) / (1 + s)
    z = y / c + alpha
    # z >= 0 branch
    yp = y.clamp(min=-alpha * c)
    zp = (yp / c + alpha).clamp(min=0)
    pos = (yp / c) * ((zp + alpha) / (zp + alpha * torch.hypot(zp, torch.full_like(zp, sq))))
    # z < 0 branch
    zn = z.clamp(max=0)
    neg = (zn - alpha * torch.hypot(zn, torch.full_like(zn, sq))) / one_m_a2
    return torch.where(z >= 0, pos, neg)


def sneaky_relu_log_derivative(x: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
    """log sigma'(x) = log(1 + alpha x / r) - log(1 + alpha), elementwise; r = sqrt(1 + x^2).

    With u = x / r in (-1, 1), sigma'(x) = c (1 + alpha u), strictly between s and 1. Two
    cancellation-free forms of it:

        sigma'(x) - 1 = -alpha c (1 - u),   1 - u = 1 / (r (r + x)) for x >= 0, 1 + |x| / r for x < 0;
        sigma'(x)     = c ((1 - alpha^2) + (alpha / r)^2) / (1 - alpha u)                  (x < 0),

    the second being (1 + (1 - alpha^2) x^2) / (r (r - alpha x)) divided through by r^2
    (no x^2 overflow). We return log1p(sigma' - 1) where sigma' >= 1/2 (always the case for x >= 0,
    and accurate even where log sigma' ~ -1/x^2) and log(sigma') where sigma' < 1/2 (x << 0 with a
    small slope, where log1p would amplify rounding); both are then within a few ulps.
    """
    alpha, c, one_m_a2 = _constants(slope)
    _check_tensor(x, "x")
    xp, xn = x.clamp(min=0), x.clamp(max=0)
    rp = torch.hypot(xp, torch.ones_like(xp))
    rn = torch.hypot(xn, torch.ones_like(xn))
    w = -alpha * c * torch.where(x >= 0, 1 / rp / (rp + xp), 1 - xn / rn)  # sigma'(x) - 1
    d = c * (one_m_a2 + (alpha / rn) ** 2) / (1 - alpha * (xn / rn))  # sigma'(x) for x < 0; c for x >= 0
    return torch.where(d < 0.5, torch.log(d), torch.log1p(w))


class SneakyReLUWithLogDerivative(torch.autograd.Function):
    r"""``(sigma(x), log sigma'(x))`` with hand-written gradients; ``SneakyReLUWithLogDerivative.apply(x, slope)`` (values from the accurate formulas above).

    Autograd through the cancellation-free formulas of :func:`iconv.sneaky_relu` records some
    twenty elementwise ops per layer; the analytic derivatives need three. With
    :math:`r = \sqrt{1 + x^2}`, :math:`\sigma'(x) = c(1 + \alpha x / r)` and

    .. math:: \frac{d}{dx}\log\sigma'(x) = \frac{\sigma''(x)}{\sigma'(x)}
              = \frac{\alpha}{r^2 (r + \alpha x)}
              = \frac{\alpha (1 - \alpha u)}{r^3\,(r^{-2} + (1 - \alpha^2) u^2)}, \qquad u = x / r,

    the last form free of cancellation and overflow (it uses
    :math:`(r + \alpha x)(r - \alpha x) = 1 + (1 - \alpha^2)x^2`, divided by :math:`r^2`).
    """

    @staticmethod
    def forward(ctx, x, slope):
        y = sneaky_relu(x, slope)
        log_derivative = sneaky_relu_log_derivative(x, slope)
        ctx.save_for_backward(x, log_derivative)
        ctx.slope = slope
        return y, log_derivative

    @staticmethod
    def backward(ctx, grad_y, grad_log_derivative):
        x, log_derivative = ctx.saved_tensors
        alpha, _, one_m_a2 = _constants(ctx.slope)
        grad_x = grad_y * log_derivative.exp()
        r = torch.hypot(x, torch.ones_like(x))  # no overflow of x^2
        u = x / r  # in (-1, 1); (r + alpha x)(r - alpha x) / r^2 = 1/r^2 + (1 - alpha^2) u^2
        second = alpha * (1 - alpha * u) / ((1 / r) ** 2 + one_m_a2 * u * u) / r / r / r  # ~ 1/|x|^3
        return grad_x + grad_log_derivative * second, None


class SneakyReLU(InvertibleModule):
    """Elementwise SneakyReLU as an invertible layer (Finzi et al., 2019).

    forward(x) -> (sigma(x), logabsdet) with logabsdet = sum over all non-batch entries of
    log sigma'(x), shape (B,) (the Jacobian is diagonal); inverse(y) -> sigma^{-1}(y).
    Works on any (B, ...) tensor, typically (B, C, H, W).
    """

    def __init__(self, slope: float = 0.1):
        super().__init__()
        _constants(slope)  # validate now, not at the first call
        self.slope = float(slope)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if at_boundary():
            _check_batched(x, "input")
            _check_tensor(x, "input")
        y, log_derivative = SneakyReLUWithLogDerivative.apply(x, self.slope)  # (B, ...) twice
        return y, log_derivative.reshape(x.shape[0], -1).sum(1)  # (B,)

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if at_boundary():
            _check_batched(x, "input")
            _check_tensor(x, "input")
        return SneakyReLUWithLogDerivative.apply(x, self.slope)[0]

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        _check_batched(y, "input")
        return sneaky_relu_inverse(y, self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


def _check_batched(x: torch.Tensor, name: str) -> None:
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        raise ValueError(f"{name} must have a leading batch dimension (B, ...), got a 0-dimensional tensor")
