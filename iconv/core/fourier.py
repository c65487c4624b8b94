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

**Validation.** Every public function checks its arguments (shapes, dtypes, finiteness: one host
synchronisation) unless called with ``validate=False``, which the layers use once they have
checked their own input at the boundary (:func:`iconv.layers.base.at_boundary`).

**Singularity.** One definition, :func:`condition_numbers` (exact 1-norm condition numbers from the
explicit inverse blocks), and one limit, :func:`condition_limit`, serve every caller: :func:`inverse`
(fresh or cached) raises :class:`~iconv.NotInvertibleError` for every weight with a block above the
limit, whatever its structure (no estimator that a constructed weight could fool). A block whose
smallest LU pivot is at most :math:`2n\,\varepsilon` times its largest entry is singular to working
precision: its :math:`\log|\det|` is ``-inf`` and its condition number ``inf``.

**Speed** (c = 64, 32x32, batch 32, float32, one CPU thread, thread CPU time, medians; conv = torch's
spatial circular conv, 42 ms): complex LU of the 544 blocks 30 ms, the real lift's LU 119 ms (so
``backend="complex"`` is the default); the explicit inverse from the LU (``lu_solve`` on the
identity) 91 ms against ``linalg.inv_ex`` 150 ms and a ``solve_triangular`` route 142 ms (a batched
2x2-block recursive triangular inverse with ``bmm``, LAPACK's trtri by hand, was 108 ms for U alone
against 96 ms for the whole ``lu_solve``: rejected); applying the inverse blocks with one
contiguous complex ``bmm`` 22 ms against 95 ms on the strided FFT layout, 65 ms for the real lift
and 77 ms for four real products, and the ``(B, f, c)`` layout of :func:`_apply` (strided GEMM
operand, no 4-D permute) cut the whole cached inverse from 1.2-1.3x to 0.8-0.9x a conv.
The log-determinant factorizes only the blocks distinct up to conjugation
(:func:`distinct_frequencies`; one block for a 1x1 kernel).
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field

import torch
from torch.autograd.function import once_differentiable

from . import lifting
from .threads import safe_factorization_threads
from ..checks import check_dtype, check_image
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


def _complex_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _phases(n: int, freqs: int, k: int, dtype: torch.dtype, device) -> torch.Tensor:
    """``exp(+2 pi i f (a - p) / n)`` for f < freqs, a < k: ``(freqs, k)`` complex."""
    p = k // 2
    f = torch.arange(freqs, dtype=torch.float64, device=device)[:, None]
    a = torch.arange(k, dtype=torch.float64, device=device)[None, :] - p
    angle = 2 * math.pi * torch.remainder(f * a, n) / n  # reduce first: exact integers
    return torch.polar(torch.ones_like(angle), angle).to(dtype)


