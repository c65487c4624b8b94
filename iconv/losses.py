r"""Training losses: the signature ``loss_fn(model, images, labels) -> (loss, metrics)`` that
:func:`iconv.train.fit` takes.

* :func:`flow_loss`: mean bits/dim of a ``uint8`` batch under a flow (maximum likelihood);
* :func:`classification_loss`: cross-entropy of a classifier;
* :func:`spectral_penalty` and :func:`make_loss`: the classifier's loss plus a penalty that keeps
  every conv's per-frequency singular values away from zero.
"""
from __future__ import annotations

import numbers

import torch
import torch.nn.functional as F
from torch import nn

from .core import fourier
from .data import augment_images, prepare_images
from .evaluation import conv_sizes, singular_values, square_convs
from .models.flow import FlowModel

__all__ = ["classification_loss", "flow_loss", "make_loss", "spectral_penalty"]


def flow_loss(model: FlowModel, images: torch.Tensor, labels=None) -> tuple[torch.Tensor, dict]:
    """The training loss for :func:`iconv.train.fit`: mean bits/dim of a ``uint8`` batch.

    Bits/dim is the negative log-likelihood divided by :math:`D \\ln 2` plus 8, so minimising
    it is maximum likelihood on a scale that does not depend on the image size. The uniform
    dequantization noise comes from the global RNG, which ``fit`` seeds per step.
    """
    bpd = model.bits_per_dim(images).mean()
    return bpd, {"bits/dim": bpd.detach()}


def classification_loss(model: nn.Module, images: torch.Tensor, labels: torch.Tensor,
                        augment: bool = False) -> tuple[torch.Tensor, dict]:
    """Cross-entropy of ``model`` on a batch of uint8 ``images`` ``(B, C, H, W)`` and ``labels`` ``(B,)``.

    Returns ``(loss, {"acc": float})``; ``augment=True`` applies :func:`augment_images` (flip and
    crop) first when the model is in training mode.
    """
    if augment and model.training:
        images = augment_images(images)
    x = prepare_images(images, like=model)  # (B, C, H, W)
    labels = labels.to(x.device)
    logits = model(x)  # (B, classes)
    loss = F.cross_entropy(logits, labels)
    acc = (logits.detach().argmax(1) == labels).float().mean().item()
    return loss, {"acc": acc}


def spectral_penalty(model: nn.Module, sizes=None, floor: float = 0.1) -> torch.Tensor:
    r"""A differentiable penalty that keeps every conv's smallest singular values away from zero.

    For each square conv with Fourier blocks :math:`A_f` at the size it sees (``sizes`` as in
    :func:`iconv.evaluation.conditioning_report`), let :math:`r_{f,i} = \sigma_i(A_f) / \max_{f,j} \sigma_j(A_f)`,
    the singular values relative to the conv's operator norm. The penalty is

    .. math::
        P = \sum_{\text{convs}} \frac{1}{h w} \sum_f m_f \sum_i
            \Bigl(\frac{\max(0,\ \phi - r_{f,i})}{\phi}\Bigr)^2 ,

    (:math:`m_f` counts a half-spectrum column once or twice, so the sum runs over all
    :math:`hw` frequencies), zero while every conv's condition number stays below
    :math:`1/\phi`, and growing as a singular value approaches zero. Relative values matter
    because BatchNorm after each conv undoes any rescaling of its weight: a floor on the raw
    :math:`\sigma` could be met by inflating the weight without improving the condition number.
    The paper's authors also penalised the per-frequency singular values (reproduction notes);
    this hinge is our own form. Add ``weight * spectral_penalty(...)`` to the loss.
    """
    if not (isinstance(floor, numbers.Real) and 0 < floor < 1):
        raise ValueError(f"floor must lie strictly between 0 and 1 (a bound on 1/condition number), got {floor!r}")
    convs = dict(square_convs(model))
    total = None
    for name, (h, w) in conv_sizes(model, sizes).items():
        weight = convs[name].weight
        s = singular_values(fourier.spectrum(weight, h, w))  # (h, w//2+1, c)
        r = s / s.max()
        hinge = (torch.relu(floor - r) / floor).pow(2).sum(-1)  # (h, w//2+1)
        mult = fourier.conjugate_multiplicity(w, device=weight.device).to(hinge.dtype)  # (w//2+1,)
        term = (hinge * mult).sum() / (h * w)
        total = term if total is None else total + term
    if total is None:
        raise ValueError("the model has no square conv to regularise")
    return total


def make_loss(augment: bool = False, spectral_weight: float = 0.0, spectral_floor: float = 0.1):
    """A ``loss_fn(model, images, labels) -> (loss, metrics)`` for :func:`iconv.train.fit`:
    :func:`classification_loss` (with ``augment``) plus ``spectral_weight *``
    :func:`spectral_penalty` ``(model, floor=spectral_floor)`` at the batch's image size; the
    penalty's value is reported as ``metrics["penalty"]`` when it is on."""
    if not (isinstance(spectral_weight, numbers.Real) and spectral_weight >= 0):
        raise ValueError(f"spectral_weight must be a number >= 0, got {spectral_weight!r}")
    if spectral_weight:
        if not (isinstance(spectral_floor, numbers.Real) and 0 < spectral_floor < 1):
            raise ValueError(f"spectral_floor must lie strictly between 0 and 1, got {spectral_floor!r}")

    def loss_fn(model, images, labels):
        loss, metrics = classification_loss(model, images, labels, augment=augment)
        if spectral_weight:
            penalty = spectral_penalty(model, None, spectral_floor)
            loss = loss + spectral_weight * penalty
            metrics["penalty"] = penalty.item()
        return loss, metrics

    return loss_fn
