"""Independent references shared by the tests."""
import math

import torch

from iconv.core.circular import dense_conv_matrix


def dense_apply(weight, x):
    """Apply the circular conv through its dense matrix: ``(B, c, h, w)``."""
    h, w = x.shape[-2:]
    M = dense_conv_matrix(weight, h, w)
    return (x.reshape(x.shape[0], -1) @ M.T).reshape(x.shape)


def dense_logabsdet(weight, h, w):
    return torch.linalg.slogdet(dense_conv_matrix(weight, h, w))[1]


def relerr(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def random_weight(c, k, dtype=torch.float64, identity=1.0):
    """A random kernel plus ``identity`` at the centre tap (keeps random draws away from singular)."""
    w = torch.randn(c, c, k, k, dtype=dtype) / (c * k)
    w[:, :, k // 2, k // 2] += identity * torch.eye(c, dtype=dtype)
    return w


def probe_signs(n):
    """The fixed sign probe of iconv 0.2's one-step condition estimate (reproduced to defeat it)."""
    return torch.sign(torch.sin(torch.arange(1, n + 1, dtype=torch.float64) * 12.9898) + 1e-12)


def norm1(M):
    """1-norm with the moduli ``|Re| + |Im|`` that :func:`iconv.fourier.condition_numbers` uses."""
    return (M.real.abs() + M.imag.abs()).sum(-2).amax(-1) if M.is_complex() else M.abs().sum(-2).amax(-1)


def condition1(M):
    """The 1-norm condition number of one matrix, in float64 / complex128, from ``torch.linalg.inv``."""
    M = M.to(torch.complex128 if M.is_complex() else torch.float64)
    return (norm1(M) * norm1(torch.linalg.inv(M))).item()


def adversarial_weight(c, condition, dtype=torch.float64, kind="probe", w=6):
    r"""A 3x3 weight whose Fourier blocks at one column of frequencies are a chosen near-singular ``N``.

    ``W[centre] = I`` and ``W[1, 2] = D`` (one tap to the right): the block at horizontal frequency
    ``v`` is :math:`A = I + D e^{i\theta}`, :math:`\theta = 2\pi v / w`. ``D`` is chosen so that at
    ``v0`` the block is ``N`` with a tiny singular value ``1/condition`` in a direction chosen
    against condition estimators:

    * ``kind="probe"``: ``v0 = w/2`` (real block ``N = I - D``), ``N = I - (1 - delta) v v^T`` with
      ``v`` orthogonal to the fixed sign probe and zero at the coordinate Hager's step then picks:
      a one-step estimate with that probe sees condition about 1;
    * ``kind="complex"``: ``v0 = 1``, a genuinely complex block :math:`N = I + R e^{i\theta_0}` whose
      real ``R`` (orthogonal times a 2x2 rotation-scaling block) gives ``N`` the eigenvalue ``delta``
      on a random complex direction.

    Returns ``(weight, v0, true)``, ``true`` the exact 1-norm condition number of ``N`` (float64).
    """
    delta = 1.0 / condition
    eye = torch.eye(c, dtype=torch.float64)
    if kind == "probe":
        r = probe_signs(c)
        v = torch.zeros(c, dtype=torch.float64)
        v[1], v[2] = r[2], -r[1]  # v . r = 0 and v[0] = 0
        v = v / v.norm()
        N = eye - (1 - delta) * torch.outer(v, v)
        D = eye - N  # I + D e^{i pi} = N at v0 = w / 2
        v0, block = w // 2, N.to(torch.complex128)
    elif kind == "complex":
        v0 = 1
        theta = 2 * math.pi * v0 / w
        q, _ = torch.linalg.qr(torch.randn(c, c, dtype=torch.float64))
        lam = -(1 - delta) * complex(math.cos(-theta), math.sin(-theta))  # lam e^{i theta} = -(1 - delta)
        core = 0.3 * torch.eye(c, dtype=torch.float64)
        core[:2, :2] = torch.tensor([[lam.real, -lam.imag], [lam.imag, lam.real]], dtype=torch.float64)
        D = q @ core @ q.T
        block = eye.to(torch.complex128) + D.to(torch.complex128) * complex(math.cos(theta), math.sin(theta))
    else:
        raise ValueError(kind)
    weight = torch.zeros(c, c, 3, 3, dtype=torch.float64)
    weight[:, :, 1, 1] = eye
    weight[:, :, 1, 2] = D
    return weight.to(dtype), v0, condition1(block)
