r"""SneakyReLU: the smooth, bijective LeakyReLU of Finzi et al. (2019).

Finzi, Izmailov, Maddox, Kirichenko, Wilson, "Invertible Convolutional Networks" (2019),
section "Smooth Bijective Activation Function":

    sigma(x) = (x + alpha (sqrt(1 + x^2) - 1)) / (1 + alpha),    alpha = (1 - s) / (1 + s),

where s in (0, 1) is the slope as x -> -inf (the slope tends to 1 as x -> +inf). sigma is smooth,
strictly increasing, maps R onto R, and has a closed-form inverse.

Accuracy. The textbook formulas lose every digit in float32 for large |x| (sqrt(1 + x^2) - 1 and
x + alpha sqrt(1 + x^2) cancel, x^2 overflows). Below, every quantity is written so that it only
adds terms of the same sign (or subtracts a term at most half as large) and only forms bounded
ratios, so forward, inverse and log-derivative are within a few ulps of the exact values over the
whole float range (tested against mpmath for |x| up to 1e30 in float32; measured at most 3.1
ulps). Notation:

    a = |x|,   r = hypot(x, 1) = sqrt(1 + x^2),   i = 1 / (r + a)   (so r - a = i),
    c = 1 / (1 + alpha) = (1 + s) / 2,   h = alpha c = (1 - s) / 2,   k = h sign(x),
    B = 1 - a / (r + 1) = (1 + i) / (r + 1),   D = 1 - a / r = i / r,   w = a / r,

all non-negative and free of cancellation. With base = (k + h) + s (1 for x > 0, exactly s for
x < 0, c at x = 0) and p = k + h:

    sigma(x)       = x (base - k B)              (x (1 - h B) for x > 0, x (s + h B) for x < 0),
    sigma'(x)      = base - k D                  (= c (1 + alpha x / r)),
    sigma'(x) - 1  = -(p D + (2h - p)(1 + w))/2  (-h D for x > 0, -h (1 + w) for x < 0),

so one pass over x (one ``hypot``, one ``log1p``, a dozen multiply-adds, no ``where``) gives
sigma, sigma' and log sigma' together; :class:`SneakyReLU` uses that fused pass. The
log-derivative is ``log1p(sigma' - 1)`` where sigma' >= 1/2 (accurate down to
log sigma' ~ -1e-61) and ``log(sigma')`` where sigma' < 1/2 (x << 0 with a slope below 1/2, where
log1p would amplify the rounding of sigma' - 1).

Speed. A ConvFlow training step spent 29% of its time in this activation and its log-derivative
(two clamp-split formulas with four ``hypot``, three ``where`` and some fifty small ops per
layer, every Python-float constant converted at every op). The fused pass does about a third of
the sweeps with no ``where``, keeps constants as cached 0-dim tensors and works in place; see
the notes above ``_shared`` for the measured costs of the individual ops.

Derivatives. Every public function is a :class:`torch.autograd.Function` with the analytic
derivative, so no gradient depends on how a torch release differentiates ``clamp``, ``abs`` or
``where`` at their edges (torch 2.14 changed ``clamp``'s gradient at its bound from 1 to 0, which
made autograd through the earlier clamp-split formulas return 0 at x = 0 instead of c). With
u = x / r and q = 1 / r:

    sigma'(x)            = c (1 + alpha u),
    sigma''(x)           = h q^3,
    (log sigma')'(x)     = h q^3 / sigma'(x),
    (sigma^-1)'(y)       = 1 / sigma'(sigma^-1(y)).

A plain backward multiplies by values the forward pass saved. When a graph of the gradient is
asked for (``create_graph=True``, e.g. for second derivatives), the backward instead evaluates
sigma' with :func:`sneaky_relu_derivative`, a smooth, differentiable formula:
``torch.where(x >= 0, c (1 + alpha u), c ((1 - alpha^2) + alpha^2 q^2) / (1 - alpha u))``, two
expressions of the *same* analytic function, both finite for every x, so the branch taken at
x = 0 (or anywhere) has the true derivative and ``where`` only routes it. Hence every function is
also twice differentiable (``gradgradcheck``), including at the branch points.
"""
from __future__ import annotations

import functools
import numbers
from typing import NamedTuple

import torch

from ..checks import check_finite
from .base import InvertibleModule, at_boundary

