"""Circular convolution in the spatial domain: the definition, and its dense ``chw x chw`` matrix.

Throughout iconv, "circular conv" with a weight of torch's ``conv2d`` layout ``(c_out, c_in, k, k)``
(odd ``k``) means exactly

    F.conv2d(F.pad(x, (p, p, p, p), mode="circular"), weight, bias),   p = k // 2,

a cross-correlation whose output has the input's spatial size. The dense matrix is the simple,
independent reference every fast route is tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..checks import check_dtype

def check_weight(weight: torch.Tensor) -> None:
    """Raise unless ``weight`` is a finite float32/float64 ``(c, c, k, k)`` tensor with odd ``k`` (one host sync)."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 4:
        shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__
        raise ValueError(f"weight must have shape (c_out, c_in, k, k), got {shape}")
    c_out, c_in, kh, kw = weight.shape
    if kh != kw:
        raise ValueError(f"kernel must be square, got {kh}x{kw} (weight shape {tuple(weight.shape)})")
    if kh % 2 == 0:
        raise ValueError(f"kernel size must be odd so that the output keeps the input's size, got k = {kh}")
    if c_out != c_in:
        raise ValueError(f"an invertible conv maps c channels to c channels; weight has c_out = {c_out}, c_in = {c_in}")
    check_dtype(weight, "weight")
    if not bool(torch.isfinite(weight).all()):
        raise ValueError("weight holds non-finite values (NaN or inf)")


def circular_pad(x: torch.Tensor, p: int) -> torch.Tensor:
    """Wrap ``p <= min(h, w)`` rows and columns around ``x`` ``(B, c, h, w)``.

    ``out[..., i, j] = x[..., (i - p) % h, (j - p) % w]`` for ``i < h + 2p``, ``j < w + 2p``: one
    ``F.pad(mode="circular")``.
    """
    return F.pad(x, (p, p, p, p), mode="circular")


def circular_pad_adjoint(g: torch.Tensor, p: int) -> torch.Tensor:
    r"""The adjoint of :func:`circular_pad`: ``(..., h + 2p, w + 2p) -> (..., h, w)``.

    Every entry of the padded image is a copy of one entry of ``x``, so the adjoint adds each
    border strip onto the entries it copied: the centre, plus the left strip onto the last ``p``
    columns and the right strip onto the first ``p``, then the same for rows. This is the gradient
    of the padding: one clone per axis and four strip additions.
    """
    h, w = g.shape[-2] - 2 * p, g.shape[-1] - 2 * p
    cols = g[..., p:w + p].clone()  # (..., h + 2p, w)
    cols[..., w - p:] += g[..., :p]
    cols[..., :p] += g[..., w + p:]
    out = cols[..., p:h + p, :].clone()  # (..., h, w)
    out[..., h - p:, :] += cols[..., :p, :]
    out[..., :p, :] += cols[..., h + p:, :]
    return out


def circular_conv2d(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The circular conv, computed spatially: ``(B, c, h, w) -> (B, c, h, w)``.

    Needs ``k // 2 <= min(h, w)`` (torch's circular padding wraps at most once); the Fourier route
    :func:`iconv.fourier.conv2d` has no such limit.
    """
    p = weight.shape[-1] // 2
    if p > min(x.shape[-2:]):
        raise ValueError(
            f"spatial circular padding of {p} needs an image of at least {p}x{p}, got {tuple(x.shape[-2:])}; "
            "use iconv.fourier.conv2d, which wraps any kernel"
        )
    return F.conv2d(circular_pad(x, p), weight, bias)


def dense_conv_matrix(weight: torch.Tensor, h: int, w: int) -> torch.Tensor:
    """The ``(c*h*w, c*h*w)`` matrix of the circular conv (no bias), built by convolving the identity.

    Column ``j`` is the conv applied to the ``j``-th basis image, flattened in ``(c, h, w)`` order.
    Costs ``c*h*w`` convolutions: a reference for small sizes, not a fast route.
    """
    check_weight(weight)
    c = weight.shape[1]
    n = c * h * w
    basis = torch.eye(n, dtype=weight.dtype, device=weight.device).reshape(n, c, h, w)  # (n, c, h, w)
    p = weight.shape[-1] // 2
    if p <= min(h, w):
        columns = circular_conv2d(basis, weight)
    else:  # wrap the padding several times: tile the image, then conv without padding
        reps_h, reps_w = -(-p // h), -(-p // w)
        tiled = basis.repeat(1, 1, 2 * reps_h + 1, 2 * reps_w + 1)
        start_h, start_w = reps_h * h - p, reps_w * w - p
        tiled = tiled[:, :, start_h : start_h + h + 2 * p, start_w : start_w + w + 2 * p]
        columns = F.conv2d(tiled, weight)
    return columns.reshape(n, n).T  # (n, n): row = output index, column = input index
