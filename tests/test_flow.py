"""ConvFlow and FlowModel: the latent layout, the likelihood and bits/dim, initialisation, errors.

The contract every flow keeps (round trip, log-determinant against the autograd Jacobian, batch
independence, train == eval, dtype and device) is checked once, for every model, in
tests/test_protocol.py.
"""
import contextlib
import math

import pytest
import torch
import torch.nn.functional as F

from iconv import NotInvertibleError
from iconv.data import dequantize
from iconv.layers import ActNorm, InvertibleSequential, LogitTransform, MultiScale, PixelAffine, Squeeze
from iconv.models import ConvFlow, FlowModel
from iconv.models.flow import nll_to_bits_per_dim, standard_normal_log_prob


def tiny_flow(shape, downsample="squeeze", depth=2, kernel_size=3):
    torch.manual_seed(0)
    flow = ConvFlow(shape, depth=depth, kernel_size=kernel_size, downsample=downsample, init_scale=0.3).double()
    flow.initialize(torch.rand(16, *shape, dtype=torch.float64))  # non-trivial ActNorms
    return flow


def test_structure_is_built_from_the_containers():
    flow = ConvFlow((1, 8, 8), depth=1)
    assert isinstance(flow.net, InvertibleSequential) and isinstance(flow.net[-1], MultiScale)
    assert [type(m) for m in flow.net[:3]] == [LogitTransform, PixelAffine, Squeeze]
    assert flow.preprocess is flow.net[0] and flow.net[-1].factor_out == [8, 16]


def test_latent_is_the_packed_multiscale_image_flattened():
    flow = tiny_flow((1, 8, 8))
    x = torch.rand(3, 1, 8, 8, dtype=torch.float64)
    z, logabsdet = flow(x)
    packed, lad = flow.net(x)
    assert packed.shape == (3, *flow.latent_shape) == (3, 64, 1, 1)
    assert torch.equal(z, packed.reshape(3, -1)) and torch.equal(logabsdet, lad)
    # by hand: logit, pixel affine, squeeze, then the levels with the first channels set aside
    h, lad0 = flow.net[:3](x)
    levels = flow.net[-1].levels
    h1, _ = levels[0](h)  # (B, 16, 2, 2)
    h2, _ = levels[1](h1[:, 8:])  # (B, 32, 1, 1)
    h3, _ = levels[2](h2[:, 16:])  # (B, 16, 1, 1)
    expected = torch.cat([h3, h2[:, :16], F.pixel_unshuffle(h1[:, :8], 2)], 1)  # latest part first
    torch.testing.assert_close(z.reshape(3, 64, 1, 1), expected, rtol=1e-13, atol=1e-13)


def test_log_prob_is_prior_plus_logabsdet():
    flow = tiny_flow((1, 4, 4))
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    z, lad = flow(x)
    by_hand = (-0.5 * z**2 - 0.5 * math.log(2 * math.pi)).sum(1) + lad
    assert torch.allclose(flow.log_prob(x), by_hand, atol=1e-12)


def identity_flow(shape):
    """A ConvFlow with no steps whose convs are the identity: only the logit and permutations remain."""
    flow = ConvFlow(shape, depth=0, downsample="squeeze").double()
    with torch.no_grad():
        for conv, _ in flow.convs():
            conv.weight.zero_()
            k = conv.kernel_size // 2
            conv.weight[:, :, k, k] = torch.eye(conv.channels, dtype=torch.float64)
            conv.bias.zero_()
    return flow


