r"""The reference algorithms the runtime benchmark compares :mod:`iconv` with, written plainly.

* the paper's route (Finzi et al. 2019): :func:`paper_spectrum` (all :math:`hw` Fourier blocks from
  a two-sided FFT), :func:`paper_inverse` (every block lifted to a real :math:`2c \times 2c` matrix
  and inverted at every call), :func:`paper_logabsdet` (the same lifted full spectrum, LU);
* the dense route: :func:`dense_logabsdet` and :func:`dense_inverse` on the :math:`chw \times chw`
  matrix of the conv (:func:`iconv.dense_conv_matrix`), only where it fits.

Each is tested against :mod:`iconv.fourier` in float64 (``tests/test_bench.py``).
"""
from __future__ import annotations

import torch

from ..core import lifting
from ..core.threads import safe_factorization_threads

__all__ = ["dense_inverse", "dense_logabsdet", "paper_inverse", "paper_logabsdet", "paper_spectrum"]


def paper_spectrum(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    r"""All :math:`hw` Fourier blocks ``(h * w, c, c)`` complex, from a two-sided FFT of the kernel.

    The kernel is flipped and zero-embedded in an ``h x w`` grid (tap ``a`` lands at
    ``(p - a) mod h``, wrapped taps add up), so that its ``fft2`` is
    :math:`\sum_a W[a] e^{+2\pi i \langle f, a - p\rangle/(h, w)} = A_f`, the paper's
    :math:`\mathcal F(W)^*`. Equals :func:`iconv.fourier.spectrum` on the half spectrum.
    """
    c, _, k, _ = weight.shape
    p = k // 2
    taps = torch.arange(k, device=weight.device)
    rows, cols = (p - taps) % h, (p - taps) % w
    where = (rows[:, None] * w + cols[None, :]).reshape(-1)  # (k*k,) flat position of each tap
    grid = weight.new_zeros(c * c, h * w).index_add_(1, where, weight.reshape(c * c, k * k))
    blocks = torch.fft.fft2(grid.view(c, c, h, w))  # (c, c, h, w)
    return blocks.permute(2, 3, 0, 1).reshape(h * w, c, c)  # (h*w, c, c)


def paper_inverse(y: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    r"""The inverse as the paper computed it, everything recomputed at every call.

    Two-sided FFT of ``y``; the full spectrum's :math:`hw` blocks, each lifted to the real
    :math:`2c \times 2c` matrix :math:`\phi(A_f)` and inverted (``torch.linalg.inv``); the lifted
    inverses applied to the lifted coefficients; inverse FFT; real part.
    """
    B, c, h, w = y.shape
    if bias is not None:
        y = y - bias.view(1, -1, 1, 1)
    lifted = lifting.lift(paper_spectrum(weight, h, w))  # (h*w, 2c, 2c)
    with safe_factorization_threads(lifted):
        inverses = torch.linalg.inv(lifted)  # (h*w, 2c, 2c)
    Yf = torch.fft.fft2(y).permute(2, 3, 1, 0).reshape(h * w, c, B)  # (h*w, c, B)
    Xf = lifting.unlift_vector(torch.bmm(inverses, lifting.lift_vector(Yf)))  # (h*w, c, B)
    return torch.fft.ifft2(Xf.reshape(h, w, c, B).permute(3, 2, 0, 1)).real  # (B, c, h, w)


def paper_logabsdet(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    r"""``log|det|`` over the full spectrum of lifted blocks: :math:`\sum_f \tfrac12\log|\det\phi(A_f)|`.

    The paper's cost structure (all :math:`hw` blocks, real :math:`2c \times 2c`), with an exact LU
    where the authors used a Cholesky of :math:`DD^\top` plus jitter. Against ``logdet_lifted``
    (the same LU on the half spectrum) it measures the half-spectrum gain.
    """
    lifted = lifting.lift(paper_spectrum(weight, h, w))  # (h*w, 2c, 2c)
    with safe_factorization_threads(lifted):
        LU, _, _ = torch.linalg.lu_factor_ex(lifted)
    return 0.5 * LU.diagonal(dim1=-2, dim2=-1).abs().log().sum()


def dense_logabsdet(matrix: torch.Tensor) -> torch.Tensor:
    """``log|det|`` of the dense ``chw x chw`` conv matrix (:func:`iconv.dense_conv_matrix`) by LU."""
    return torch.linalg.slogdet(matrix)[1]


def dense_inverse(y: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """Solve the dense ``chw x chw`` system for every image of ``y`` ``(B, c, h, w)`` (LU at every call)."""
    if bias is not None:
        y = y - bias.view(1, -1, 1, 1)
    rhs = y.reshape(y.shape[0], -1).T  # (chw, B)
    return torch.linalg.solve(matrix, rhs).T.reshape(y.shape)
