"""Input validation shared by every layer: clear errors instead of silent wrong answers."""
from __future__ import annotations

import torch


def check_image(x: torch.Tensor, name: str = "input", channels: int | None = None) -> None:
    """Raise if ``x`` is not a finite ``(B, C, H, W)`` floating tensor with ``channels`` channels."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor of shape (B, C, H, W), got {type(x).__name__}")
    if x.dim() != 4:
        raise ValueError(
            f"{name} must have 4 dimensions (B, C, H, W), got {x.dim()} dimensions with shape {tuple(x.shape)}"
        )
    if not x.is_floating_point():
        raise TypeError(f"{name} must be a floating tensor (float32 or float64), got dtype {x.dtype}")
    if channels is not None and x.shape[1] != channels:
        raise ValueError(f"{name} has {x.shape[1]} channels (shape {tuple(x.shape)}), expected {channels}")
    check_finite(x, name)


def check_finite(x: torch.Tensor, name: str = "input") -> None:
    """Raise if ``x`` holds a NaN or an infinity."""
    if bool(torch.isfinite(x.sum())):  # fast path: any NaN or inf makes the sum non-finite
        return
    if not bool(torch.isfinite(x).all()):  # the sum may also have overflowed: look element by element
        bad = (~torch.isfinite(x)).sum().item()
        raise ValueError(f"{name} holds {bad} non-finite values (NaN or inf); expected finite values")


def check_even_spatial(x: torch.Tensor, name: str = "input") -> None:
    """Raise unless H and W of a ``(B, C, H, W)`` tensor are both even (needed to halve them)."""
    h, w = x.shape[-2:]
    if h % 2 or w % 2:
        raise ValueError(f"{name} has spatial size {h}x{w}; 2x2 invertible downsampling needs even H and W")
