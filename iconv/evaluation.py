r"""Evaluation and diagnostics: test bits/dim and accuracy, the conditioning of every conv,
and how well an invertible classifier recovers its input.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from .core import fourier
from .core.threads import safe_factorization_threads
from .data import INPUT_STD, check_uint8_images, prepare_images
from .layers.conv import InvertibleConv2d
from .models.classifier import ConvNet, ZeroPaddedConv2d
from .models.flow import FlowModel

__all__ = ["conditioning_report", "conditioning_summary", "conv_sizes", "evaluate_accuracy", "evaluate_bits_per_dim",
           "evaluate_classifier", "reconstruction_error", "singular_values", "square_convs"]


@torch.no_grad()
def evaluate_bits_per_dim(model: FlowModel, images: torch.Tensor, batch_size: int = 500, seed: int = 0) -> float:
    """Mean bits/dim of ``uint8`` ``images`` (e.g. the test split), with seeded dequantization noise.

    The noise generator is seeded with ``seed`` so that every evaluation of every model sees the
    same noise (a common random number: differences between models are then less noisy).
    """
    check_uint8_images(images, model.shape)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    total = 0.0
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        total += float(model.bits_per_dim(chunk, generator=gen).double().sum())
    return total / len(images)


@torch.no_grad()
def evaluate_accuracy(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                      batch_size: int = 256) -> float:
    """Fraction of ``images`` (uint8 ``(N, C, H, W)``) classified as ``labels``, in evaluation mode
    (the model's mode is restored after)."""
    if len(images) != len(labels):
        raise ValueError(f"{len(images)} images but {len(labels)} labels")
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    was_training = model.training
    model.eval()
    try:
        correct = 0
        for start in range(0, len(images), batch_size):
            x = prepare_images(images[start : start + batch_size], like=model)
            y = labels[start : start + batch_size].to(x.device)
            correct += int((model(x).argmax(1) == y).sum())
    finally:
        model.train(was_training)
    return correct / len(images)



def square_convs(model: nn.Module):
    """``(name, conv)`` for every square conv of ``model`` (a ConvNet's nine, or any module's)."""
    if isinstance(model, ConvNet):
        yield from model.convs()
        return
    for name, module in model.named_modules():
        if isinstance(module, (InvertibleConv2d, ZeroPaddedConv2d)):
            yield name, module


def conv_sizes(model: nn.Module, sizes) -> dict[str, tuple[int, int]]:
    if isinstance(sizes, dict):
        return {name: tuple(hw) for name, hw in sizes.items()}
    if isinstance(model, ConvNet):
        return model.conv_sizes(sizes)
    if sizes is None:
        out = {}
        for name, conv in square_convs(model):
            if conv.last_size is None:
                raise ValueError(f"give the sizes: conv {name!r} has not seen an input yet")
            out[name] = conv.last_size
        return out
    return {name: tuple(sizes) for name, _ in square_convs(model)}


def singular_values(blocks: torch.Tensor) -> torch.Tensor:
    """Singular values of every block ``(..., c, c)``, descending: ``(..., c)``."""
    with safe_factorization_threads(blocks):
        return torch.linalg.svdvals(blocks)  # (..., c) descending


@torch.no_grad()
def conditioning_report(model: nn.Module, sizes=None) -> list[dict]:
    r"""The worst-conditioned frequency of every conv layer.

    For each square conv (at the size it sees: ``sizes`` is the network's input ``(H, W)``, a dict
    ``{conv name: (h, w)}``, or ``None`` for the last input's), the Fourier blocks :math:`A_f` of
    the circulant with that kernel (:func:`iconv.fourier.spectrum`). Each entry has ``name``,
    ``size``, ``padding``, ``frequency`` (the ``(u, v)`` maximising the per-frequency condition
    number :math:`\kappa_f = \|A_f\|_1 \|A_f^{-1}\|_1` of :func:`iconv.fourier.condition_numbers`,
    the one definition iconv uses, also for the singularity rule of :func:`iconv.fourier.inverse`),
    ``condition`` (that :math:`\kappa_f`), and from the blocks' singular values ``sigma_min``
    (the smallest over all frequencies), ``sigma_max`` (the largest: the conv's operator norm) and
    ``layer_condition = sigma_max / sigma_min`` (the whole conv's 2-norm condition number, which
    bounds how much its inverse can amplify relative error). For zero-padded convs the numbers
    describe the circulant with the same kernel (``padding`` says which), not the zero-padded
    operator.
    """
    report = []
    convs = dict(square_convs(model))
    for name, (h, w) in conv_sizes(model, sizes).items():
        conv = convs[name]
        weight = conv.weight.detach()
        s = singular_values(fourier.spectrum(weight, h, w))  # (h, w//2+1, c)
        kappa = fourier.condition_numbers(weight, h, w)  # (h, w//2+1)
        flat = int(torch.argmax(torch.nan_to_num(kappa, nan=math.inf)))
        u, v = divmod(flat, kappa.shape[1])
        report.append({
            "name": name, "size": (h, w),
            "padding": "circular" if isinstance(conv, InvertibleConv2d) else "zeros",
            "frequency": (u, v), "condition": float(kappa[u, v]),
            "sigma_min": float(s[..., -1].min()), "sigma_max": float(s[..., 0].max()),
            "layer_condition": float(s[..., 0].max() / s[..., -1].min()),
        })
    return report


@torch.no_grad()
def reconstruction_error(model: ConvNet, images: torch.Tensor, batch_size: int = 256) -> dict:
    """How well an invertible :class:`ConvNet` recovers its inputs, in the model's dtype.

    Feeds ``prepare_images(images)`` through ``features`` and ``inverse`` in evaluation mode and
    returns ``{"relative_error": ||x_hat - x|| / ||x|| over all images, "max_relative_error": the
    worst image's, "max_abs_error_grey_levels": the largest pixel error in 0..255 units,
    "padding_residual": the largest recovered value of the zero channels}``.
    """
    was_training = model.training
    model.eval()
    try:
        num = den = 0.0
        worst = worst_abs = residual = 0.0
        for start in range(0, len(images), batch_size):
            x = prepare_images(images[start : start + batch_size], like=model)
            recovered = model.extractor.inverse(model.features(x))  # (B, k, H, W) with the padded channels
            x_hat, pad = recovered[:, : model.in_channels], recovered[:, model.in_channels :]
            diff = (x_hat - x).flatten(1).double()
            ref = x.flatten(1).double()
            num += float(diff.pow(2).sum())
            den += float(ref.pow(2).sum())
            worst = max(worst, float((diff.norm(dim=1) / ref.norm(dim=1).clamp_min(1e-300)).max()))
            worst_abs = max(worst_abs, float(diff.abs().max()) * INPUT_STD * 255)
            residual = max(residual, float(pad.abs().max()) if pad.numel() else 0.0)
    finally:
        model.train(was_training)
    return {"relative_error": math.sqrt(num / den), "max_relative_error": worst,
            "max_abs_error_grey_levels": worst_abs, "padding_residual": residual}


@torch.no_grad()
def conditioning_summary(model: nn.Module, sizes=None) -> dict:
    """:func:`conditioning_report` flattened for a training history: ``condition/<conv>`` (each
    conv's worst per-frequency condition number), ``max_condition`` (their maximum) and
    ``max_layer_condition`` (the largest whole-conv condition number)."""
    report = conditioning_report(model, sizes)
    out = {"max_condition": max(entry["condition"] for entry in report),
           "max_layer_condition": max(entry["layer_condition"] for entry in report)}
    out.update({f"condition/{entry['name']}": entry["condition"] for entry in report})
    return out


@torch.no_grad()
def evaluate_classifier(model: ConvNet, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 256,
                        reconstruct: int = 64) -> dict:
    """The trainer's ``evaluate``: ``test_accuracy``, :func:`conditioning_summary` at the images'
    size, and for an invertible configuration the relative reconstruction error of the first
    ``reconstruct`` images in the model's dtype (``reconstruction_error``)."""
    out = {"test_accuracy": evaluate_accuracy(model, images, labels, batch_size)}
    out.update(conditioning_summary(model, tuple(images.shape[-2:])))
    if isinstance(model, ConvNet) and model.is_invertible and reconstruct:
        out["reconstruction_error"] = reconstruction_error(model, images[:reconstruct], batch_size)["relative_error"]
    return out
