"""iconv.layers.base: the containers (InvertibleSequential, MultiScale), validation at the boundary, Forward.

The protocol every container keeps (round trip, log-determinant against the autograd Jacobian,
batch independence, dtype) is checked in tests/test_protocol.py; here: what the containers
compute, by hand, and their errors.
"""
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from iconv.layers import (ActNorm, AvgDownsample, Forward, InvertibleConv2d, InvertibleModule, InvertibleSequential,
                          MultiScale, NNDownsample, SneakyReLU, Squeeze)
from iconv.layers.base import at_boundary, inside


def randomized(module):
    with torch.no_grad():
        for m in module.modules():
            if isinstance(m, ActNorm):
                m.log_scale.normal_(0, 0.3)
                m.bias.normal_(0, 0.3)
    return module.double()


class RowSqueeze(InvertibleModule):
    """``(C, H, W) -> (2C, H/2, W)``: halves the height only (a level MultiScale cannot pack)."""

    def forward(self, x):
        b, c, h, w = x.shape
        y = x.reshape(b, c, h // 2, 2, w).permute(0, 1, 3, 2, 4).reshape(b, 2 * c, h // 2, w)
        return y, x.new_zeros(b)

    def inverse(self, y):
        b, c2, h, w = y.shape
        return y.reshape(b, c2 // 2, 2, h, w).permute(0, 1, 3, 2, 4).reshape(b, c2 // 2, 2 * h, w)

    def output_shape(self, shape):
        c, h, w = shape
        return 2 * c, h // 2, w


# --------------------------------------------------------------------------- InvertibleSequential


def test_sequential_composes_and_adds_log_determinants():
    torch.manual_seed(0)
    layers = [ActNorm(2), InvertibleConv2d(2, 3), SneakyReLU(0.2), AvgDownsample()]
    seq = randomized(InvertibleSequential(*layers))
    x = torch.randn(3, 2, 4, 6, dtype=torch.float64)
    y, total = seq(x)
    h, expected = x, torch.zeros(3, dtype=torch.float64)
    for layer in seq:
        h, lad = layer(h)
        expected = expected + lad
    assert torch.equal(y, h) and torch.allclose(total, expected, rtol=1e-14, atol=0)
    h = y
    for layer in reversed(seq):  # the inverse runs the layers backwards
        h = layer.inverse(h)
    assert torch.equal(seq.inverse(y), h)
    assert seq.output_shape((2, 4, 6)) == (8, 2, 3) == tuple(y.shape[1:])


def test_sequential_slices_and_empty():
    seq = InvertibleSequential(ActNorm(2), Squeeze(), InvertibleConv2d(8))
    assert isinstance(seq[1:], InvertibleSequential) and len(seq[1:]) == 2 and seq[1:][0] is seq[1]
    empty = InvertibleSequential()
    x = torch.randn(2, 3, 4, 4)
    y, lad = empty(x)
    assert y is x and torch.equal(lad, torch.zeros(2)) and empty.inverse(x) is x and empty.transform(x) is x


def test_sequential_refuses_ordinary_modules():
    with pytest.raises(TypeError, match="layer 1 of InvertibleSequential must be an iconv InvertibleModule, got ReLU"):
        InvertibleSequential(ActNorm(2), nn.ReLU())


def test_validation_happens_once_at_the_boundary():
    conv_first = InvertibleSequential(InvertibleConv2d(2), ActNorm(2))
    nan = torch.full((1, 2, 4, 4), float("nan"))
    with pytest.raises(ValueError, match="x holds 32 non-finite values"):
        conv_first(nan)  # the first layer meets the user's input and checks it
    with pytest.raises(ValueError, match="y has 3 channels"):
        conv_first[::-1].inverse(torch.zeros(1, 3, 4, 4))  # the last layer meets the user's input to inverse
    with pytest.raises(ValueError, match="2x2 invertible downsampling needs even H and W"):
        InvertibleSequential(Squeeze(), InvertibleConv2d(4))(torch.zeros(1, 1, 3, 4))
    # inside a container, a layer trusts its caller: no check, no host synchronisation
    conv_second = InvertibleSequential(RowSqueeze(), InvertibleConv2d(4))  # RowSqueeze checks nothing
    y, _ = conv_second(nan)
    assert torch.isnan(y).all()
    with inside():
        assert torch.isnan(InvertibleConv2d(2)(nan)[0]).all()


def test_at_boundary_and_inside():
    assert at_boundary()
    with inside():
        assert not at_boundary()
        with inside():
            assert not at_boundary()
        assert not at_boundary()
    assert at_boundary()
    with pytest.raises(RuntimeError):
        with inside():
            raise RuntimeError
    assert at_boundary()  # restored after an exception


def test_forward_adapter():
    torch.manual_seed(0)
    conv = InvertibleConv2d(3)
    x = torch.randn(2, 3, 5, 5)
    assert torch.equal(Forward(conv)(x), conv(x)[0])
    assert torch.equal(nn.Sequential(Forward(conv), nn.ReLU())(x), conv(x)[0].relu())


# --------------------------------------------------------------------------- MultiScale


def three_levels():
    torch.manual_seed(0)
    return randomized(MultiScale([InvertibleSequential(ActNorm(2), InvertibleConv2d(2)),
                                  InvertibleSequential(Squeeze(), InvertibleConv2d(4)),
                                  InvertibleSequential(NNDownsample(), ActNorm(4))],
                                 factor_out=[1, 3], in_channels=2))


def test_multiscale_by_hand():
    """Levels with the first channels set aside; output [last, S(z1), S(z0)] packed at the last level's size."""
    ms = three_levels()
    x = torch.randn(3, 2, 8, 4, dtype=torch.float64)
    y, lad = ms(x)
    g0, g1, g2 = ms.levels
    h0, l0 = g0(x)  # (B, 2, 8, 4)
    h1, l1 = g1(h0[:, 1:])  # (B, 4, 4, 2) from the last channel
    h2, l2 = g2(h1[:, 3:])  # (B, 4, 2, 1)
    expected = torch.cat([h2, F.pixel_unshuffle(h1[:, :3], 2), F.pixel_unshuffle(h0[:, :1], 4)], 1)
    assert y.shape == (3, 4 + 12 + 16, 2, 1) and ms.output_shape((2, 8, 4)) == (32, 2, 1) and ms.out_channels == 32
    assert torch.equal(y, expected) and torch.allclose(lad, l0 + l1 + l2, rtol=1e-14, atol=0)
    assert ms.level_shapes((2, 8, 4)) == [(2, 8, 4), (1, 8, 4), (1, 4, 2)]
    assert torch.equal(ms.transform(x), y)
    torch.testing.assert_close(ms.inverse(y), x, rtol=1e-12, atol=1e-12)


def test_multiscale_with_one_level_is_the_level():
    torch.manual_seed(0)
    level = randomized(InvertibleSequential(ActNorm(3), InvertibleConv2d(3)))
    ms = MultiScale([level], factor_out=[], in_channels=3)
    x = torch.randn(2, 3, 3, 5, dtype=torch.float64)
    assert torch.equal(ms(x)[0], level(x)[0]) and ms.output_shape((3, 3, 5)) == (3, 3, 5)


def test_multiscale_construction_errors():
    seq = InvertibleSequential
    with pytest.raises(ValueError, match="at least one level"):
        MultiScale([], [], in_channels=1)
    with pytest.raises(ValueError, match=r"one channel count per split between the 2 levels \(1\), got \[1, 1\]"):
        MultiScale([seq(), seq(Squeeze())], [1, 1], in_channels=2)
    with pytest.raises(ValueError, match="positive channel counts"):
        MultiScale([seq(), seq(Squeeze())], [0], in_channels=2)
    with pytest.raises(ValueError, match="level 0 of MultiScale outputs 2 channels; it cannot set aside 2"):
        MultiScale([seq(), seq(Squeeze())], [2], in_channels=2)
    with pytest.raises(TypeError, match="level 1 of MultiScale must be an iconv InvertibleModule, got Conv2d"):
        MultiScale([seq(), nn.Conv2d(1, 1, 1)], [1], in_channels=2)
    with pytest.raises(ValueError, match="in_channels of MultiScale must be positive"):
        MultiScale([seq()], [], in_channels=0)
    with pytest.raises(ValueError, match="cannot be packed at the last level's"):
        MultiScale([seq(), RowSqueeze()], [1], in_channels=2)


def test_multiscale_input_errors():
    ms = three_levels()
    with pytest.raises(ValueError, match="x has 3 channels"):
        ms(torch.zeros(1, 3, 8, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match="even H and W"):
        ms(torch.zeros(1, 2, 6, 6, dtype=torch.float64))  # the second level's squeeze meets 3x3
    with pytest.raises(ValueError, match="y has 31 channels.*expected 32"):
        ms.inverse(torch.zeros(1, 31, 2, 1, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"samples of shape \(2, H, W\)"):
        ms.output_shape((3, 8, 4))
