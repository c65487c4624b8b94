import pytest
import torch
from hypothesis import given, strategies as st

import iconv
from iconv import fourier
from iconv.core.circular import circular_conv2d, dense_conv_matrix
from iconv.layers import conv as conv_module
from iconv.layers.conv import InvertibleConv2d, circular_conv, shared_logabsdets
from tests.helpers import dense_apply, relerr


def layer64(c, k=3, backend="complex", bias=True):
    layer = iconv.InvertibleConv2d(c, k, bias=bias, backend=backend).double()
    with torch.no_grad():
        if bias:
            layer.bias.normal_()
    return layer


@pytest.mark.parametrize("backend", ["complex", "lifted"])
@given(c=st.integers(1, 5), k=st.sampled_from([1, 3, 5]), h=st.integers(2, 7), w=st.integers(2, 7))
def test_forward_inverse_and_logabsdet_match_dense(backend, c, k, h, w):
    layer = layer64(c, k, backend)
    x = torch.randn(3, c, h, w, dtype=torch.float64)
    y, logabsdet = layer(x)
    assert logabsdet.shape == (3,)
    assert relerr(y, dense_apply(layer.weight, x) + layer.bias.view(1, -1, 1, 1)) < 1e-12
    expected = torch.linalg.slogdet(dense_conv_matrix(layer.weight.detach(), h, w))[1]
    torch.testing.assert_close(logabsdet, expected.expand(3), rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        assert relerr(layer.inverse(y), x) < 1e-10
    assert relerr(layer.inverse(y), x) < 1e-10  # the differentiable (uncached) route too


def test_initialisation_is_well_conditioned_and_float32_round_trip_is_tight():
    """Acceptance: float32 round trip <= 1e-5 at c = 64, 32x32 with the default initialisation."""
    layer = iconv.InvertibleConv2d(64)
    x = torch.randn(2, 64, 32, 32)
    with torch.no_grad():
        y, _ = layer(x)
        assert relerr(layer.inverse(y), x) < 1e-5
    s = layer.singular_values()  # (h, w', c)
    assert (s[..., 0] / s[..., -1]).max().item() < 3.0  # 2-norm condition (the 1-norm one is up to 2c times more)


def test_singular_values_are_those_of_the_dense_matrix():
    layer = layer64(2, 3)
    h, w = 4, 5
    s_blocks = layer.singular_values(h, w)  # (h, w', c)
    mult = fourier.conjugate_multiplicity(w)
    multiset = torch.cat([s_blocks[:, v].flatten().repeat(int(mult[v])) for v in range(w // 2 + 1)])
    dense = torch.linalg.svdvals(dense_conv_matrix(layer.weight.detach(), h, w))
    torch.testing.assert_close(multiset.sort().values, dense.sort().values, rtol=1e-10, atol=1e-12)
    kappa2 = (s_blocks[..., 0] / s_blocks[..., -1]).max()  # 2-norm; the 1-norm one is within a factor 2c
    assert kappa2 / (2 * 2) <= layer.condition_number(h, w) <= 2 * 2 * kappa2


def test_factorization_is_cached_and_invalidated_by_any_weight_change():
    layer = layer64(3)
    y = torch.randn(2, 3, 6, 6, dtype=torch.float64)
    with torch.no_grad():
        first = layer.factorization(6, 6)
        assert layer.factorization(6, 6) is first
        layer.inverse(y)
        assert layer.factorization(6, 6) is first
        assert layer.factorization(6, 7) is not first  # another image size
        layer.weight.data[0, 0, 1, 1] += 0.5  # a change that bypasses autograd's version counter
        x = layer.inverse(y)
    assert relerr(dense_apply(layer.weight, x) + layer.bias.view(1, -1, 1, 1), y) < 1e-10
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    layer(torch.randn(1, 3, 6, 6, dtype=torch.float64))[0].sum().backward()
    opt.step()
    with torch.no_grad():
        x = layer.inverse(y)
    assert relerr(dense_apply(layer.weight, x) + layer.bias.view(1, -1, 1, 1), y) < 1e-10


def test_gradients_flow_through_logabsdet_during_training():
    layer = layer64(2)
    x = torch.randn(2, 2, 4, 4, dtype=torch.float64)
    y, logabsdet = layer(x)
    (y.square().sum() - logabsdet.sum()).backward()
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_large_kernel_on_small_image_uses_the_fourier_route():
    layer = layer64(2, 9)
    x = torch.randn(1, 2, 3, 3, dtype=torch.float64)
    y, _ = layer(x)
    assert relerr(y, dense_apply(layer.weight, x) + layer.bias.view(1, -1, 1, 1)) < 1e-12


@pytest.mark.parametrize(
    "make, match",
    [
        (lambda: iconv.InvertibleConv2d(3, 4), "odd"),
        (lambda: iconv.InvertibleConv2d(0), "positive"),
        (lambda: iconv.InvertibleConv2d(3, backend="svd"), "backend"),
    ],
)
def test_bad_construction(make, match):
    with pytest.raises(ValueError, match=match):
        make()


def test_bad_inputs():
    layer = iconv.InvertibleConv2d(3)
    with pytest.raises(ValueError, match="channels"):
        layer(torch.randn(1, 4, 5, 5))
    with pytest.raises(ValueError, match="4 dimensions"):
        layer(torch.randn(3, 5, 5))
    with pytest.raises(ValueError, match="non-finite"):
        layer.inverse(torch.full((1, 3, 5, 5), float("nan")))
    with pytest.raises(ValueError, match="not seen an input"):
        layer.condition_number()


@pytest.mark.parametrize("k", [1, 3, 5])
def test_layer_conv_is_the_circular_conv_bit_for_bit(k):
    layer = InvertibleConv2d(3, k).double()
    with torch.no_grad():
        layer.bias.normal_()
    x = torch.randn(2, 3, 6, 5, dtype=torch.float64)
    assert torch.equal(layer.conv(x), circular_conv2d(x, layer.weight, layer.bias))


def test_shared_logabsdets_give_each_conv_its_own_value_from_one_factorization_per_shape(monkeypatch):
    """Inside the block: values and gradients equal the separate calls bit for bit, one LU per shape."""
    torch.manual_seed(0)
    convs = [InvertibleConv2d(3, 3, init_scale=0.4).double() for _ in range(3)] + [InvertibleConv2d(2, 1).double()]
    sizes = [(5, 6), (5, 6), (4, 4), (5, 6)]
    expected = [fourier.logabsdet(conv.weight, *size) for conv, size in zip(convs, sizes)]
    expected_grads = [torch.autograd.grad(value, conv.weight)[0] for value, conv in zip(expected, convs)]
    calls = []
    lu = fourier._lu
    monkeypatch.setattr(fourier, "_lu", lambda blocks, backend: calls.append(blocks.shape) or lu(blocks, backend))
    with shared_logabsdets(list(zip(convs, sizes)) + [(convs[0], (5, 6))]):  # a repeated entry counts once
        got = [conv.logabsdet(*size) for conv, size in zip(convs, sizes)]
        assert len(calls) == 3  # (3, 3 at 5x6) for two convs, (3, 3 at 4x4), (2, 1 at 5x6)
        other_size = convs[0].logabsdet(4, 5)  # not listed at this size: computed on its own
        assert len(calls) == 4
    assert torch.equal(other_size, fourier.logabsdet(convs[0].weight, 4, 5))
    for value, reference, conv, grad in zip(got, expected, convs, expected_grads):
        assert torch.equal(value, reference)
        assert torch.equal(torch.autograd.grad(value, conv.weight, retain_graph=True)[0], grad)
    assert convs[0].logabsdet(5, 6) is not got[0]  # outside the block: no stale value


def test_shared_logabsdets_compute_nothing_without_gradients(monkeypatch):
    conv = InvertibleConv2d(3, 3).double()
    monkeypatch.setattr(fourier, "logabsdets", lambda *args, **kwargs: pytest.fail("computed without gradients"))
    with torch.no_grad(), shared_logabsdets([(conv, (4, 4))]):
        y, logabsdet = conv(torch.randn(2, 3, 4, 4, dtype=torch.float64))
    assert torch.equal(logabsdet, conv.factorization(4, 4).logabsdet.expand(2))


@pytest.mark.parametrize("route", ["forward", "onednn"])
@pytest.mark.parametrize("c,k,h,w,bias", [(3, 3, 5, 4, True), (2, 5, 3, 6, False), (4, 3, 2, 7, True)])
def test_circular_conv_gradients_match_autograd_through_the_padded_conv(monkeypatch, route, c, k, h, w, bias):
    """Both input-gradient routes, against autograd through F.pad + F.conv2d and the dense matrix, in float64."""
    monkeypatch.setattr(conv_module, "FORWARD_ROUTE_MAX_CHANNELS", 64 if route == "forward" else 0)
    torch.manual_seed(1)
    x = torch.randn(3, c, h, w, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(c, c, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(c, dtype=torch.float64, requires_grad=True) if bias else None
    inputs = [x, weight] + ([b] if bias else [])
    g = torch.randn(3, c, h, w, dtype=torch.float64)
    y = circular_conv(x, weight, b)
    assert y.grad_fn.name() == "_CircularConv2dBackward"
    expected_y = circular_conv2d(x, weight, b)
    assert torch.equal(y, expected_y)
    for got, expected in zip(torch.autograd.grad(y, inputs, g, retain_graph=True),
                             torch.autograd.grad(expected_y, inputs, g)):
        torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    (dense_grad,) = torch.autograd.grad(dense_apply(weight, x), x, g)  # x-gradient = M^T g
    torch.testing.assert_close(torch.autograd.grad(y, x, g)[0], dense_grad, rtol=1e-12, atol=1e-12)
    small = [t.detach()[:2].clone().requires_grad_(True) if t is x else t for t in inputs]
    assert torch.autograd.gradcheck(lambda *a: circular_conv(*a), small)
    assert torch.autograd.gradgradcheck(lambda *a: circular_conv(*a), small)


def test_circular_conv_keeps_only_its_input_for_the_backward():
    """No padded copy is saved: every tensor the conv keeps is its input or its parameters."""
    x = torch.randn(4, 3, 6, 6, requires_grad=True)
    layer = InvertibleConv2d(3, 3)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        layer.conv(x * 1.0)
    assert saved and all(t.shape in {(4, 3, 6, 6), (3, 3, 3, 3), (3,)} for t in saved)


def test_circular_conv_without_gradients_is_the_plain_padded_conv():
    x, weight = torch.randn(2, 3, 5, 5), torch.randn(3, 3, 3, 3)
    assert circular_conv(x, weight).grad_fn is None
    assert torch.equal(circular_conv(x, weight), circular_conv2d(x, weight))
