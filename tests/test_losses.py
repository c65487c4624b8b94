"""iconv.losses: the flow's bits/dim loss, the classifier's cross-entropy, the spectral penalty, make_loss."""
import math

import pytest
import torch
import torch.nn.functional as F

from iconv.core.circular import dense_conv_matrix
from iconv.data import prepare_images
from iconv.evaluation import conditioning_report
from iconv.losses import classification_loss, flow_loss, make_loss, spectral_penalty
from iconv.models import ConvFlow, ConvNet


def tiny_images(n=32, channels=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def test_flow_loss_is_the_mean_bits_per_dim():
    torch.manual_seed(0)
    flow = ConvFlow((1, 4, 4), depth=1)
    images = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    torch.manual_seed(3)
    loss, metrics = flow_loss(flow, images)
    torch.manual_seed(3)
    by_hand = flow.bits_per_dim(images).mean()
    assert loss.dim() == 0 and loss.requires_grad and metrics["bits/dim"] == pytest.approx(loss.item())
    assert loss.item() == pytest.approx(by_hand.item(), rel=1e-6)


def test_classification_loss_is_cross_entropy():
    images, labels = tiny_images(20)
    torch.manual_seed(0)
    net = ConvNet(1, 10, 4).eval()
    loss, metrics = classification_loss(net, images, labels)
    logits = net(prepare_images(images))
    assert loss.item() == pytest.approx(F.cross_entropy(logits, labels).item(), rel=1e-6)
    assert metrics["acc"] == pytest.approx((logits.argmax(1) == labels).float().mean().item())
    assert math.isfinite(loss.item())


def spectral_penalty_by_hand(weight, h, w, floor):
    """The penalty of one conv from the dense matrix: its singular values are the Fourier blocks' (all hw)."""
    s = torch.linalg.svdvals(dense_conv_matrix(weight, h, w))  # every sigma_i(A_f) over all h*w frequencies
    r = s / s.max()
    return ((torch.relu(floor - r) / floor) ** 2).sum() / (h * w)


def test_spectral_penalty_is_zero_when_well_conditioned_and_repairs_a_bad_conv():
    net = ConvNet(1, 10, 4, padding="circular", activation="sneaky", downsample="nn", init_scale=0.1).double()
    assert spectral_penalty(net, (8, 8), floor=0.01).item() == 0.0
    conv = dict(net.convs())["stage1.block2"]
    with torch.no_grad():  # make one frequency nearly singular: a kernel that sums to ~0 on one direction
        conv.weight[:, 0] = 0.0
        conv.weight[0, 0, 1, 1] = 1e-3
    before = conditioning_report(net, (8, 8))[1]["layer_condition"]
    assert before > 100
    penalty = spectral_penalty(net, (8, 8), floor=0.2)
    assert penalty.item() > 0
    optimizer = torch.optim.SGD([conv.weight], lr=0.05)
    for _ in range(30):
        optimizer.zero_grad()
        spectral_penalty(net, (8, 8), floor=0.2).backward()
        optimizer.step()
    after = conditioning_report(net, (8, 8))[1]["layer_condition"]
    assert after < before / 5
    with pytest.raises(ValueError, match="floor must lie strictly between 0 and 1"):
        spectral_penalty(net, (8, 8), floor=2.0)


def test_spectral_penalty_matches_the_dense_matrix():
    torch.manual_seed(0)
    net = ConvNet(1, 10, 4, padding="circular", activation="sneaky", downsample="nn", init_scale=1.5).double()
    penalty = spectral_penalty(net, (8, 4), floor=0.5)
    sizes = net.conv_sizes((8, 4))
    by_hand = sum(spectral_penalty_by_hand(conv.weight.detach(), *sizes[name], 0.5) for name, conv in net.convs())
    assert by_hand > 0 and penalty.item() == pytest.approx(by_hand.item(), rel=1e-10)


def test_make_loss_reports_the_penalty():
    images, labels = tiny_images(16)
    net = ConvNet(1, 10, 4, padding="circular", activation="sneaky", downsample="avg")
    loss, metrics = make_loss(spectral_weight=1.0, spectral_floor=0.9)(net, images, labels)
    plain, _ = classification_loss(net, images, labels)
    assert metrics["penalty"] > 0 and loss.item() == pytest.approx(plain.item() + metrics["penalty"], rel=1e-5)
    assert "penalty" not in make_loss()(net, images, labels)[1]
    with pytest.raises(ValueError, match="spectral_floor"):
        make_loss(spectral_weight=1.0, spectral_floor=0.0)
    with pytest.raises(ValueError, match="spectral_weight"):
        make_loss(spectral_weight=-1.0)