def test_bits_per_dim_of_a_known_density_by_hand():
    shape = (1, 4, 4)
    flow = identity_flow(shape)
    images = torch.randint(0, 256, (6, *shape), dtype=torch.uint8)
    # the same noise the flow will draw
    x = dequantize(images, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    a = 0.05
    s = a + (1 - 2 * a) * x
    y = torch.log(s / (1 - s))
    # density of x: standard normal at y = logit(s), times dy/dx = (1 - 2a) / (s (1 - s))
    log_p = (-0.5 * y**2 - 0.5 * math.log(2 * math.pi) + math.log(1 - 2 * a) - torch.log(s * (1 - s))).sum((1, 2, 3))
    expected = (-log_p / 16 + math.log(256)) / math.log(2)
    got = flow.bits_per_dim(images, generator=torch.Generator().manual_seed(3))
    assert torch.allclose(got, expected, atol=1e-12)


def test_uniform_density_is_eight_bits_per_dim():
    class Uniform(FlowModel):
        shape = (1, 2, 2)

        def __init__(self):
            super().__init__()
            self.dummy = torch.nn.Parameter(torch.zeros(()))

        def log_prob(self, x):  # the uniform density on the unit cube
            return x.new_zeros(x.shape[0])

    images = torch.randint(0, 256, (5, 1, 2, 2), dtype=torch.uint8)
    assert torch.allclose(Uniform().bits_per_dim(images), torch.full((5,), 8.0))
    assert nll_to_bits_per_dim(torch.tensor(0.0), 10) == pytest.approx(8.0)


def test_density_integrates_to_one():
    # D = 4, importance sampling: y ~ N(0, s^2 I) in logit space, x = logit^{-1}(y), whose density q(x) is
    # N(y; 0, s^2) |dy/dx|. E_q[p(x) / q(x)] = integral of p over the flow's domain, which must be 1.
    torch.manual_seed(0)
    flow = ConvFlow((1, 2, 2), depth=2, slope=0.5, init_scale=0.3).double()  # slope 0.5: light enough tails
    sigma = 4.0
    y = sigma * torch.randn(100_000, 1, 2, 2, dtype=torch.float64)
    x = flow.preprocess.inverse(y)
    with torch.no_grad():
        log_q = standard_normal_log_prob(y / sigma) - 4 * math.log(sigma) + flow.preprocess(x)[1]
        w = (flow.log_prob(x) - log_q).exp()
    mean, err = w.mean().item(), w.std().item() / math.sqrt(len(w))
    assert err < 0.02 and abs(mean - 1) < 5 * err, (mean, err)


def test_logit_transform_by_hand():
    t = LogitTransform(0.05)
    x = torch.rand(3, 2, 2, 2, dtype=torch.float64)
    y, lad = t(x)
    s = 0.05 + 0.9 * x
    torch.testing.assert_close(y, torch.log(s / (1 - s)), rtol=1e-14, atol=1e-14)
    torch.testing.assert_close(lad, (math.log(0.9) - torch.log(s * (1 - s))).sum((1, 2, 3)), rtol=1e-14, atol=1e-14)
    assert t.margin == pytest.approx(0.05 / 0.9)
    with pytest.raises(ValueError, match="alpha"):
        LogitTransform(0.5)


def test_initialize_is_explicit_and_runs_once():
    torch.manual_seed(0)
    flow = ConvFlow((1, 4, 4), depth=1).double()
    x = torch.rand(32, 1, 4, 4, dtype=torch.float64)
    flow(x)
    assert all(float(m.log_scale.detach().abs().max()) == 0 for m in flow.modules() if isinstance(m, (ActNorm, PixelAffine)))
    flow.initialize(x)
    # every ActNorm now standardises what it receives on this batch: check the first one
    first = next(m for m in flow.modules() if isinstance(m, ActNorm))
    seen = []
    hook = first.register_forward_hook(lambda m, args, out: seen.append(out[0]))
    before = [p.clone() for p in flow.parameters()]
    flow(x)
    hook.remove()
    assert all(torch.equal(a, b) for a, b in zip(before, flow.parameters()))  # later calls change nothing
    torch.testing.assert_close(seen[0].mean((0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-10, rtol=0)
    torch.testing.assert_close(seen[0].std((0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64),
                               atol=1e-5, rtol=0)


def test_actnorm_initialization_and_determinism():
    layer = ActNorm(3).double()
    x = torch.randn(64, 3, 5, 5, dtype=torch.float64) * torch.tensor([1.0, 2.0, 5.0]).view(1, 3, 1, 1).double() + 3
    layer.initialize_from(x)
    y, lad = layer(x)
    assert torch.allclose(y.mean((0, 2, 3)), torch.zeros(3, dtype=torch.float64), atol=1e-10)
    assert torch.allclose(y.std((0, 2, 3), unbiased=False), torch.ones(3, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(lad, torch.full((64,), 25 * layer.log_scale.sum().item(), dtype=torch.float64))
    assert torch.allclose(layer.inverse(y), x)
    # after initialization it is an ordinary layer: same output in train and eval, on any batch
    layer.eval()
    assert torch.equal(layer(x[:5])[0], y[:5])


def test_pixel_affine_initialization_and_logdet():
    layer = PixelAffine((1, 3, 3)).double()
    x = torch.randn(32, 1, 3, 3, dtype=torch.float64) * 2 + 1
    x[:, 0, 0, 0] = 0.5  # a constant pixel: its standard deviation is floored, not 0
    layer.initialize_from(x)
    y, lad = layer(x)
    assert torch.isfinite(y).all() and layer.log_scale[0, 0, 0].item() == pytest.approx(-math.log(0.05))
    assert torch.allclose(y[:, 0, 1:, 1:].mean(0), torch.zeros(2, 2, dtype=torch.float64), atol=1e-12)
    assert torch.allclose(layer.inverse(y), x)
    assert torch.allclose(lad, layer.log_scale.sum().expand(32))
    flow = ConvFlow((1, 4, 4), pixel_affine=False)
    assert not any(isinstance(m, PixelAffine) for m in flow.modules())
    assert ConvFlow((1, 4, 4)).num_parameters() == flow.num_parameters() + 32


def test_sample_shapes_and_temperature():
    flow = tiny_flow((1, 4, 4))
    s = flow.sample(7, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (7, 1, 4, 4) and s.dtype == torch.float64
    zero = flow.sample(2, temperature=0.0)
    assert torch.allclose(zero, flow.inverse(torch.zeros(2, 16, dtype=torch.float64)))


def test_check_invertible_flags_a_singular_conv():
    flow = tiny_flow((1, 4, 4))
    flow.check_invertible()
    assert max(flow.condition_numbers()) < 50  # init_scale=0.3: well conditioned
    with torch.no_grad():
        flow.convs()[1][0].weight.zero_()
    with pytest.raises(NotInvertibleError, match="condition number"):
        flow.check_invertible()


def test_default_architecture_for_common_shapes():
    fm = ConvFlow((1, 28, 28))
    # squeeze: 4x14x14; level 1 ends at 16x7x7 and sets 8 aside; level 2 at 8x7x7
    assert fm.arguments["scales"] == 2 and fm.latent_shape == (16, 7, 7)
    assert fm.net[-1].level_shapes((4, 14, 14)) == [(4, 14, 14), (8, 7, 7)]
    cifar = ConvFlow((3, 32, 32))
    # 12x16x16 -> 48x8x8 (24 aside) -> 96x4x4 (48 aside) -> 48x4x4; parts packed at 4x4: 48 + 48 + 4 * 24
    assert cifar.arguments["scales"] == 3 and cifar.latent_shape == (192, 4, 4)
    assert [size for _, size in cifar.convs()] == [(16, 16)] * 4 + [(8, 8)] * 5 + [(4, 4)] * 6
    assert ConvFlow(**ConvFlow((1, 8, 8), depth=[1, 2, 0]).arguments).arguments["depth"] == [1, 2, 0]


def test_bad_inputs_get_clear_errors():
    flow = tiny_flow((1, 4, 4))
    with pytest.raises(ValueError, match=r"shape \(B, 1, 4, 4\)"):
        flow(torch.rand(2, 1, 8, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="4 dimensions"):
        flow(torch.rand(1, 4, 4, dtype=torch.float64))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        flow(torch.rand(2, 1, 4, 4, dtype=torch.float64) * 255)
    with pytest.raises(TypeError, match="floating"):
        flow(torch.zeros(2, 1, 4, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match="non-finite"):
        flow(torch.full((2, 1, 4, 4), float("nan"), dtype=torch.float64))
    with pytest.raises(TypeError, match="uint8"):
        flow.bits_per_dim(torch.rand(2, 1, 4, 4))
    with pytest.raises(ValueError, match="expected"):
        flow.bits_per_dim(torch.zeros(2, 1, 5, 4, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"z must have shape \(B, 16\)"):
        flow.inverse(torch.zeros(2, 15, dtype=torch.float64))
    with pytest.raises(ValueError, match="even"):
        ConvFlow((1, 7, 7))
    with pytest.raises(ValueError, match="scales"):
        ConvFlow((1, 28, 28), scales=3)
    with pytest.raises(ValueError, match="shape must be"):
        ConvFlow((28, 28))
    with pytest.raises(ValueError, match="downsample"):
        ConvFlow((1, 4, 4), downsample="maxpool")
    with pytest.raises(ValueError, match="depth"):
        ConvFlow((1, 8, 8), depth=[1, 2])
    with pytest.raises(ValueError, match="positive int"):
        flow.sample(0)
    with pytest.raises(ValueError, match=r"takes images of shape \(1, 4, 4\)"):
        flow.output_shape((1, 8, 8))


def test_standard_normal_log_prob():
    z = torch.randn(3, 5, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert torch.allclose(standard_normal_log_prob(z), ref)


def test_training_forward_shares_one_factorization_per_conv_shape(monkeypatch):
    """The likelihood and every gradient are those of per-conv log-determinants, with fewer factorizations."""
    from iconv.core import fourier
    from iconv.layers import conv as conv_module

    flow = tiny_flow((1, 8, 8), depth=3)
    x = torch.rand(4, 1, 8, 8, dtype=torch.float64)
    shapes = {(conv.channels, conv.kernel_size, size) for conv, size in flow.convs()}
    assert len(flow.convs()) == 12 and len(shapes) == 5
    calls = []
    lu = fourier._lu
    monkeypatch.setattr(fourier, "_lu", lambda blocks, backend: calls.append(1) or lu(blocks, backend))
    shared = flow.log_prob(x).sum()
    assert len(calls) == len(shapes)
    shared_grads = torch.autograd.grad(shared, list(flow.parameters()))
    monkeypatch.setattr(conv_module._shared, "table", None)
    monkeypatch.setattr("iconv.models.flow.shared_logabsdets", lambda convs: contextlib.nullcontext())
    calls.clear()
    alone = flow.log_prob(x).sum()
    assert len(calls) == len(flow.convs())
    assert torch.equal(shared, alone)
    for got, expected in zip(shared_grads, torch.autograd.grad(alone, list(flow.parameters()))):
        torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13)


def test_flow_step_folds_the_affine_into_the_conv_inside_a_model():
    """Inside a model: one conv with the folded weight and bias; the same map, log-determinant and
    gradients as the layers called one by one (float64, to rounding); hooks force the layer-by-layer path."""
    from iconv.layers.base import inside
    from iconv.models.flow import FlowStep, flow_step

    torch.manual_seed(0)
    step = flow_step(3, 3, slope=0.2).double()
    with torch.no_grad():
        step[0].log_scale.normal_(0, 0.5)
        step[0].bias.normal_(0, 0.5)
        step[1].bias.normal_(0, 0.5)
    assert isinstance(step, FlowStep)
    x = torch.randn(5, 3, 4, 6, dtype=torch.float64, requires_grad=True)
    seen = []
    with inside():
        folded, folded_lad = step(x)
        assert folded.grad_fn is not None and step[1].last_size == (4, 6)
        handle = step[0].register_forward_hook(lambda m, args, out: seen.append(out[0]))
        layered, layered_lad = step(x)  # the hook must see the affine's output: layer by layer
        handle.remove()
        transformed = step.transform(x)
    assert len(seen) == 1
    reference = InvertibleSequential(*step)(x)  # at the boundary: the layers one by one
    for got in (folded, layered, transformed):
        torch.testing.assert_close(got, reference[0], rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(folded_lad, reference[1], rtol=1e-13, atol=1e-13)
    assert torch.equal(transformed, folded)
    params = [x] + list(step.parameters())
    g = torch.randn_like(folded)
    for got, expected in zip(torch.autograd.grad((folded * g).sum() + folded_lad.sum(), params),
                             torch.autograd.grad((reference[0] * g).sum() + reference[1].sum(), params)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.inverse(folded), x, rtol=1e-12, atol=1e-12)
    with inside():  # a slice of a step is a FlowStep without the affine: it runs layer by layer
        sliced = step[1:](x)
    assert type(step[1:]) is FlowStep
    torch.testing.assert_close(sliced[0], InvertibleSequential(*list(step)[1:])(x)[0], rtol=0, atol=0)