__all__ = ["SneakyReLU", "SneakyReLUWithLogDerivative", "sneaky_relu", "sneaky_relu_derivative",
           "sneaky_relu_inverse", "sneaky_relu_log_derivative"]


class _Constants(NamedTuple):
    s: float  # slope as x -> -inf
    alpha: float  # (1 - s) / (1 + s)
    c: float  # 1 / (1 + alpha) = (1 + s) / 2
    h: float  # alpha c = (1 - s) / 2
    one_m_a2: float  # 1 - alpha^2 = 4 s / (1 + s)^2 (no cancellation as s -> 0)


def _constants(slope: float) -> _Constants:
    """Validate ``slope`` and return its constants, all in float64."""
    if isinstance(slope, bool) or not isinstance(slope, numbers.Real):
        raise TypeError(f"slope must be a real number in (0, 1), got {slope!r} of type {type(slope).__name__}")
    s = float(slope)
    if not 0.0 < s < 1.0:  # also rejects NaN
        raise ValueError(f"slope must lie strictly between 0 and 1 (the slope of SneakyReLU as x -> -inf), got {slope!r}")
    return _Constants(s, (1.0 - s) / (1.0 + s), (1.0 + s) / 2.0, (1.0 - s) / 2.0, 4.0 * s / (1.0 + s) ** 2)


def _check_tensor(x: torch.Tensor, name: str) -> None:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"{name} must be a floating tensor (float32 or float64), got dtype {x.dtype}")
    check_finite(x, name)


# ------------------------------------------------------------------ the fused, cancellation-free pass
# Plain tensor arithmetic, run without autograd (inside the Functions' forward): values only. Each
# op is a full sweep over the tensor, so the count and kind matter. Measured on one CPU thread for
# 50k float32 entries (torch 2.13): a multiply by a 0-dim tensor ~15 us, by a Python float ~30 us
# (the scalar is converted at every call: the "thousands of copy_" of the old profile), hypot
# ~135 us, log/log1p ~100-120 us, and where ~320 us, (x < 0.5).float() ~140 us, copysign with a
# broadcast operand ~650 us. Hence: constants as cached 0-dim tensors, no where/copysign/comparison,
# one hypot, in-place updates.


class _Tensors(NamedTuple):
    one: torch.Tensor
    half: torch.Tensor
    h: torch.Tensor
    s: torch.Tensor
    two_h: torch.Tensor


@functools.lru_cache(maxsize=64)
def _tensors(k: _Constants, dtype: torch.dtype, device: torch.device) -> _Tensors:
    """The constants of ``k`` as 0-dim tensors of ``dtype`` on ``device`` (made once, never written to)."""
    with torch.inference_mode(False):  # usable outside inference mode too

        def t(value):
            return torch.tensor(value, dtype=dtype, device=device)

        return _Tensors(t(1.0), t(0.5), t(k.h), t(k.s), t(2 * k.h))


def _shared(x: torch.Tensor, t: _Tensors) -> tuple[torch.Tensor, ...]:
    """``a = |x|``, ``r = hypot(x, 1)``, ``i = 1 / (r + a)``, ``kh = h sign(x)``, ``p = kh + h``, ``base = p + s``.

    ``p`` is exactly 2h for x > 0, 0 for x < 0 and h at x = 0; ``base`` is 1 for x > 0, exactly s
    for x < 0 (c - h would cancel for small s) and c at x = 0, where kh = 0 also gives sigma' = c
    and sigma' - 1 = -h.
    """
    a = x.abs()
    r = torch.hypot(x, t.one)
    i = torch.add(r, a).reciprocal_()
    kh = x.sign().mul_(t.h)
    p = torch.add(kh, t.h)
    return a, r, i, kh, p, torch.add(p, t.s)


