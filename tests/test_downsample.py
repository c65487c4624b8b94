"""Invertible 2x2 downsamplings: round trips, log-determinants, relation to the usual pooling ops."""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from iconv.layers.downsample import AvgDownsample, NNDownsample, Squeeze

LAYERS = [Squeeze, NNDownsample, AvgDownsample]
SETTINGS = settings(max_examples=25, deadline=None)

shapes = st.tuples(
    st.integers(1, 3),  # B
    st.integers(1, 4),  # C
    st.integers(1, 4).map(lambda k: 2 * k),  # H
    st.integers(1, 4).map(lambda k: 2 * k),  # W
)


def expected_logdet(layer, shape):
    b, c, h, w = shape
    return torch.full((b,), -(c * h * w / 4) * math.log(4) if isinstance(layer, AvgDownsample) else 0.0,
                      dtype=torch.float64)


@pytest.mark.parametrize("layer_cls", LAYERS)
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_round_trip_exact_on_dyadic_grid(layer_cls, shape, seed):
    """Inputs on a grid k / 2^10 with |k| < 2^20: every sum, difference and /4 is exact in float64,
    so the round trip must be bit-exact (this pins down the algebra, not just approximately)."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randint(-(2**20), 2**20, shape, generator=g).double() / 2**10
    layer = layer_cls()
    y, logabsdet = layer(x)
    b, c, h, w = shape
    assert y.shape == (b, 4 * c, h // 2, w // 2) and y.dtype == x.dtype
    assert torch.equal(layer.inverse(y), x)
    torch.testing.assert_close(logabsdet, expected_logdet(layer, shape), rtol=1e-15, atol=0)


@pytest.mark.parametrize("layer_cls", LAYERS)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1), scale_exp=st.integers(-20, 20))
def test_round_trip_general_floats(layer_cls, dtype, shape, seed, scale_exp):
    """Arbitrary floats: exact up to a few roundings of the block's largest entry (Squeeze: exact)."""
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(shape, generator=g, dtype=torch.float64) * 10.0**scale_exp).to(dtype)
    layer = layer_cls()
    y, _ = layer(x)
    back = layer.inverse(y)
    if layer_cls is Squeeze:
        assert torch.equal(back, x)
    else:
        block_max = F.max_pool2d(x.abs(), 2).repeat_interleave(2, -2).repeat_interleave(2, -1)  # (B, C, H, W)
        assert bool(((back - x).abs() <= 8 * torch.finfo(dtype).eps * block_max).all())
        y_back, _ = layer(back)
        torch.testing.assert_close(y_back, y, rtol=0, atol=16 * torch.finfo(dtype).eps * x.abs().max().item())


def test_avg_logdet_formula():
    _, logabsdet = AvgDownsample()(torch.zeros(3, 5, 6, 8))
    torch.testing.assert_close(logabsdet, torch.full((3,), -(5 * 6 * 8 / 4) * math.log(4)))


@SETTINGS
@given(shape=shapes, seed=st.integers(0, 2**31 - 1))
def test_relations_to_standard_ops(shape, seed):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(shape, generator=g, dtype=torch.float64)
    c = shape[1]
    assert torch.equal(Squeeze()(x)[0], F.pixel_unshuffle(x, 2))
    nn_y = NNDownsample()(x)[0]
    assert torch.equal(nn_y[:, :c], x[:, :, ::2, ::2])
    torch.testing.assert_close(nn_y[:, c:2 * c], x[:, :, ::2, 1::2] - x[:, :, ::2, ::2], rtol=0, atol=0)
    torch.testing.assert_close(nn_y[:, 2 * c:3 * c], x[:, :, 1::2, ::2] - x[:, :, ::2, ::2], rtol=0, atol=0)
    torch.testing.assert_close(nn_y[:, 3 * c:], x[:, :, 1::2, 1::2] - x[:, :, ::2, ::2], rtol=0, atol=0)
    avg_y = AvgDownsample()(x)[0]
    m = F.avg_pool2d(x, 2)
    torch.testing.assert_close(avg_y[:, :c], m, rtol=1e-15, atol=1e-15)
    torch.testing.assert_close(avg_y[:, c:2 * c], x[:, :, ::2, 1::2] - m, rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(avg_y[:, 3 * c:], x[:, :, 1::2, 1::2] - m, rtol=1e-14, atol=1e-14)


def test_channel_layout_by_hand():
    x = torch.arange(16.0).reshape(1, 1, 4, 4)  # block at top-left: x00=0, x01=1, x10=4, x11=5
    y, _ = NNDownsample()(x)
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]
    y, _ = AvgDownsample()(x)
    assert y[0, :, 0, 0].tolist() == [2.5, -1.5, 1.5, 2.5]
    y, _ = Squeeze()(x)
    assert y[0, :, 0, 0].tolist() == [0.0, 1.0, 4.0, 5.0]


@pytest.mark.parametrize("layer_cls", LAYERS)
def test_gradients_flow(layer_cls):
    x = torch.randn(2, 1, 2, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: layer_cls()(t)[0], (x,))
    y = layer_cls()(x)[0].detach().requires_grad_()
    assert torch.autograd.gradcheck(layer_cls().inverse, (y,))


@pytest.mark.parametrize("layer_cls", LAYERS)
def test_errors(layer_cls):
    layer = layer_cls()
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        layer(torch.zeros(3, 4, 4))
    with pytest.raises(ValueError, match="needs even H and W"):
        layer(torch.zeros(1, 1, 3, 4))
    with pytest.raises(ValueError, match="needs even H and W"):
        layer(torch.zeros(1, 1, 4, 5))
    bad = torch.zeros(1, 1, 4, 4)
    bad[0, 0, 1, 2] = float("nan")
    with pytest.raises(ValueError, match="non-finite"):
        layer(bad)
    with pytest.raises(TypeError, match="floating"):
        layer(torch.zeros(1, 1, 4, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible by 4"):
        layer.inverse(torch.zeros(1, 6, 2, 2))
    with pytest.raises(ValueError, match="must have 4 dimensions"):
        layer.inverse(torch.zeros(4, 2, 2))
    bad = torch.zeros(1, 4, 2, 2)
    bad[0, 3, 1, 1] = float("inf")
    with pytest.raises(ValueError, match="non-finite"):
        layer.inverse(bad)


@pytest.mark.parametrize("layer_cls", LAYERS)
def test_channels_last_round_trip_and_empty_batch(layer_cls):
    layer = layer_cls()
    x = torch.randn(2, 3, 4, 6, dtype=torch.float64).contiguous(memory_format=torch.channels_last)
    y, _ = layer(x)
    back = layer.inverse(y.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(back, x, rtol=0, atol=1e-14)
    y0, ld0 = layer(torch.zeros(0, 3, 4, 6))
    assert y0.shape == (0, 12, 2, 3) and ld0.shape == (0,) and layer.inverse(y0).shape == (0, 3, 4, 6)
