"""Input validation shared by every layer: clear errors instead of silent wrong answers.

These checks run once, where a user calls in (see :func:`iconv.layers.base.at_boundary`); each costs
at most one pass over the tensor and one host synchronisation.
"""
from __future__ import annotations

import torch

#: The floating dtypes iconv computes in (MKL's FFTs and LAPACK have no half-precision routines).
SUPPORTED_DTYPES = (torch.float32, torch.float64)


def check_dtype(x: torch.Tensor, name: str = "input", dtype: torch.dtype | None = None) -> None:
    """Raise unless ``x`` is a float32/float64 tensor on a real device (and of ``dtype`` when given).

    A meta tensor has no values to compute with; float16/bfloat16 reach routines that do not
    exist for them; a float64 input to a float32 layer would be silently rounded or refused deep
    inside torch. Each gets an error naming the argument, what was expected and what was given.
    """
    if x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape {tuple(x.shape)}, no values); iconv needs real data "
                         "on a CPU or CUDA device")
    if x.dtype not in SUPPORTED_DTYPES:
        kind = "floating" if x.is_floating_point() else "a floating tensor"
        raise TypeError(f"{name} must be {kind} of dtype float32 or float64, got dtype {x.dtype}"
                        + ("; convert with .float()" if x.is_floating_point() else ""))
    if dtype is not None and x.dtype != dtype:
        raise TypeError(f"{name} has dtype {x.dtype} but the layer's parameters are {dtype}; convert the input "
                        f"(.to({dtype})) or the layer (.to({x.dtype}))")


def check_image(x: torch.Tensor, name: str = "input", channels: int | None = None,
                dtype: torch.dtype | None = None) -> None:
    """Raise if ``x`` is not a finite float32/float64 ``(B, C, H, W)`` tensor (``channels``, ``dtype`` when given).

    ``B = 0`` is allowed: every layer maps an empty batch to an empty batch.
    """
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dimensions (B, C, H, W), got {x.dim()} dimensions with shape {tuple(x.shape)}"
        )
    check_dtype(x, name, dtype)
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels (shape {tuple(x.shape)}), expected {channels}")
    check_finite(x, name)


def check_finite(x: torch.Tensor, name: str = "input") -> None:
    """Raise if ``x`` holds a NaN or an infinity (or is a meta tensor, which holds no values)."""
    if x.device.type == "meta":
        raise ValueError(f"{name} is a meta tensor (shape {tuple(x.shape)}, no values); iconv needs real data "
                         "on a CPU or CUDA device")
    if bool(torch.isfinite(x.sum())):  # fast path: any NaN or inf makes the sum non-finite
        return
    if not bool(torch.isfinite(x).all()):  # the sum may also have overflowed: look element by element
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name} holds {bad} non-finite values (NaN or inf); expected finite values")


def check_parameters(module: torch.nn.Module) -> None:
    """Raise if a parameter of ``module`` is non-finite, naming it (one host synchronisation in all)."""
    params = [(n, p) for n, p in module.named_parameters() if p.device.type != "meta"]
    if not params:
        return
    total = torch.stack([p.detach().sum().to(torch.float64) for _, p in params]).sum()
    if bool(torch.isfinite(total)):
        return
    for n, p in params:
        if not bool(torch.isfinite(p.detach()).all()):
            raise ValueError(f"{type(module).__name__}.{n} holds non-finite values (NaN or inf): the layer's "
                             "output would be NaN; re-initialise it or restore a checkpoint")


def check_even_spatial(x: torch.Tensor, name: str = "input") -> None:
    """Raise unless H and W of a ``(B, C, H, W)`` tensor are both even (needed to halve them)."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"{name} has spatial size {h}x{w}; 2x2 invertible downsampling needs even H and W")
