"""The Glow-style baseline: exact inverse and log-determinant, equal parameter count, errors."""
import math

import pytest
import torch

from iconv.baseline import AffineCoupling, GlowBaseline, Invertible1x1Conv, matching_hidden_width
from iconv.flow import ConvFlow


def layer_logabsdet(layer, x):
    J = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, *x.shape[1:]))[0].reshape(-1), x[0].reshape(-1))
    return torch.linalg.slogdet(J)[1]


def randomize(module):
    """Move every parameter away from its (often identity) start, so the tests see a generic map."""
    with torch.no_grad():
        for p in module.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return module


def test_invertible_1x1_conv():
    torch.manual_seed(0)
    layer = randomize(Invertible1x1Conv(4).double())
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y, lad = layer(x)
    assert torch.allclose(layer.inverse(y), x, atol=1e-12)
    assert torch.allclose(lad[0], layer_logabsdet(layer, x[:1]))


def test_affine_coupling_starts_as_identity_and_inverts():
    torch.manual_seed(0)
    layer = AffineCoupling(4, hidden=5).double()
    x = torch.randn(2, 4, 3, 3, dtype=torch.float64)
    y, lad = layer(x)
    s0 = torch.sigmoid(torch.tensor(2.0, dtype=torch.float64))  # the zero-initialised net gives scale sigmoid(2)
    assert torch.allclose(y[:, :2], x[:, :2]) and torch.allclose(y[:, 2:], x[:, 2:] * s0)
    randomize(layer)
    y, lad = layer(x)
    assert torch.allclose(layer.inverse(y), x, atol=1e-12)
    assert torch.allclose(lad[0], layer_logabsdet(layer, x[:1]))
    with pytest.raises(ValueError, match="at least 2 channels"):
        AffineCoupling(1, 4)


@pytest.mark.parametrize("shape", [(1, 4, 4), (3, 4, 4), (1, 8, 8)])
def test_glow_round_trip_and_logabsdet_float64(shape):
    torch.manual_seed(0)
    flow = randomize(GlowBaseline(shape, depth=2, hidden=6).double())
    x = torch.rand(3, *shape, dtype=torch.float64)
    flow.initialize(x)
    z, lad = flow(x)
    assert z.shape == (3, math.prod(shape))
    assert torch.allclose(flow.inverse(z), x, atol=1e-11)
    J = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, *shape))[0][0], x[0].reshape(-1))
    assert torch.allclose(lad[0], torch.linalg.slogdet(J)[1], atol=1e-9)


def test_glow_api_matches_convflow():
    torch.manual_seed(0)
    flow = GlowBaseline((1, 4, 4), depth=1, hidden=4)
    images = torch.randint(0, 256, (5, 1, 4, 4), dtype=torch.uint8)
    assert flow.bits_per_dim(images).shape == (5,)
    assert flow.sample(3, temperature=0.5).shape == (3, 1, 4, 4)
    assert flow.log_prob(torch.rand(2, 1, 4, 4)).shape == (2,)


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
    with pytest.raises(ValueError, match="positive ints"):
        GlowBaseline((1, 4, 4), depth=0)
    with pytest.raises(ValueError, match=r"shape \(B, 1, 4, 4\)"):
        flow(torch.rand(2, 3, 4, 4))
    with pytest.raises(TypeError, match="uint8"):
        flow.bits_per_dim(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 16\)"):
        flow.inverse(torch.zeros(1, 17))


def test_overflowing_inverse_gets_a_clear_error():
    torch.manual_seed(0)
    flow = GlowBaseline((1, 4, 4), depth=1, hidden=4)
    with torch.no_grad():
        flow.levels[0][0].layers[2].net[-1].bias.fill_(-200.0)  # scales sigmoid(-198): 1/s overflows float32
    with pytest.raises(FloatingPointError, match="overflowed at scale 0"):
        flow.inverse(torch.ones(2, 16))
