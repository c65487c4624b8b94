"""The Glow-style baseline: its layers by hand, its structure, equal parameter count, errors.

The contract (round trip, log-determinant against the autograd Jacobian, batch independence,
dtype) of GlowBaseline, Invertible1x1Conv and AffineCoupling is checked in tests/test_protocol.py.
"""
import pytest
import torch
import torch.nn.functional as F

from iconv.layers import (ActNorm, AffineCoupling, Invertible1x1Conv, InvertibleSequential, LogitTransform,
                          MultiScale, Squeeze)
from iconv.models import ConvFlow, GlowBaseline
from iconv.models.glow import glow_step, matching_hidden_width


def test_invertible_1x1_conv_by_hand():
    torch.manual_seed(0)
    layer = Invertible1x1Conv(4).double()
    with torch.no_grad():
        layer.weight.add_(0.3 * torch.randn(4, 4, dtype=torch.float64))
    x = torch.randn(2, 4, 3, 5, dtype=torch.float64)
    y, lad = layer(x)
    torch.testing.assert_close(y, torch.einsum("oc,bchw->bohw", layer.weight, x))
    torch.testing.assert_close(lad, (15 * torch.linalg.det(layer.weight).abs().log()).expand(2))


def test_affine_coupling_starts_as_a_fixed_scaling_and_is_the_documented_map():
    torch.manual_seed(0)
    layer = AffineCoupling(4, hidden=5).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y, lad = layer(x)
    s0 = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))  # the zero-initialised net gives scale sigmoid(2)
    assert torch.allclose(y[:, :2], x[:, :2]) and torch.allclose(y[:, 2:], x[:, 2:] * s0)
    with torch.no_grad():
        layer.net[-1].weight.normal_(0, 0.2)
    y, lad = layer(x)
    h = layer.net(x[:, :2])
    shift, scale = h[:, 0::2], torch.sigmoid(h[:, 1::2] + 2)
    torch.testing.assert_close(y[:, 2:], (x[:, 2:] + shift) * scale)
    torch.testing.assert_close(lad, scale.log().sum((1, 2, 3)))
    with pytest.raises(ValueError, match="at least 2 channels"):
        AffineCoupling(1, 4)


def test_glow_is_built_from_the_containers():
    flow = GlowBaseline((1, 8, 8), depth=2, hidden=4)
    logit, multiscale = flow.net
    assert isinstance(logit, LogitTransform) and isinstance(multiscale, MultiScale)
    assert multiscale.factor_out == [2, 4] and flow.latent_shape == (64, 1, 1)
    for level in multiscale.levels:
        assert isinstance(level[0], Squeeze) and len(level) == 3
        assert [type(m) for m in level[1]] == [ActNorm, Invertible1x1Conv, AffineCoupling]
    assert [type(m) for m in glow_step(4, 3)] == [ActNorm, Invertible1x1Conv, AffineCoupling]
    assert isinstance(glow_step(4, 3), InvertibleSequential)
    x = torch.rand(2, 1, 8, 8)
    z, _ = flow(x)
    h0, _ = multiscale.levels[0](logit(x)[0])
    torch.testing.assert_close(z.reshape(2, 64, 1, 1)[:, 32:], F.pixel_unshuffle(h0[:, :2], 4))


def test_glow_api_matches_convflow():
    torch.manual_seed(0)
    flow = GlowBaseline((1, 4, 4), depth=1, hidden=4)
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    assert flow.bits_per_dim(images).shape == (5,)
    assert flow.sample(3, temperature=0.5).shape == (3, 1, 4, 4)
    assert flow.log_prob(torch.rand(2, 1, 4, 4)).shape == (2,)
    assert GlowBaseline(**flow.arguments).arguments == flow.arguments
    flow.check_invertible()  # no circular convs: nothing to check


def test_matching_parameter_count_within_five_percent():
    for depth, kernel in [(4, 3), (8, 3)]:
        target = ConvFlow((1, 28, 28), depth=depth, kernel_size=kernel).num_parameters()
        hidden = matching_hidden_width((1, 28, 28), target, depth=4)
        got = GlowBaseline((1, 28, 28), depth=4, hidden=hidden).num_parameters()
        assert abs(got - target) / target < 0.05, (target, got)


def test_glow_bad_inputs():
    flow = GlowBaseline((1, 4, 4), depth=1, hidden=4)
    with pytest.raises(ValueError, match="even"):
        GlowBaseline((1, 5, 4))
    with pytest.raises(ValueError, match="depth must be a positive int"):
        GlowBaseline((1, 4, 4), depth=0)
    with pytest.raises(ValueError, match=r"scales must be an int in 1\.\.2"):
        GlowBaseline((1, 4, 4), scales=3)
    with pytest.raises(ValueError, match=r"shape \(B, 1, 4, 4\)"):
        flow(torch.rand(2, 3, 4, 4))
    with pytest.raises(TypeError, match="uint8"):
        flow.bits_per_dim(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        flow.inverse(torch.zeros(1, 17))


def test_overflowing_inverse_gets_a_clear_error():
    torch.manual_seed(0)
    flow = GlowBaseline((1, 4, 4), depth=1, hidden=4)
    coupling = next(m for m in flow.modules() if isinstance(m, AffineCoupling))
    with torch.no_grad():
        coupling.net[-1].bias.fill_(-200.0)  # scales sigmoid(-198): 1/s overflows float32
    with pytest.raises(FloatingPointError, match="GlowBaseline.inverse overflowed"):
        flow.inverse(torch.ones(2, 16))