def _fused(x: torch.Tensor, k: _Constants, derivative: bool = True, log: bool = True):
    """One pass: ``(sigma, sigma', log sigma', (log sigma')')``, stopping early as asked (None for the rest).

    sigma = x (base - kh B), B = (1 + i) / (r + 1) = b + i b with b = 1 / (r + 1); sigma' = base - kh D
    with D = i / r; sigma' - 1 = -(p D + (h - kh)(1 + w)) / 2 with w = |x| / r (h - kh = 2h - p):
    -h D for x > 0 and -h (1 + w) for x < 0, both without cancellation (the form
    (kh - h) - kh D = -h (2 - D) would lose a few bits near x = 0-); log sigma' = log1p(sigma' - 1)
    where sigma' >= 1/2, log(sigma') where sigma' < 1/2 (sigma' >= s: only for slopes below 1/2);
    (log sigma')' = h / (r^3 sigma').

    Eight tensors are allocated (four are the outputs); the rest is done in place, because on the
    CPU a fresh buffer costs more than the arithmetic that fills it.
    """
    t = _tensors(k, x.dtype, x.device)
    a, r, i, kh, p, base = _shared(x, t)
    b = torch.add(r, t.one).reciprocal_()
    b.addcmul_(b, i)  # B = (1 + i) / (1 + r)
    y = torch.addcmul(base, kh, b, value=-1).mul_(x)
    if not derivative:
        return y, None, None, None
    d = i.div_(r)
    dprime = base.addcmul_(kh, d, value=-1)
    if not log:
        return y, dprime, None, None
    log_derivative = a.div_(r).add_(t.one).mul_(kh.neg_().add_(t.h)).addcmul_(p, d).mul_(-0.5).log1p_()
    if k.s < 0.5:
        # weight 1 where sigma' < 1/2, 0 where sigma' > 1/2 (+ 2^-60): lerp then selects exactly;
        # within 2^-60 of 1/2 it averages two accurate values
        weight = torch.sub(t.half, dprime, out=b).mul_(2.0**60).clamp_(0, 1)
        log_derivative.lerp_(torch.log(dprime, out=kh), weight)
    slope = torch.mul(r, r, out=p).mul_(r).mul_(dprime).reciprocal_().mul_(t.h)  # r^3 = inf beyond ~1e12 (float32): 0
    return y, dprime, log_derivative, slope


def _derivative_fast(x: torch.Tensor, k: _Constants) -> torch.Tensor:
    """sigma'(x) = base - kh D, values only."""
    _, r, i, kh, _, base = _shared(x, _tensors(k, x.dtype, x.device))
    return base.addcmul_(kh, i.div_(r), value=-1)


def _inverse_values(y: torch.Tensor, k: _Constants) -> torch.Tensor:
    r"""sigma^{-1}(y), values only.

    Let zeta = y + h = c z with z = (1 + alpha) y + alpha = x + alpha r. Squaring z - x = alpha r
    gives (1 - alpha^2) x^2 - 2 z x + (z^2 - alpha^2) = 0, whose root with x <= z is
    x = (z - alpha R) / (1 - alpha^2), R = hypot(z, sqrt(1 - alpha^2)); multiplied by c
    (c sqrt(1 - alpha^2) = sqrt(s), c (1 - alpha^2) = 2 s / (1 + s)):

        x = (zeta - alpha hypot(zeta, sqrt s)) (1 + s) / (2 s)                    (zeta < 0),

    a sum of negative terms. For zeta >= 0 multiply by (z + alpha R) / (z + alpha R) and use
    z^2 - alpha^2 R^2 = (1 - alpha^2)(z^2 - alpha^2), z - alpha = y / c:

        x = y (zeta/2 + h/2) / (c (zeta/2 + alpha hypot(zeta/2, sqrt(s)/2)))    (zeta >= 0),

    halved so that nothing overflows even at y = 3e38 in float32 (x is then about y). Each branch
    sees zeta clamped to its own side (values only: the derivative is analytic, see the module).
    For y below about -s * (largest float) the true inverse is not representable and is -inf.
    """
    sqrt_s = k.s**0.5
    zeta = y + k.h
    half = zeta.clamp(min=0).mul_(0.5)
    ratio = torch.add(half, k.h / 2).div_(
        torch.hypot(half, half.new_full((), sqrt_s / 2)).mul_(k.alpha).add_(half).mul_(k.c))
    pos = ratio.mul_(y)
    neg = zeta.clamp(max=0)
    neg = torch.hypot(neg, neg.new_full((), sqrt_s)).mul_(-k.alpha).add_(neg).mul_((1 + k.s) / (2 * k.s))
    return torch.where(zeta >= 0, pos, neg)


# ------------------------------------------------------------------ smooth, differentiable derivatives


