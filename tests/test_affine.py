"""ActNorm and PixelAffine: round trips, log-determinants, the data-dependent start."""
import math

import pytest
import torch

from iconv.layers import ActNorm, PixelAffine


def random_layer(cls):
    layer = (cls(3) if cls is ActNorm else cls((3, 4, 5))).double()
    with torch.no_grad():
        layer.log_scale.normal_()
        layer.bias.normal_()
    return layer


@pytest.mark.parametrize("cls", [ActNorm, PixelAffine])
def test_round_trip_and_logabsdet_by_the_formula(cls):
    layer = random_layer(cls)
    x = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    y, logabsdet = layer(x)
    torch.testing.assert_close(layer.inverse(y), x, rtol=1e-13, atol=1e-13)
    s = layer.log_scale.detach()
    expected = 20 * s.sum() if cls is ActNorm else s.sum()  # H W sum_c s_c, or the sum over every pixel
    torch.testing.assert_close(logabsdet, expected.expand(2))
    scale = s.exp().view(1, -1, 1, 1) if cls is ActNorm else s.exp()
    torch.testing.assert_close(y, x * scale + (layer.bias.detach().view(1, -1, 1, 1) if cls is ActNorm
                                               else layer.bias.detach()))


@pytest.mark.parametrize("cls", [ActNorm, PixelAffine])
def test_initialize_from_gives_zero_mean_unit_variance(cls):
    layer = cls(3) if cls is ActNorm else cls((3, 4, 5))
    x = 3 + 2 * torch.randn(64, 3, 4, 5)
    layer.initialize_from(x)
    y, _ = layer(x)
    dims = (0, 2, 3) if cls is ActNorm else (0,)
    assert y.mean(dims).abs().max() < 1e-4
    assert (y.std(dims, unbiased=False) - 1).abs().max() < 1e-4


def test_actnorm_only_centres_channels_without_spread():
    layer = ActNorm(2)
    x = torch.randn(8, 2, 4, 4)
    x[:, 1] = 0.7  # no spread in channel 1
    layer.initialize_from(x)
    assert layer.log_scale[1].item() == 0.0
    torch.testing.assert_close(layer(x)[0][:, 1], torch.zeros(8, 4, 4), rtol=0, atol=1e-6)
    assert math.isclose(layer.log_scale[0].item(), -math.log(x[:, 0].std(unbiased=False).item()), rel_tol=1e-5)


@pytest.mark.parametrize("cls", [ActNorm, PixelAffine])
def test_initialize_from_refuses_empty_and_mismatched_batches(cls):
    layer = cls(3) if cls is ActNorm else cls((3, 4, 5))
    with pytest.raises(ValueError, match="at least one"):
        layer.initialize_from(torch.zeros(0, 3, 4, 5))
    with pytest.raises(ValueError, match="channels"):
        layer.initialize_from(torch.zeros(2, 2, 4, 5))
    with pytest.raises(TypeError, match="float64"):
        layer.initialize_from(torch.zeros(2, 3, 4, 5, dtype=torch.float64))
