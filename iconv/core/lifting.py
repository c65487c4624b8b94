r"""Complex linear algebra with real matrices: the lifting :math:`\phi`.

The paper (Finzi et al., 2019, "Fast Inverses and Logdets") maps a complex matrix to a real one
of twice the size,

.. math::  \phi(A + iB) = I \otimes A + J \otimes B = \begin{pmatrix} A & -B \\ B & A \end{pmatrix},
           \qquad J = \begin{pmatrix} 0 & -1 \\ 1 & 0 \end{pmatrix},

an injective ring homomorphism (:math:`\phi(CV) = \phi(C)\phi(V)`,
:math:`\phi(C^{-1}) = \phi(C)^{-1}`) with :math:`|\det \phi(C)| = |\det C|^2`, so that

.. math::  \log|\det C| = \tfrac12 \log|\det \phi(C)|.

A complex vector :math:`x = a + ib` lifts to the stacked real vector :math:`(a; b)`, and
:math:`\phi(C)(a; b)` is the lift of :math:`Cx`; so a complex system :math:`Cx = y` is the real
system :math:`\phi(C)(a; b) = (\Re y; \Im y)`.

Everything here is batched over leading dimensions and differentiable.
"""
from __future__ import annotations

import torch

from .threads import safe_factorization_threads


def _check_complex_square(C: torch.Tensor, name: str = "C") -> None:
    if not C.is_complex():
        raise TypeError(f"{name} must be a complex tensor (..., n, n), got dtype {C.dtype}")
    if C.dim() < 2 or C.shape[-1] != C.shape[-2]:
        raise ValueError(f"{name} must be a batch of square matrices (..., n, n), got shape {tuple(C.shape)}")


def lift(C: torch.Tensor) -> torch.Tensor:
    """Map complex ``(..., n, n)`` to the real ``(..., 2n, 2n)`` matrix ``[[A, -B], [B, A]]``."""
    _check_complex_square(C)
    A, B = C.real, C.imag
    top = torch.cat([A, -B], dim=-1)  # (..., n, 2n)
    bottom = torch.cat([B, A], dim=-1)  # (..., n, 2n)
    return torch.cat([top, bottom], dim=-2)  # (..., 2n, 2n)


def unlift(M: torch.Tensor, check: bool = True) -> torch.Tensor:
    """Inverse of :func:`lift`: read ``A + iB`` off a real ``(..., 2n, 2n)`` matrix ``[[A, -B], [B, A]]``.

    With ``check`` (default) a matrix that is not of that form raises instead of being silently
    misread.
    """
    if M.is_complex() or M.dim() < 2 or M.shape[-1] != M.shape[-2] or M.shape[-1] % 2:
        raise ValueError(f"M must be real with shape (..., 2n, 2n), got dtype {M.dtype}, shape {tuple(M.shape)}")
    n = M.shape[-1] // 2
    A, B = M[..., :n, :n], M[..., n:, :n]
    if check:
        scale = M.abs().amax().clamp_min(1)
        tol = 100 * torch.finfo(M.dtype).eps * scale
        if (M[..., n:, n:] - A).abs().amax() > tol or (M[..., :n, n:] + B).abs().amax() > tol:
            raise ValueError("M is not the lift of a complex matrix: expected the block form [[A, -B], [B, A]]")
    return torch.complex(A, B)


def lift_vector(y: torch.Tensor) -> torch.Tensor:
    """Complex ``(..., n, m)`` right-hand sides to real ``(..., 2n, m)``: real parts over imaginary parts."""
    return torch.cat([y.real, y.imag], dim=-2)


def unlift_vector(z: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`lift_vector`."""
    n = z.shape[-2] // 2
    return torch.complex(z[..., :n, :], z[..., n:, :])


def logabsdet(C: torch.Tensor) -> torch.Tensor:
    r"""``log|det C|`` for complex ``(..., n, n)``, computed as :math:`\frac12\log|\det\phi(C)|` (real LU)."""
    M = lift(C)
    with safe_factorization_threads(M):
        LU, _, _ = torch.linalg.lu_factor_ex(M)
    return 0.5 * LU.diagonal(dim1=-2, dim2=-1).abs().log().sum(-1)


def solve(C: torch.Tensor, B: torch.Tensor) -> torch.Tensor:
    """Solve ``C X = B`` (complex, batched; ``B`` is ``(..., n, m)`` or ``(..., n)``) via the lifted real system."""
    _check_complex_square(C)
    vector = B.dim() == C.dim() - 1
    rhs = B.unsqueeze(-1) if vector else B
    if rhs.shape[-2] != C.shape[-1]:
        raise ValueError(f"B has {rhs.shape[-2]} rows, expected {C.shape[-1]} to match C {tuple(C.shape)}")
    M = lift(C)
    with safe_factorization_threads(M):
        LU, pivots, _ = torch.linalg.lu_factor_ex(M)
    X = unlift_vector(torch.linalg.lu_solve(LU, pivots, lift_vector(rhs.to(C.dtype))))
    return X.squeeze(-1) if vector else X
