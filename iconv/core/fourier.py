r"""Circular convolutions in the Fourier domain: spectrum, conv, exact log-determinant and inverse.

A circular conv with weight :math:`W \in \mathbb{R}^{c\times c\times k\times k}` (torch's
cross-correlation, padding :math:`p = \lfloor k/2 \rfloor`),

.. math:: y_o[n] = \sum_c \sum_{a} W_{oc}[a]\, x_c[n + a - p],

becomes, after a 2-D DFT of every channel, one :math:`c\times c` complex matrix per frequency
(Finzi et al., 2019, Figure 1):

.. math:: \hat y[f] = A_f\, \hat x[f], \qquad
          A_f = \sum_{a} W[a]\, e^{+2\pi i\, \langle f, a - p\rangle / (h, w)}
          \quad(\text{the paper's } \mathcal{F}(W)^*).

So the :math:`chw\times chw` map is block diagonal in the Fourier basis, and

.. math:: \log|\det \mathrm{Conv}_W| = \sum_f \log|\det A_f| \quad (2), \qquad
          \mathrm{Conv}_W^{-1}(y) = \mathcal{F}^{-1}\big(A_f^{-1}\,\hat y[f]\big) \quad (1),

at cost :math:`O(c^2 hw \log hw + c^3 hw)` instead of :math:`O(c^3 h^3 w^3)`.

Real images need only the real FFT's half spectrum, :math:`h \times (w/\!/2 + 1)` blocks: the block
at :math:`-f` is the complex conjugate of the block at :math:`f`, with the same :math:`|\det|`.
The columns :math:`v = 0` and (even :math:`w`) :math:`v = w/2` are their own mirror and count
once; every other column counts twice.

All functions are batched, work in float32 and float64 on CPU and CUDA, and are differentiable.
``backend="complex"`` factorizes the complex blocks with torch's complex LU; ``backend="lifted"``
factorizes the real :math:`2c\times 2c` lifts :math:`\phi(A_f)` (see :mod:`iconv.lifting`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import lifting
from .threads import safe_factorization_threads
from ..checks import check_image
from ..errors import NotInvertibleError
from .circular import check_weight

BACKENDS = ("complex", "lifted")

#: An inverse is refused when a block's condition number times the dtype's machine epsilon exceeds
#: this (the result could then be wrong in its leading digits): about 8e4 in float32, 4.5e13 in float64.
MAX_RELATIVE_ERROR = 1e-2


def condition_limit(dtype: torch.dtype) -> float:
    """The singularity rule's limit: a block whose condition number exceeds it is refused.

    ``MAX_RELATIVE_ERROR / eps(dtype)``: about 8.4e4 in float32 and 4.5e13 in float64.
    """
    return MAX_RELATIVE_ERROR / torch.finfo(dtype).eps


def check_backend(backend: str) -> None:
    """Raise unless ``backend`` is one of :data:`BACKENDS`."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _check_size(h: int, w: int) -> None:
    if int(h) != h or int(w) != w or h < 1 or w < 1:
        raise ValueError(f"image size must be positive integers, got h = {h}, w = {w}")