def _derivative_smooth(x: torch.Tensor, k: _Constants) -> tuple[torch.Tensor, torch.Tensor]:
    """``(sigma'(x), q = 1 / hypot(x, 1))`` with ordinary (twice differentiable) torch operations.

    sigma' = c (1 + alpha u) for x >= 0 and c ((1 - alpha^2) + alpha^2 q^2) / (1 - alpha u) for
    x < 0 (u = x q, 1 - u^2 = q^2): the same analytic function twice, each finite for every x, so
    the derivative through ``where`` is the true one on both sides of 0 and at 0.
    """
    q = torch.hypot(x, torch.ones_like(x)).reciprocal()
    u = x * q
    right = k.c * (1 + k.alpha * u)
    left = k.c * (k.one_m_a2 + (k.alpha * q) ** 2) / (1 - k.alpha * u)
    return torch.where(x >= 0, right, left), q


def _log_derivative_slope(dprime: torch.Tensor, q: torch.Tensor, k: _Constants) -> torch.Tensor:
    """(log sigma')'(x) = sigma''(x) / sigma'(x) = h q^3 / sigma'(x) (finite: q^3 underflows to 0, never overflows)."""
    return k.h * q * q * q / dprime


def sneaky_relu_derivative(x: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
    """sigma'(x) = c (1 + alpha x / sqrt(1 + x^2)), elementwise, strictly between s and 1.

    Differentiable any number of times with ordinary torch operations (see the module docstring);
    it is what the backward passes use when a graph of the gradient is asked for.
    """
    k = _constants(slope)
    _check_tensor(x, "x")
    return _derivative_smooth(x, k)[0]


# ------------------------------------------------------------------ autograd Functions
# Each backward has two paths. Plain backward: the analytic derivative from values saved by the
# forward (a multiply or two). create_graph=True (torch.is_grad_enabled() inside backward): the same
# derivative rebuilt from differentiable formulas, so that second derivatives are right. Functions
# whose output is sigma(x) save that output, not x (the next layer keeps it alive anyway), and
# rebuild x = sigma^{-1}(y) on the second path.


def _input_from_output(y: torch.Tensor, k: _Constants) -> torch.Tensor:
    return _InverseFunction.apply(y, k)


class _SneakyReLUFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        y, dprime, _, _ = _fused(x, k, derivative=ctx.needs_input_grad[0], log=False)
        ctx.save_for_backward(y, dprime)
        return y

    @staticmethod
    def backward(ctx, grad):
        y, dprime = ctx.saved_tensors
        if torch.is_grad_enabled():
            dprime = _derivative_smooth(_input_from_output(y, ctx.k), ctx.k)[0]
        return grad * dprime, None


class _LogDerivativeFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k):
        ctx.k = k
        _, _, log_derivative, slope = _fused(x, k)
        ctx.save_for_backward(x, slope)
        return log_derivative

    @staticmethod
    def backward(ctx, grad):
        x, slope = ctx.saved_tensors
        if torch.is_grad_enabled():
            slope = _log_derivative_slope(*_derivative_smooth(x, ctx.k), ctx.k)
        return grad * slope, None


class _InverseFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y, k):
        ctx.k = k
        x = _inverse_values(y, k)
        ctx.save_for_backward(x)  # an output: double backward differentiates through it
        return x

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        if torch.is_grad_enabled():
            return grad / _derivative_smooth(x, ctx.k)[0], None
        return grad / _derivative_fast(x, ctx.k), None


class SneakyReLUWithLogDerivative(torch.autograd.Function):
    r"""``(sigma(x), log sigma'(x))`` elementwise in one fused pass: ``SneakyReLUWithLogDerivative.apply(x, slope)``.

    Forward: the cancellation-free pass of the module docstring (one square root, one ``log1p``,
    for slopes below 1/2 one ``log``, and about twenty multiply-adds), which also yields the two
    derivatives the backward needs. Backward, analytic: with :math:`q = 1/\sqrt{1 + x^2}`,

    .. math:: \bar x = \bar y\,\sigma'(x) + \overline{\log\sigma'}\;\frac{h\,q^3}{\sigma'(x)},
              \qquad h = \frac{1 - s}{2},

    one multiply-add of saved tensors. Saved: the output sigma(x) (kept alive by the next layer
    anyway), sigma'(x) and h q^3 / sigma'(x). With ``create_graph=True`` the backward is rebuilt
    from :func:`sneaky_relu_derivative`'s smooth formulas at x = sigma^{-1}(y), so second
    derivatives are right too.
    """

    @staticmethod
    def forward(ctx, x, slope):
        k = _constants(slope)
        y, dprime, log_derivative, slope_of_log = _fused(x, k)
        ctx.k = k
        ctx.save_for_backward(y, dprime, slope_of_log)
        ctx.set_materialize_grads(False)
        return y, log_derivative

    @staticmethod
    def backward(ctx, grad_y, grad_log_derivative):
        y, dprime, slope_of_log = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable formulas
            dprime, q = _derivative_smooth(_input_from_output(y, ctx.k), ctx.k)
            slope_of_log = _log_derivative_slope(dprime, q, ctx.k)
        if grad_y is None and grad_log_derivative is None:
            return None, None
        if grad_log_derivative is None:
            return grad_y * dprime, None
        if grad_y is None:
            return grad_log_derivative * slope_of_log, None
        return torch.addcmul(grad_y * dprime, grad_log_derivative, slope_of_log), None