@functools.lru_cache(maxsize=64)
def _phase_table(h: int, w: int, k: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The phases of every tap at every half-spectrum frequency: ``(h * w', k * k)`` complex, cached.

    Built in float64 and rounded once; ordinary tensors even when first asked for under
    ``torch.inference_mode`` (they are reused by differentiable calls).
    """
    with torch.inference_mode(False):
        rows = _phases(h, h, k, torch.complex128, device)  # (h, k)
        cols = _phases(w, w // 2 + 1, k, torch.complex128, device)  # (w', k)
        return (rows[:, None, :, None] * cols[None, :, None, :]).reshape(-1, k * k).to(dtype)


@functools.lru_cache(maxsize=64)
def _multiplicity_table(h: int, w: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """:func:`conjugate_multiplicity` repeated for every row: ``(h * w',)``, cached."""
    with torch.inference_mode(False):
        return conjugate_multiplicity(w, device).to(dtype).repeat(h)


def distinct_frequencies(h: int, w: int) -> tuple[list[int], list[float]]:
    r"""The half-spectrum frequencies whose blocks are distinct up to conjugation, with multiplicities.

    Returns ``(indices, multiplicities)``: flat indices ``u * (w//2 + 1) + v`` into the half
    spectrum and how often each block's :math:`|\det|` stands in the full spectrum. In the
    self-mirrored columns (:math:`v = 0` and, for even ``w``, :math:`v = w/2`) the block at row
    :math:`u` is the conjugate of the block at row :math:`h - u`, so only rows
    :math:`u \le h/2` are kept there, counted twice unless :math:`u = 0` or :math:`u = h/2`;
    every other column counts twice (:func:`conjugate_multiplicity`). The multiplicities sum to
    :math:`hw`. The log-determinant factorizes only these blocks: 512 instead of 544 at 32x32,
    100 instead of 112 at 14x14 (ConvFlow's first level), 25 instead of 28 at 7x7.
    """
    wp = w // 2 + 1
    self_mirrored = {0} | ({w // 2} if w % 2 == 0 else set())
    indices, mult = [], []
    for u in range(h):
        for v in range(wp):
            if v in self_mirrored:
                if u > h - u:  # the conjugate of row h - u, kept already
                    continue
                mult.append(1.0 if (u == 0 or 2 * u == h) else 2.0)
            else:
                mult.append(2.0)
            indices.append(u * wp + v)
    return indices, mult


@functools.lru_cache(maxsize=64)
def _distinct_tables(h: int, w: int, k: int, dtype: torch.dtype, device: torch.device):
    """Phases ``(f', k * k)`` (complex ``dtype``) and multiplicities ``(f',)`` (real) of :func:`distinct_frequencies`.

    A 1x1 kernel has the same block, the weight, at every frequency: one block with multiplicity
    ``h w`` (the log-determinant of ConvFlow's 1x1 conv at 7x7, with gradient: about 0.2 against
    1.3 ms for its 25 distinct blocks).
    """
    if k == 1:  # every block is the weight itself: one block, counted h*w times
        indices, mult = [0], [float(h * w)]
    else:
        indices, mult = distinct_frequencies(h, w)
    with torch.inference_mode(False):
        phases = _phase_table(h, w, k, dtype, device)[torch.tensor(indices, device=device)].contiguous()
        real = torch.float64 if dtype == torch.complex128 else torch.float32
        return phases, torch.tensor(mult, dtype=real, device=device)


def spectrum(weight: torch.Tensor, h: int, w: int, validate: bool = True) -> torch.Tensor:
    r"""The Fourier blocks of the circular conv on an ``h x w`` image.

    Returns ``(h, w // 2 + 1, c, c)`` complex: ``A[u, v]`` maps the input's rfft2 coefficients at
    frequency ``(u, v)`` to the output's. Kernels larger than the image wrap around correctly.
    Computed as one complex matrix product, phases ``(h w', k^2)`` (cached per size) times taps
    ``(k^2, c^2)``: its output is already in block layout, no copies (7-9 ms at c = 64, 32x32 on one
    thread, the same as the two einsums it replaces, within the noise).
    """
    if validate:
        check_weight(weight)
        _check_size(h, w)
    c, k = weight.shape[0], weight.shape[-1]
    cdtype = _complex_dtype(weight.dtype)
    taps = weight.permute(2, 3, 0, 1).reshape(k * k, c * c).to(cdtype)  # (k^2, c^2)
    return (_phase_table(h, w, k, cdtype, weight.device) @ taps).view(h, w // 2 + 1, c, c)


def conjugate_multiplicity(w: int, device=None) -> torch.Tensor:
    """How often each half-spectrum column stands in the full spectrum: ``(w // 2 + 1,)`` of 1s and 2s."""
    mult = torch.full((w // 2 + 1,), 2.0, device=device, dtype=torch.float64)
    mult[0] = 1.0
    if w % 2 == 0:
        mult[-1] = 1.0
    return mult


def to_frequencies(x: torch.Tensor) -> torch.Tensor:
    """rfft2 of ``x`` ``(B, c, h, w)`` laid out frequency-major: ``(h * w', c, B)`` complex, contiguous.

    The one copy here pays for itself: a batched product on the contiguous layout takes 22 ms
    against 95 ms on the FFT's strided output (c = 64, 32x32, batch 32).
    """
    B, c = x.shape[:2]
    X = torch.fft.rfft2(x)  # (B, c, h, w')
    return X.permute(2, 3, 1, 0).reshape(-1, c, B).contiguous()  # (h*w', c, B)


def from_frequencies(Xf: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """Inverse of :func:`to_frequencies`: ``(h * w', c, B)`` back to the real image ``(B, c, h, w)``, contiguous.

    The inverse FFT runs over the two leading axes of the frequency-major layout, then one copy
    restores ``(B, c, h, w)``: 16 ms against 26 ms for ``irfft2`` on the permuted (strided) view.
    """
    f, c, B = Xf.shape
    x = torch.fft.irfft2(Xf.view(h, w // 2 + 1, c, B), s=(h, w), dim=(0, 1))  # (h, w, c, B)
    return x.permute(3, 2, 0, 1).contiguous()


def _apply(blocks: torch.Tensor, x: torch.Tensor, shift: torch.Tensor | None, inverse: bool) -> torch.Tensor:
    """``F^-1(blocks_f F(x)_f) + shift`` (``inverse=False``) or ``F^-1(blocks_f F(x - shift)_f)`` (``inverse=True``).

    ``blocks`` ``(h*w', c, c)``; an empty batch stays empty. A constant ``shift`` (a bias) only moves
    the zero frequency, by ``h w`` times itself: adding it there saves a pass over the image.

    Layout (c = 64, 32x32, batch 32, one thread, thread CPU time, 3 interleaved medians of 11): the
    rfft2 output ``(B, c, f)`` is transposed per image to ``(B, f, c)`` (a 2-D transpose, 2.4 ms,
    against 5.6 ms for the 4-D permute to ``(f, c, B)`` of :func:`to_frequencies`), and its view
    ``(f, B, c)`` (row stride ``f c``) goes to ``matmul`` as is: a strided GEMM operand, no copy
    (12 ms, against 18.5 ms for the contiguous ``bmm`` with its copy). Without autograd the product
    is written straight into a ``(B, f, c)`` buffer (``out=``), so the irfft2 input needs one 2-D
    transpose back. Apply with inverse blocks: 30-40 ms against 49-55 ms for the ``(f, c, B)`` route.
    """
    h, w = x.shape[-2:]
    if x.shape[0] == 0:  # MKL's FFT refuses empty batches
        return x.new_zeros(x.shape)
    B, c = x.shape[:2]
    X = torch.fft.rfft2(x).reshape(B, c, -1).transpose(1, 2).contiguous()  # (B, f, c)
    if shift is not None and inverse:
        X[:, 0] -= (h * w) * shift.to(X.dtype)
    Xv, At = X.transpose(0, 1), blocks.transpose(1, 2)  # (f, B, c) strided view, (f, c, c)^T view
    if torch.is_grad_enabled() and (X.requires_grad or blocks.requires_grad):
        Y = torch.matmul(Xv, At).transpose(0, 1)  # (B, f, c) view of (f, B, c)
    else:
        Y = X.new_empty(X.shape)  # (B, f, c)
        torch.matmul(Xv, At, out=Y.transpose(0, 1))
    if shift is not None and not inverse:
        Y[:, 0] += (h * w) * shift.to(Y.dtype)
    return torch.fft.irfft2(Y.transpose(1, 2).reshape(B, c, h, w // 2 + 1), s=(h, w))


def apply_blocks(blocks: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Multiply every frequency of ``x`` ``(B, c, h, w)`` by its block ``(h, w', c, c)``: a circular conv."""
    c = blocks.shape[-1]
    return _apply(blocks.reshape(-1, c, c), x, None, inverse=False)


def _check_pair(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, name: str) -> None:
    check_weight(weight)
    check_image(x, name, channels=weight.shape[0])
    if x.dtype != weight.dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but weight has {weight.dtype}; use one dtype")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (weight.shape[0],):
            shape = tuple(bias.shape) if isinstance(bias, torch.Tensor) else type(bias).__name__
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {shape}")
        check_dtype(bias, "bias", weight.dtype)
        if not bool(torch.isfinite(bias).all()):
            raise ValueError("bias holds non-finite values (NaN or inf); expected finite values")


def conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           validate: bool = True) -> torch.Tensor:
    """The circular conv computed in the Fourier domain; equals :func:`iconv.circular.circular_conv2d`."""
    if validate:
        _check_pair(x, weight, bias, "x")
    h, w = x.shape[-2:]
    c = weight.shape[0]
    return _apply(spectrum(weight, h, w, validate=False).reshape(-1, c, c), x, bias, inverse=False)


def _lu(blocks: torch.Tensor, backend: str):
    """LU of every block (complex, or its real lift), guarded against the CPU batched-LU bug."""
    matrices = blocks if backend == "complex" else lifting.lift(blocks)
    with safe_factorization_threads(matrices):
        LU, pivots, info = torch.linalg.lu_factor_ex(matrices)
    return LU, pivots, info


def _inverse_from_lu(LU: torch.Tensor, pivots: torch.Tensor, backend: str, adjoint: bool = False) -> torch.Tensor:
    """``A^-1`` (or ``A^-H``) of every block ``(f, c, c)`` complex, from its LU (either backend).

    For the lift, :math:`\\phi(C)^T = \\phi(C^H)`, so the transposed solve gives the adjoint.
    """
    eye = torch.eye(LU.shape[-1], dtype=LU.dtype, device=LU.device).expand_as(LU)
    inverses = torch.linalg.lu_solve(LU, pivots, eye, adjoint=adjoint)
    return lifting.unlift(inverses, check=False) if backend == "lifted" else inverses


def _norm1(M: torch.Tensor) -> torch.Tensor:
    """The 1-norm (largest column sum of moduli) of every matrix in ``(..., n, m)``.

    Moduli are taken as ``|Re| + |Im|`` (within a factor sqrt(2) of ``|z|`` and several times cheaper);
    this is also the 1-norm of the
    real lift :math:`\\phi(M)`, so both backends share it.
    """
    if not M.is_complex():
        return M.abs().sum(-2).amax(-1)
    return _column_moduli(torch.view_as_real(M).abs()).amax(-1)


def _column_moduli(parts: torch.Tensor) -> torch.Tensor:
    """Column sums of ``|Re| + |Im|`` from ``|view_as_real(M)|`` ``(..., n, m, 2)``: ``(..., m)``.

    One pass of ``abs`` over the interleaved real view, then a reduction over rows with the
    contiguous ``(m, 2)`` inner block: 6.5 ms against 9.8 ms for ``M.real.abs() + M.imag.abs()`` on
    the strided halves (544 blocks of 64x64 complex64, one thread).
    """
    return parts.sum(-3).sum(-1)


def _norm1_and_entry_scale(M: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_norm1` and :func:`_entry_scale` of every complex block ``(f, n, n)`` from one ``abs`` pass.

    8 ms against 9.8 + 5.2 ms for the two separately (544 blocks of 64x64 complex64, one thread).
    """
    parts = torch.view_as_real(M).abs()  # (f, n, n, 2)
    return _column_moduli(parts).amax(-1), parts.reshape(M.shape[0], -1).amax(-1)


def _entry_scale(blocks: torch.Tensor) -> torch.Tensor:
    """The largest ``max(|Re a|, |Im a|)`` entry of every block ``(f, n, n)``: ``(f,)`` (4 ms at c = 64, 32x32)."""
    real = torch.view_as_real(blocks) if blocks.is_complex() else blocks
    return real.reshape(blocks.shape[0], -1).abs().amax(-1)


def _block_logabsdet(LU: torch.Tensor, scale: torch.Tensor, backend: str) -> torch.Tensor:
    r"""``log|det A_f|`` of every block from its LU: ``(f,)``; ``-inf`` for blocks singular to working precision.

    A block counts as singular when its smallest pivot is at most :math:`2 n\,arepsilon\,s_f`, ``n``
    the factorized size and :math:`s_f` its largest entry (:func:`_entry_scale`). Rounding alone
    leaves pivots of that size in an exactly rank-deficient block (measured, c = 2..64, float32 and
    float64: at most :math:`6arepsilon s_f`), and such a pivot has no correct digit; a block with
    2-norm condition number 1e4 has its smallest pivot at :math:`5\cdot10^4arepsilon s_f` in
    float32, far from the threshold.
    """
    pivots = LU.diagonal(dim1=-2, dim2=-1).abs()  # (f, n)
    n = pivots.shape[-1]
    lad = pivots.log().sum(-1)
    if backend == "lifted":
        lad = 0.5 * lad  # |det phi(A)| = |det A|^2
    tol = 2 * n * torch.finfo(pivots.dtype).eps * scale.to(pivots.dtype)
    return torch.where(pivots.amin(-1) <= tol, torch.full_like(lad, -math.inf), lad)


class _LogAbsDet(torch.autograd.Function):
    r""":math:`\sum_f m_f \log|\det A_{g,f}|` for each of ``G`` convs, with the gradient :math:`m_f A_{g,f}^{-H}`.

    ``blocks`` ``(G * f', c, c)`` holds the ``f'`` distinct blocks of each conv in turn; the result is
    ``(G,)``. torch's generic backward through ``lu_factor`` (triangular solves and products on the
    LU's factors) made the log-determinant with its gradient cost 2.2x a conv's forward + backward
    (c = 64, 32x32, batch 32, one thread, medians of 7 interleaved runs); the gradient of
    :math:`\log|\det A|` is :math:`A^{-H}` (conjugate-Wirtinger convention), one ``lu_solve`` on the
    identity with the LU kept from the forward: 0.8-0.95x a conv's forward + backward on that
    machine. On an AVX-512 EPYC whose oneDNN conv is about 3x faster (13-16 ms for the same conv),
    1.1-1.3x: there the LU alone takes 17-19 ms and the ``lu_solve`` on the identity 40 ms
    (``linalg.inv_ex`` 67 ms; a blocked LU by hand, tall-panel LU + triangular solve + batched
    GEMM, was 3x slower than LAPACK's).
    """

    @staticmethod
    def forward(ctx, blocks, mult, backend):
        LU, pivots, _ = _lu(blocks, backend)
        lad = _block_logabsdet(LU, _entry_scale(blocks), backend)  # (G * f',)
        ctx.save_for_backward(LU, pivots, mult)
        ctx.backend = backend
        return (lad.view(-1, mult.shape[0]) * mult).sum(-1)  # (G,)

    @staticmethod
    @once_differentiable
    def backward(ctx, grad):
        LU, pivots, mult = ctx.saved_tensors
        inverse_adjoint = _inverse_from_lu(LU, pivots, ctx.backend, adjoint=True)  # (G * f', c, c): A^-H
        scale = (grad[:, None] * mult).reshape(-1).to(inverse_adjoint.dtype)  # (G * f',)
        return inverse_adjoint * scale[:, None, None], None, None


def logabsdet(weight: torch.Tensor, h: int, w: int, backend: str = "complex", validate: bool = True) -> torch.Tensor:
    """``log|det|`` of the whole ``chw x chw`` circular conv, exactly, as a 0-dim tensor.

    Equation (2) of the paper over the half spectrum; differentiable in ``weight`` (analytic
    gradient, see :class:`_LogAbsDet`). A conv with a block singular to working precision
    (a rank-deficient weight among them) gives ``-inf``. :func:`logabsdets` does many convs at once.
    """
    check_backend(backend)
    if validate:
        check_weight(weight)
        _check_size(h, w)
    return logabsdets(weight[None], h, w, backend, validate=False)[0]


def logabsdets(weights: torch.Tensor, h: int, w: int, backend: str = "complex", validate: bool = True) -> torch.Tensor:
    r""":func:`logabsdet` of ``G`` convs of one shape at once: ``weights`` ``(G, c, c, k, k)`` -> ``(G,)``.

    One spectrum product and one batched LU for all ``G`` (and one ``lu_solve`` in the backward):
    the values and gradients are those of ``G`` separate calls, bit for bit, at a fraction of the
    per-call overhead that dominates small convs. Measured with gradient, one thread, medians of
    40 interleaved rounds: ConvFlow's eight 4-channel convs at 14x14 0.79 ms against 1.90 ms for
    eight calls, its nine 8-channel convs at 7x7 0.89 against 1.86 ms
    (:func:`iconv.layers.conv.shared_logabsdets` uses it for a whole flow).
    """
    check_backend(backend)
    if validate:
        if not isinstance(weights, torch.Tensor) or weights.dim() != 5:
            got = tuple(weights.shape) if isinstance(weights, torch.Tensor) else type(weights).__name__
            raise ValueError(f"weights must be a (G, c, c, k, k) tensor of G conv weights, got {got}")
        check_weight(weights[0] if len(weights) else weights.new_zeros(weights.shape[1:]))  # shape, dtype
        if not bool(torch.isfinite(weights).all()):
            raise ValueError("weights hold non-finite values (NaN or inf)")
        _check_size(h, w)
    # Only the blocks distinct up to conjugation (distinct_frequencies): 6% fewer LUs at 32x32,
    # 11% at ConvFlow's 14x14, and the spectrum product is made directly for them (no gather copy).
    G, c, k = weights.shape[0], weights.shape[1], weights.shape[-1]
    if G == 0:
        return weights.flatten(1).sum(1)  # (0,), still attached to weights
    cdtype = _complex_dtype(weights.dtype)
    phases, mult = _distinct_tables(h, w, k, cdtype, weights.device)
    taps = weights.permute(0, 3, 4, 1, 2).reshape(G, k * k, c * c).to(cdtype)  # (G, k^2, c^2)
    blocks = (phases @ taps).view(-1, c, c)  # (G * f', c, c)
    return _LogAbsDet.apply(blocks, mult, backend)


@dataclass
class SpectralFactorization:
    """What a circular conv's inverse needs, computed once per weight and image size.

    ``LU``, ``pivots`` factorize every block (or its real lift, for ``backend="lifted"``),
    ``logabsdet`` is the exact log-determinant, ``norm1`` ``(h*w',)`` the blocks' 1-norms,
    ``weight`` a copy of the weight it was made for (so that :func:`inverse` refuses it for any
    other). :meth:`complete` (done by :func:`factorize` unless ``explicit=False``) forms the
    inverse blocks :math:`A_f^{-1}` ``(h*w', c, c)``, which makes every inverse one batched matrix
    product, and their exact 1-norm ``condition`` numbers.
    """

    LU: torch.Tensor
    pivots: torch.Tensor
    backend: str
    logabsdet: torch.Tensor
    norm1: torch.Tensor
    h: int
    w: int
    weight: torch.Tensor | None = None
    singular: torch.Tensor | None = None
    inverse_blocks: torch.Tensor | None = None
    condition: torch.Tensor | None = None
    _worst: tuple | None = field(default=None, repr=False)

    def matches(self, weight: torch.Tensor) -> bool:
        """True when this factorization was made for exactly ``weight`` (same values, dtype, device)."""
        w = self.weight
        return (w is not None and w.shape == weight.shape and w.dtype == weight.dtype
                and w.device == weight.device and torch.equal(w, weight.detach()))

    def complete(self) -> "SpectralFactorization":
        """Form the explicit inverse blocks and their exact condition numbers (no-op when done)."""
        if self.inverse_blocks is None:
            inverses = _inverse_from_lu(self.LU, self.pivots, self.backend)  # (h*w', c, c)
            condition = self.norm1 * _norm1(inverses.detach())
            condition = torch.where(torch.isfinite(condition), condition, torch.full_like(condition, math.inf))
            if self.singular is not None:
                condition = torch.where(self.singular, torch.full_like(condition, math.inf), condition)
            self.inverse_blocks, self.condition = inverses, condition
        return self

    def solve(self, Yf: torch.Tensor):
        r"""Solve ``A_f X_f = Y_f`` for ``Yf`` ``(h*w', c, B)``; returns ``(Xf, condition)``, both exact.

        ``condition`` ``(h*w',)`` are the exact 1-norm condition numbers of :func:`condition_numbers`.
        """
        self.complete()
        return torch.bmm(self.inverse_blocks, Yf), self.condition

    def worst(self) -> tuple[int, float]:
        """``(index, condition)`` of the worst-conditioned block (computed once: one host sync)."""
        if self._worst is None:
            flat = torch.nan_to_num(self.complete().condition.detach(), nan=math.inf)
            index = int(flat.argmax())
            self._worst = (index, float(flat[index]))
        return self._worst

    def check_invertible(self, max_condition: float | None = None) -> None:
        r"""Raise :class:`NotInvertibleError` if a block's condition number exceeds the limit.

        The limit is :func:`condition_limit` unless ``max_condition`` is given. The condition
        numbers come from the computed inverse :math:`\hat X`; with a backward-stable inverse
        (columnwise :math:`(A + \Delta A_j)\hat x_j = e_j`, :math:`\|\Delta A_j\|_1 \le \gamma\|A\|_1`)
        :math:`\hat\kappa \ge \kappa / (1 + \gamma\kappa)`, so every block whose true condition
        number exceeds the limit by more than that rounding margin is refused, whatever its
        structure.
        """
        dtype = self.norm1.dtype
        limit = condition_limit(dtype) if max_condition is None else max_condition
        index, cond = self.worst()
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
              explicit: bool = True, validate: bool = True) -> SpectralFactorization:
    """Factorize every Fourier block once (LU) and, unless ``explicit=False``, form the inverse blocks.

    Differentiable in ``weight`` (the inverse blocks and ``logabsdet``).
    """
    check_backend(backend)
    blocks = spectrum(weight, h, w, validate)  # (h, w', c, c)
    c = blocks.shape[-1]
    blocks = blocks.reshape(-1, c, c)
    LU, pivots, info = _lu(blocks, backend)  # (h*w', n, n)
    norm1, scale = _norm1_and_entry_scale(blocks.detach())  # blocks are complex for both backends
    lad = _block_logabsdet(LU, scale, backend)
    mult = _multiplicity_table(h, w, weight.dtype, weight.device)
    fact = SpectralFactorization(LU, pivots, backend, (lad * mult).sum(), norm1, h, w,
                                 weight=weight.detach().clone(), singular=(lad.detach() == -math.inf) | (info > 0))
    return fact.complete() if explicit else fact


def inverse(
    y: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    backend: str = "complex",
    factorization: SpectralFactorization | None = None,
    max_condition: float | None = None,
    validate: bool = True,
) -> torch.Tensor:
    """The ``x`` with ``circular_conv(x, weight, bias) = y``: equation (1) of the paper.

    Pass a ``factorization`` from :func:`factorize` to reuse it across calls; one made for another
    weight or image size is refused. Raises :class:`NotInvertibleError` (naming the worst frequency
    and its exact condition number, :func:`condition_numbers`) when a block's condition number
    exceeds ``max_condition`` (default :func:`condition_limit`), instead of returning a wrong
    answer. A batch of 0 images gives an empty result.
    """
    if validate:
        _check_pair(y, weight, bias, "y")
        check_backend(backend)
    h, w = y.shape[-2:]
    if factorization is None:
        factorization = factorize(weight, h, w, backend, validate=False)
    elif validate:
        _check_factorization(factorization, weight, h, w)
    factorization.check_invertible(max_condition)
    return _apply(factorization.complete().inverse_blocks, y, bias, inverse=True)


def _check_factorization(fact: SpectralFactorization, weight: torch.Tensor, h: int, w: int) -> None:
    if not isinstance(fact, SpectralFactorization):
        raise TypeError(f"factorization must come from iconv.fourier.factorize, got {type(fact).__name__}")
    if (fact.h, fact.w) != (h, w):
        raise ValueError(f"factorization is for {fact.h}x{fact.w} images, y is {h}x{w}")
    if not fact.matches(weight):
        raise ValueError("factorization was made for another weight (or dtype/device) than the one given; "
                         "call iconv.fourier.factorize(weight, h, w) again")


@torch.no_grad()
def condition_numbers(weight: torch.Tensor, h: int, w: int, backend: str = "complex") -> torch.Tensor:
    r"""The per-frequency condition numbers :math:`\kappa(A_f) = \|A_f\|_1 \|A_f^{-1}\|_1`: ``(h, w // 2 + 1)``.

    The one definition iconv uses everywhere (the singularity rule of :func:`inverse`, the layers'
    and models' diagnostics): 1-norms with moduli :math:`|\Re z| + |\Im z|`, from the explicit
    inverse blocks; ``inf`` for a block singular to working precision.
    """
    return factorize(weight, h, w, backend, explicit=True).condition.view(h, w // 2 + 1)