def _phases(n: int, freqs: int, k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``exp(+2 pi i f (a - p) / n)`` for f < freqs, a < k: ``(freqs, k)`` complex."""
    p = k // 2
    f = torch.arange(freqs, dtype=torch.float64, device=device)[:, None]
    a = torch.arange(k, dtype=torch.float64, device=device)[None, :] - p
    angle = 2 * math.pi * torch.remainder(f * a, n) / n  # reduce first: exact integers
    return torch.polar(torch.ones_like(angle), angle).to(dtype)


def spectrum(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The Fourier blocks of the circular conv on an ``h x w`` image.

    Returns ``(h, w // 2 + 1, c, c)`` complex: ``A[u, v]`` maps the input's rfft2 coefficients at
    frequency ``(u, v)`` to the output's. Kernels larger than the image wrap around correctly.
    """
    check_weight(weight)
    _check_size(h, w)
    k = weight.shape[-1]
    cdtype = torch.complex128 if weight.dtype == torch.float64 else torch.complex64
    rows = _phases(h, h, k, cdtype, weight.device)  # (h, k)
    cols = _phases(w, w // 2 + 1, k, cdtype, weight.device)  # (w', k)
    half = torch.einsum("ocab,vb->ocav", weight.to(cdtype), cols)  # (c, c, k, w')
    return torch.einsum("ua,ocav->uvoc", rows, half).contiguous()  # (h, w', c, c)


def conjugate_multiplicity(w: int, device=None) -> torch.Tensor:
    """How often each half-spectrum column stands in the full spectrum: ``(w // 2 + 1,)`` of 1s and 2s."""
    mult = torch.full((w // 2 + 1,), 2.0, device=device, dtype=torch.float64)
    mult[0] = 1.0
    if w % 2 == 0:
        mult[-1] = 1.0
    return mult


def to_frequencies(x: torch.Tensor) -> torch.Tensor:
    """rfft2 of ``x`` ``(B, c, h, w)`` laid out frequency-major: ``(h * w', c, B)`` complex, contiguous."""
    B, c = x.shape[:2]
    X = torch.fft.rfft2(x)  # (B, c, h, w')
    return X.permute(2, 3, 1, 0).reshape(-1, c, B)  # (h*w', c, B)


def from_frequencies(Xf: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_frequencies`: ``(h * w', c, B)`` back to the real image ``(B, c, h, w)``."""
    f, c, B = Xf.shape
    X = Xf.view(h, w // 2 + 1, c, B).permute(3, 2, 0, 1)  # (B, c, h, w')
    return torch.fft.irfft2(X, s=(h, w))


def apply_blocks(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multiply every frequency of ``x`` ``(B, c, h, w)`` by its block ``(h, w', c, c)``: a circular conv."""
    h, w = x.shape[-2:]
    c = blocks.shape[-1]
    Yf = torch.bmm(blocks.reshape(-1, c, c), to_frequencies(x))  # (h*w', c, B)
    return from_frequencies(Yf, h, w)


def _check_pair(x: torch.Tensor, weight: torch.Tensor, name: str) -> None:
    check_weight(weight)
    check_image(x, name, channels=weight.shape[0])
    if x.dtype != weight.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but weight has {weight.dtype}; use one dtype")


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The circular conv computed in the Fourier domain; equals :func:`iconv.circular.circular_conv2d`."""
    _check_pair(x, weight, "x")
    y = apply_blocks(spectrum(weight, *x.shape[-2:]), x)
    return y if bias is None else y + bias.view(1, -1, 1, 1)


def _lu(blocks: torch.Tensor, backend: str):
    """LU of every block (complex, or its real lift), guarded against the CPU batched-LU bug."""
    matrices = blocks if backend == "complex" else lifting.lift(blocks)
    with safe_factorization_threads(matrices):
        LU, pivots, info = torch.linalg.lu_factor_ex(matrices)
    return LU, pivots, info


def _logabsdet_of_lu(LU: torch.Tensor, backend: str) -> torch.Tensor:
    lad = LU.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)  # (h, w')
    return lad if backend == "complex" else 0.5 * lad


def _total(lad: torch.Tensor, w: int) -> torch.Tensor:
    """Sum half-spectrum log-determinants ``(h, w')``, counting mirrored columns twice."""
    return (lad * conjugate_multiplicity(w, lad.device).to(lad.dtype)).sum()


def logabsdet(weight: torch.Tensor, h: int, w: int, backend: str = "complex") -> torch.Tensor:
    """``log|det|`` of the whole ``chw x chw`` circular conv, exactly, as a 0-dim tensor.

    Equation (2) of the paper over the half spectrum; differentiable in ``weight``. A singular
    conv gives ``-inf``.
    """
    check_backend(backend)
    blocks = spectrum(weight, h, w)  # (h, w', c, c)
    LU, _, _ = _lu(blocks.reshape(-1, *blocks.shape[-2:]), backend)  # (h*w', n, n)
    return _total(_logabsdet_of_lu(LU, backend).view(h, -1), w)


def _modulus(z: torch.Tensor) -> torch.Tensor:
    """``|Re z| + |Im z|``: within a factor sqrt(2) of ``|z|`` and several times cheaper than it."""
    return z.real.abs() + z.imag.abs() if z.is_complex() else z.abs()


def _column_norms(M: torch.Tensor) -> torch.Tensor:
    """The 1-norm of every column of ``(..., n, m)``: ``(..., m)``."""
    return _modulus(M).sum(-2)


def _norm1(M: torch.Tensor) -> torch.Tensor:
    """The 1-norm (largest column sum of moduli) of every matrix in ``(..., n, m)``.

    Moduli are taken as ``|Re| + |Im|`` (see :func:`_modulus`); condition numbers built from it
    are at most 2x those with true moduli, which only makes the singularity check more careful.
    """
    return _column_norms(M).amax(-1)


def _probe(n: int, dtype, device) -> torch.Tensor:
    """A fixed vector of pseudo-random signs ``(n, 1)``, used to bound ``||A^-1||`` from below."""
    signs = torch.sign(torch.sin(torch.arange(1, n + 1, dtype=torch.float64) * 12.9898) + 1e-12)
    return signs.to(device=device, dtype=dtype)[:, None]


@dataclass
class SpectralFactorization:
    """What a circular conv's inverse needs, computed once per weight and image size.

    ``LU``, ``pivots`` factorize every block (or its real lift, for ``backend="lifted"``),
    ``logabsdet`` is the exact log-determinant, ``norm1`` ``(h*w',)`` the blocks' 1-norms. With
    ``explicit=True`` the per-frequency inverses :math:`A_f^{-1}` ``(h*w', c, c)`` are formed too,
    which makes every later inverse a single batched matrix product, and gives the exact 1-norm
    ``condition`` of every block.
    """

    LU: torch.Tensor
    pivots: torch.Tensor
    backend: str
    logabsdet: torch.Tensor
    norm1: torch.Tensor
    h: int
    w: int
    inverse_blocks: torch.Tensor | None = None
    condition: torch.Tensor | None = None

    def _lu_solve(self, rhs: torch.Tensor, adjoint: bool = False) -> torch.Tensor:
        """``A^-1 rhs`` (or ``A^-H rhs``) for complex ``rhs`` ``(h*w', c, m)``, in either backend."""
        if self.backend == "lifted":  # phi(C)^T = phi(C^H): the lifted transpose solve is the adjoint one
            lifted = torch.linalg.lu_solve(self.LU, self.pivots, lifting.lift_vector(rhs), adjoint=adjoint)
            return lifting.unlift_vector(lifted)
        return torch.linalg.lu_solve(self.LU, self.pivots, rhs, adjoint=adjoint)

    def solve(self, Yf: torch.Tensor):
        r"""Solve ``A_f X_f = Y_f`` for ``Yf`` ``(h*w', c, B)``; returns ``(Xf, condition)``.

        ``condition`` ``(h*w',)`` is exact when the inverses are explicit. Otherwise it is a lower
        bound on the 1-norm condition number from Hager's estimator (the one LAPACK's ``gecon``
        refines), run for one step: :math:`\|A^{-1}\|_1 \ge \|A^{-1} r\|_1 / \|r\|_1` for a fixed
        sign probe :math:`r` (one extra column of the solve), then
        for the unit vector :math:`e_j` that the adjoint solve :math:`A^{-H}\mathrm{sign}(A^{-1} r)`
        points to (two more single-column solves). It is rarely more than a few times too small.
        """
        if self.inverse_blocks is not None:
            return torch.bmm(self.inverse_blocks, Yf), self.condition
        f, c, B = Yf.shape
        probe = _probe(c, Yf.dtype, Yf.device).expand(f, -1, 1)  # (h*w', c, 1)
        sol = self._lu_solve(torch.cat([Yf, probe], dim=-1))  # (h*w', c, B + 1)
        with torch.no_grad():
            tiny = torch.finfo(self.norm1.dtype).tiny
            x = sol[..., B:]  # (h*w', c, 1): A^-1 probe
            growth = _column_norms(x)[:, 0] / c  # |A^-1 r|_1 / |r|_1 with |r|_1 = c
            z = self._lu_solve(x / x.abs().clamp_min(tiny), adjoint=True)  # subgradient of |A^-1 .|_1
            e = torch.zeros_like(x).scatter_(1, _modulus(z).argmax(1, keepdim=True), 1.0)
            refined = _column_norms(self._lu_solve(e))[:, 0]  # (h*w',): |A^-1 e_j|_1
            condition = torch.nan_to_num(self.norm1 * torch.maximum(growth, refined), nan=math.inf)
        return sol[..., :B], condition

    def check_invertible(self, condition: torch.Tensor, max_condition: float | None = None) -> None:
        """Raise :class:`NotInvertibleError` if a block is too ill-conditioned to invert reliably."""
        dtype = self.norm1.dtype
        limit = MAX_RELATIVE_ERROR / torch.finfo(dtype).eps if max_condition is None else max_condition
        flat = torch.nan_to_num(condition.detach(), nan=math.inf)
        index = int(flat.argmax())
        cond = float(flat[index])
        if not math.isfinite(cond) or cond > limit:
            u, v = divmod(index, self.w // 2 + 1)
            raise NotInvertibleError(
                f"the convolution is numerically singular on a {self.h}x{self.w} image: frequency "
                f"(u={u}, v={v}) has condition number {cond:.3g}, above the limit {limit:.3g} for {dtype}; "
                "its inverse would be wrong. Re-initialise or regularise the weight.",
                frequency=(u, v),
                condition_number=cond,
            )


def factorize(weight: torch.Tensor, h: int, w: int, backend: str = "complex",
              explicit: bool = False) -> SpectralFactorization:
    """Factorize every Fourier block once (LU); with ``explicit`` also form the inverse blocks."""
    check_backend(backend)
    blocks = spectrum(weight, h, w)  # (h, w', c, c)
    c = blocks.shape[-1]
    LU, pivots, info = _lu(blocks.reshape(-1, c, c), backend)  # (h*w', n, n)
    norm1 = _norm1(blocks.reshape(-1, c, c)).real.detach()
    fact = SpectralFactorization(LU, pivots, backend, _total(_logabsdet_of_lu(LU, backend).view(h, -1), w),
                                 norm1, h, w)
    if explicit:
        eye = torch.eye(LU.shape[-1], dtype=LU.dtype, device=LU.device).expand_as(LU)
        inverses = torch.linalg.lu_solve(LU, pivots, eye)
        if backend == "lifted":
            inverses = lifting.unlift(inverses, check=False)
        condition = torch.nan_to_num(norm1 * _norm1(inverses).detach(), nan=math.inf)
        fact.inverse_blocks = inverses
        fact.condition = torch.where(info > 0, torch.full_like(condition, math.inf), condition)
    return fact


def inverse(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "complex",
    factorization: SpectralFactorization | None = None,
    max_condition: float | None = None,
) -> torch.Tensor:
    """The ``x`` with ``circular_conv(x, weight, bias) = y``: equation (1) of the paper.

    Pass a ``factorization`` from :func:`factorize` to reuse it across calls. Raises
    :class:`NotInvertibleError` (naming the worst frequency and its condition number) instead of
    returning a wrong answer.
    """
    _check_pair(y, weight, "y")
    h, w = y.shape[-2:]
    if factorization is None:
        factorization = factorize(weight, h, w, backend)
    elif (factorization.h, factorization.w) != (h, w):
        raise ValueError(f"factorization is for {factorization.h}x{factorization.w} images, y is {h}x{w}")
    if bias is not None:
        y = y - bias.view(1, -1, 1, 1)
    Xf, condition = factorization.solve(to_frequencies(y))  # (h*w', c, B)
    factorization.check_invertible(condition, max_condition)
    return from_frequencies(Xf, h, w)


@torch.no_grad()
def condition_numbers(weight: torch.Tensor, h: int, w: int, backend: str = "complex") -> torch.Tensor:
    r"""The per-frequency condition numbers :math:`\kappa(A_f) = \|A_f\|_1 \|A_f^{-1}\|_1`: ``(h, w // 2 + 1)``.

    The one definition iconv uses everywhere (the singularity rule of :func:`inverse`, the layers'
    and models' diagnostics): 1-norms with moduli :math:`|\Re z| + |\Im z|`, from the explicit
    inverse blocks; ``inf`` for an exactly singular block.
    """
    return factorize(weight, h, w, backend, explicit=True).condition.view(h, w // 2 + 1)