# ------------------------------------------------------------------ the public functions


def sneaky_relu(x: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
    """sigma(x) = (x + alpha (sqrt(1 + x^2) - 1)) / (1 + alpha), elementwise.

    Computed as x ((c + k) - k B) (module docstring): for x >= 0 that is x (1 - h B), for x < 0
    x (s + h B), with B = 1 - |x| / (r + 1) in (0, 1]; no cancellation, no overflow. The gradient
    is the analytic sigma'(x) (:func:`sneaky_relu_derivative`).
    """
    k = _constants(slope)
    _check_tensor(x, "x")
    return _SneakyReLUFunction.apply(x, k)


def sneaky_relu_inverse(y: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
    """Closed-form inverse of :func:`sneaky_relu`, elementwise.

    See ``_inverse_values`` for the two cancellation-free branches (split at y = -(1 - s)/2, where
    z = (1 + alpha) y + alpha = 0). The gradient is the analytic 1 / sigma'(sigma^{-1}(y)).
    """
    k = _constants(slope)
    _check_tensor(y, "y")
    return _InverseFunction.apply(y, k)


def sneaky_relu_log_derivative(x: torch.Tensor, slope: float = 0.1) -> torch.Tensor:
    """log sigma'(x) = log(1 + alpha x / r) - log(1 + alpha), elementwise; r = sqrt(1 + x^2).

    sigma'(x) = (c + k) - k D and sigma'(x) - 1 = (k - h) - k D with D = 1 - |x| / r (module
    docstring): for x >= 0, sigma' - 1 = -h D; for x < 0, sigma' = s + h D and
    sigma' - 1 = -(1 - s) + h D (h D <= (1 - s)/2: at most half). Returns log1p(sigma' - 1) where
    sigma' >= 1/2 (always for x >= 0, accurate even where log sigma' ~ -1/x^2) and log(sigma')
    where sigma' < 1/2; both are then within a few ulps. The gradient is the analytic
    sigma''/sigma' = h q^3 / sigma'(x).
    """
    k = _constants(slope)
    _check_tensor(x, "x")
    return _LogDerivativeFunction.apply(x, k)


class SneakyReLU(InvertibleModule):
    """Elementwise SneakyReLU as an invertible layer (Finzi et al., 2019).

    forward(x) -> (sigma(x), logabsdet) with logabsdet = sum over all non-batch entries of
    log sigma'(x), shape (B,) (the Jacobian is diagonal), both from one fused pass
    (:class:`SneakyReLUWithLogDerivative`); inverse(y) -> sigma^{-1}(y).
    Works on any (B, ...) tensor, typically (B, C, H, W), including B = 0.
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
        if x.dim() > 1:
            log_derivative = log_derivative.flatten(1).sum(1)  # (B,)
        return y, log_derivative

    def transform(self, x: torch.Tensor) -> torch.Tensor:
        if at_boundary():
            _check_batched(x, "input")
            _check_tensor(x, "input")
        return _SneakyReLUFunction.apply(x, _constants(self.slope))

    def inverse(self, y: torch.Tensor) -> torch.Tensor:
        _check_batched(y, "input")
        return sneaky_relu_inverse(y, self.slope)

    def extra_repr(self) -> str:
        return f"slope={self.slope}"


def _check_batched(x: torch.Tensor, name: str) -> None:
    if isinstance(x, torch.Tensor) and x.dim() == 0:
        raise ValueError(f"{name} must have a leading batch dimension (B, ...), got a 0-dimensional tensor")
