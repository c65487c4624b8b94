r"""Training loss and evaluation for flows that report a *bound* (:class:`iconv.models.PaperFlow`).

A noise-padded flow models :math:`(x, u)`; what it gives for an image :math:`x` is the ELBO
:math:`\mathbb E_u[\log p(x, u) - \log q(u)] \le \log p(x)` (one draw per image: an unbiased
estimate) or the importance-weighted estimate with :math:`K` draws, tighter as :math:`K` grows.
Both are converted to bits/dim with :math:`D = CHW`, the image's dimensions, so they are upper
bounds (in expectation) on an exact flow's bits/dim and may be set beside them, labelled as bounds.

* :func:`paper_flow_loss`: ``loss_fn(model, images, labels) -> (loss, metrics)`` for
  :func:`iconv.train.fit`: the mean bits/dim of the bound (maximises the ELBO);
* :func:`evaluate_bound_and_iw`: held-out bits/dim of the bound and of the importance-weighted
  estimate, with seeded (common) noise.
"""
from __future__ import annotations

import torch

from .data import check_uint8_images, dequantize
from .models.flow import nll_to_bits_per_dim
from .models.paper_flow import PaperFlow

__all__ = ["evaluate_bound_and_iw", "paper_flow_loss"]


def _check_model(model) -> None:
    if not isinstance(model, PaperFlow):
        raise TypeError(f"model must be an iconv.models.PaperFlow (a flow that reports a bound), "
                        f"got {type(model).__name__}")


def _bits(model: PaperFlow, log_prob: torch.Tensor) -> float:
    """Sum over the batch of the bits/dim of ``log_prob`` (nats of images of ``model.image_dim`` dimensions)."""
    return float(nll_to_bits_per_dim(-log_prob, model.image_dim).double().sum())


def paper_flow_loss(model: PaperFlow, images: torch.Tensor, labels=None) -> tuple[torch.Tensor, dict]:
    """Mean bits/dim of the variational bound on a ``uint8`` batch: the loss :func:`iconv.train.fit` takes.

    Minimising it maximises the ELBO. The dequantization and padding noise come from the global
    RNG, which ``fit`` seeds per step (so a resume is exact). ``labels`` are ignored.
    """
    _check_model(model)
    bpd = model.bits_per_dim_bound(images).mean()
    return bpd, {"bits/dim (bound)": bpd.detach()}


@torch.no_grad()
def evaluate_bound_and_iw(model: PaperFlow, images: torch.Tensor, samples: int = 16, batch_size: int = 250,
                          seed: int = 0) -> dict:
    """Mean bits/dim of ``uint8`` ``images`` from the bound and from the ``samples``-draw IW estimate.

    Returns ``{"bits/dim (bound)": ..., "bits/dim (iw K)": ..., "iw samples": K}`` (floats, means over
    the images). Both use one uniform dequantization per image drawn from a generator seeded with
    ``seed`` (the same ``x`` for both estimates and for every model), and padding noise from a
    second seeded generator (the two estimates get different draws). In expectation
    ``bound >= iw >= the true bits/dim``. Evaluation mode is used and the model's mode restored.
    """
    _check_model(model)
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise ValueError(f"samples must be a positive int, got {samples!r}")
    check_uint8_images(images, model.image_shape)
    if len(images) == 0:
        raise ValueError("no images to evaluate")
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    dequant = torch.Generator(device=device).manual_seed(seed)
    noise = torch.Generator(device=device).manual_seed(seed + 1)
    dtype = next(model.parameters()).dtype
    bound = iw = 0.0
    try:
        for start in range(0, len(images), batch_size):
            x = dequantize(images[start:start + batch_size].to(device), generator=dequant, dtype=dtype)
            bound += _bits(model, model.log_prob_bound(x, noise))
            iw += _bits(model, model.importance_weighted_log_prob(x, samples, noise))
    finally:
        model.train(was_training)
    n = len(images)
    return {"bits/dim (bound)": bound / n, f"bits/dim (iw {samples})": iw / n, "iw samples": samples}
