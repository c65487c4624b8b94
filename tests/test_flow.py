"""ConvFlow: exact inverse, exact log-determinant (vs autograd's Jacobian), bits/dim, input errors."""
import math

import pytest
import torch

from iconv import NotInvertibleError, SneakyReLU
from iconv.data import dequantize
from iconv.flow import (ActNorm, ConvFlow, FlowModel, LogitTransform, PixelAffine,
                        evaluate_bits_per_dim, flow_loss, nll_to_bits_per_dim,
                        standard_normal_log_prob)

TINY = [((1, 4, 4), "squeeze"), ((3, 4, 4), "nn"), ((2, 4, 2), "avg"), ((1, 8, 8), "squeeze")]


def tiny_flow(shape, downsample="squeeze", depth=2, kernel_size=3):
    torch.manual_seed(0)
    flow = ConvFlow(shape, depth=depth, kernel_size=kernel_size, downsample=downsample, init_scale=0.3).double()
    flow.initialize(torch.rand(16, *shape, dtype=torch.float64))  # non-trivial ActNorms
    return flow


def jacobian_logabsdet(flow, x):
    """log|det| of the whole flow's Jacobian at each sample, from autograd (an independent reference)."""
    out = []
    for xi in x:
        J = torch.autograd.functional.jacobian(lambda v: flow(v.view(1, *flow.shape))[0][0], xi.reshape(-1))
        out.append(torch.linalg.slogdet(J)[1])
    return torch.stack(out)


@pytest.mark.parametrize("shape,downsample", TINY)
def test_round_trip_float64(shape, downsample):
    flow = tiny_flow(shape, downsample)
    x = torch.rand(5, *shape, dtype=torch.float64)
    z, logabsdet = flow(x)
    assert z.shape == (5, math.prod(shape)) and logabsdet.shape == (5,)
    assert torch.allclose(flow.inverse(z), x, atol=1e-11, rtol=0)
    z2 = torch.randn(3, math.prod(shape), dtype=torch.float64)
    assert torch.allclose(flow(flow.inverse(0.2 * z2))[0], 0.2 * z2, atol=1e-8)


@pytest.mark.parametrize("shape,downsample", TINY[:3])
def test_logabsdet_matches_autograd_jacobian(shape, downsample):
    flow = tiny_flow(shape, downsample)
    x = torch.rand(3, *shape, dtype=torch.float64)
    _, logabsdet = flow(x)
    assert torch.allclose(logabsdet, jacobian_logabsdet(flow, x), atol=1e-9, rtol=1e-11)


def test_logabsdet_with_wide_kernel_and_three_scales():
    flow = tiny_flow((1, 8, 8), depth=1, kernel_size=5)
    assert flow.config["scales"] == 3
    x = torch.rand(2, 1, 8, 8, dtype=torch.float64)
    assert torch.allclose(flow(x)[1], jacobian_logabsdet(flow, x), atol=1e-9, rtol=1e-11)


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


def test_logit_transform_exact_inverse_and_logdet():
    t = LogitTransform(0.05)
    x = torch.rand(3, 2, 2, 2, dtype=torch.float64)
    y, lad = t(x)
    assert torch.allclose(t.inverse(y), x, atol=1e-14)
    J = torch.autograd.functional.jacobian(lambda v: t(v.view(1, 2, 2, 2))[0].reshape(-1), x[0].reshape(-1))
    assert torch.allclose(lad[0], torch.linalg.slogdet(J)[1])
    with pytest.raises(ValueError, match="alpha"):
        LogitTransform(0.5)


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
    J = torch.autograd.functional.jacobian(lambda v: layer(v.view(1, 1, 3, 3))[0].reshape(-1), x[0].reshape(-1))
    assert torch.allclose(lad[0], torch.linalg.slogdet(J)[1])
    flow = ConvFlow((1, 4, 4), pixel_affine=False)
    assert flow.pixel_affine is None and ConvFlow((1, 4, 4)).num_parameters() == flow.num_parameters() + 32


def test_train_and_eval_mode_agree():
    flow = tiny_flow((1, 4, 4))
    x = torch.rand(4, 1, 4, 4, dtype=torch.float64)
    z_train, lad_train = flow.train()(x)
    z_eval, lad_eval = flow.eval()(x)
    assert torch.equal(z_train, z_eval) and torch.equal(lad_train, lad_eval)


def test_sample_shapes_and_temperature():
    flow = tiny_flow((1, 4, 4))
    s = flow.sample(7, temperature=0.5, generator=torch.Generator().manual_seed(0))
    assert s.shape == (7, 1, 4, 4) and s.dtype == torch.float64
    zero = flow.sample(2, temperature=0.0)
    assert torch.allclose(zero, flow.inverse(torch.zeros(2, 16, dtype=torch.float64)))


def test_flow_loss_and_evaluation():
    flow = tiny_flow((1, 4, 4)).float()
    images = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    loss, metrics = flow_loss(flow, images)
    assert loss.dim() == 0 and loss.requires_grad and metrics["bits/dim"] == pytest.approx(loss.item())
    a = evaluate_bits_per_dim(flow, images, batch_size=3, seed=1)
    b = evaluate_bits_per_dim(flow, images, batch_size=8, seed=1)
    assert a == pytest.approx(b, rel=1e-6)  # seeded noise: independent of batching


def test_check_invertible_flags_a_singular_conv():
    flow = tiny_flow((1, 4, 4))
    flow.check_invertible()
    assert max(flow.condition_numbers()) < 10
    with torch.no_grad():
        flow.levels[0][0][1].weight.zero_()
    with pytest.raises(NotInvertibleError, match="condition number"):
        flow.check_invertible()


def test_default_architecture_for_common_shapes():
    fm = ConvFlow((1, 28, 28))
    assert fm.config["scales"] == 2 and fm._latent_shapes == [(8, 7, 7), (8, 7, 7)]
    cifar = ConvFlow((3, 32, 32))
    assert cifar.config["scales"] == 3
    assert sum(math.prod(s) for s in cifar._latent_shapes) == 3 * 32 * 32


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


def test_standard_normal_log_prob():
    z = torch.randn(3, 5, dtype=torch.float64)
    ref = torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(1)
    assert torch.allclose(standard_normal_log_prob(z), ref)
