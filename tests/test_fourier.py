import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

import iconv
from iconv import fourier
from iconv.core.circular import dense_conv_matrix
from tests.helpers import dense_apply, dense_logabsdet, random_weight, relerr

BACKENDS = ["complex", "lifted"]

shapes = st.tuples(st.integers(1, 8), st.sampled_from([1, 3, 5]), st.integers(3, 12), st.integers(3, 12))


@given(shape=shapes)
def test_conv2d_matches_dense(shape):
    c, k, h, w = shape
    weight, x = torch.randn(c, c, k, k, dtype=torch.float64), torch.randn(2, c, h, w, dtype=torch.float64)
    bias = torch.randn(c, dtype=torch.float64)
    expected = dense_apply(weight, x) + bias.view(1, -1, 1, 1)
    assert relerr(fourier.conv2d(x, weight, bias), expected) < 1e-12


@pytest.mark.parametrize("backend", BACKENDS)
@given(shape=shapes)
def test_logabsdet_and_inverse_match_dense(backend, shape):
    """The acceptance check: 1e-10 relative agreement in float64, h != w, both backends."""
    c, k, h, w = shape
    assume(h != w)
    weight = random_weight(c, k)
    M = dense_conv_matrix(weight, h, w)
    sign, expected = torch.linalg.slogdet(M)
    got = fourier.logabsdet(weight, h, w, backend)
    assert got.shape == ()
    assert abs(got.item() - expected.item()) <= 1e-10 * max(1.0, abs(expected.item()))
    y = torch.randn(3, c, h, w, dtype=torch.float64)
    x_dense = torch.linalg.solve(M, y.reshape(3, -1).T).T.reshape(y.shape)
    assert relerr(fourier.inverse(y, weight, backend=backend), x_dense) < 1e-10
    fact = fourier.factorize(weight, h, w, backend, explicit=True)
    assert relerr(fourier.inverse(y, weight, backend=backend, factorization=fact), x_dense) < 1e-10


@pytest.mark.parametrize("backend", BACKENDS)
@given(c=st.integers(1, 3), h=st.integers(1, 5), w=st.integers(1, 5), k=st.sampled_from([3, 5, 7, 9, 11]))
def test_kernels_that_wrap_around_small_images(backend, c, h, w, k):
    weight = random_weight(c, k)
    M = dense_conv_matrix(weight, h, w)
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    assert relerr(fourier.conv2d(x, weight), dense_apply(weight, x)) < 1e-12
    expected = torch.linalg.slogdet(M)[1].item()
    assert abs(fourier.logabsdet(weight, h, w, backend).item() - expected) < 1e-10 * max(1, abs(expected))


@pytest.mark.parametrize("w", [1, 2, 4, 5, 6, 7])
def test_half_spectrum_counts_mirrored_columns_twice(w):
    """Summing log|det| over all h*w full-spectrum blocks equals the weighted half-spectrum sum."""
    mult = fourier.conjugate_multiplicity(w)
    assert mult.sum().item() == w
    weight, h, k = random_weight(2, 3), 3, 3
    rows = fourier._phases(h, h, k, torch.complex128, None)
    cols = fourier._phases(w, w, k, torch.complex128, None)  # every column, not just half
    full = torch.einsum("ua,vb,ocab->uvoc", rows, cols, weight.to(torch.complex128))
    expected = torch.linalg.slogdet(full)[1].sum()
    assert abs(fourier.logabsdet(weight, h, w).item() - expected.item()) < 1e-12 * abs(expected.item()) + 1e-12


def test_spectrum_is_the_fft_of_the_conv():
    """A_f maps rfft2(x) to rfft2(conv(x)) at every frequency."""
    c, h, w = 3, 6, 5
    weight, x = torch.randn(c, c, 3, 3, dtype=torch.float64), torch.randn(1, c, h, w, dtype=torch.float64)
    A = fourier.spectrum(weight, h, w)
    X, Y = torch.fft.rfft2(x)[0], torch.fft.rfft2(dense_apply(weight, x))[0]  # (c, h, w')
    torch.testing.assert_close(torch.einsum("uvoc,cuv->ouv", A, X), Y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
def test_logabsdet_gradient_matches_dense_slogdet(backend):
    weight = random_weight(3, 3).requires_grad_(True)
    (got,) = torch.autograd.grad(fourier.logabsdet(weight, 4, 5, backend), weight)
    (expected,) = torch.autograd.grad(dense_logabsdet(weight, 4, 5), weight)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inverse_is_differentiable(backend):
    weight = random_weight(2, 3).requires_grad_(True)
    y = torch.randn(2, 2, 4, 5, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda y, W: fourier.inverse(y, W, backend=backend), (y, weight))


def test_float32_errors_are_bounded():
    """float32: conv within 1e-5 of float64, log-det within 1e-5 relative, round trip within 1e-5."""
    layer = iconv.InvertibleConv2d(16)
    w64 = layer.weight.detach().double()
    x = torch.randn(4, 16, 12, 10)
    assert relerr(fourier.conv2d(x, layer.weight.detach()).double(), fourier.conv2d(x.double(), w64)) < 1e-5
    ld32, ld64 = fourier.logabsdet(layer.weight.detach(), 12, 10), fourier.logabsdet(w64, 12, 10)
    assert abs(ld32.item() - ld64.item()) <= 1e-5 * max(1.0, abs(ld64.item()))
    y = fourier.conv2d(x, layer.weight.detach())
    assert relerr(fourier.inverse(y, layer.weight.detach()), x) < 1e-5


@pytest.mark.parametrize("backend,c", [("lifted", 75), ("complex", 150)])
def test_right_where_torch_cpu_batched_lu_breaks(backend, c):
    """n = 150 (lifted c = 75, complex c = 150) is where torch 2.13's multithreaded batched LU fails."""
    torch.set_num_threads(2)
    weight = random_weight(c, 3, identity=2.0)
    h, w = 3, 2
    blocks = fourier.spectrum(weight, h, w).reshape(-1, c, c)
    expected = torch.stack([torch.linalg.slogdet(b)[1] for b in blocks]).sum()  # w = 2: both columns count once
    got = fourier.logabsdet(weight, h, w, backend)
    assert abs(got.item() - expected.item()) < 1e-9 * abs(expected.item()) + 1e-9
    y = torch.randn(2, c, h, w, dtype=torch.float64)
    x = fourier.inverse(y, weight, backend=backend)
    assert relerr(fourier.conv2d(x, weight), y) < 1e-10


def test_singular_weight_raises_not_invertible_naming_the_frequency():
    weight = torch.zeros(2, 2, 3, 3, dtype=torch.float64)
    weight[:, :, 1, 1] = torch.tensor([[1.0, 2.0], [2.0, 4.0]])  # rank one at every frequency
    for explicit in (False, True):
        fact = fourier.factorize(weight, 4, 4, explicit=explicit)
        with pytest.raises(iconv.NotInvertibleError, match=r"frequency \(u=\d+, v=\d+\) has condition number") as err:
            fourier.inverse(torch.randn(1, 2, 4, 4, dtype=torch.float64), weight, factorization=fact)
        assert err.value.condition_number > 1e13
    assert fourier.logabsdet(weight, 4, 4).item() == -math.inf


def test_nearly_singular_float32_is_refused_not_returned_wrong():
    c = 8
    weight = torch.zeros(c, c, 3, 3)
    weight[:, :, 1, 1] = torch.eye(c)
    weight[0, 0, 1, 1] = 1e-6  # one direction shrunk a million times: condition number 1e6 in float32
    with pytest.raises(iconv.NotInvertibleError):
        fourier.inverse(torch.randn(1, c, 4, 4), weight)
    x = fourier.inverse(torch.randn(1, c, 4, 4, dtype=torch.float64), weight.double())  # fine in float64
    assert torch.isfinite(x).all()


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fourier.conv2d(torch.randn(2, 3, 4), torch.randn(3, 3, 3, 3)), ValueError, "4 dimensions"),
        (lambda: fourier.conv2d(torch.randn(1, 2, 4, 4), torch.randn(3, 3, 3, 3)), ValueError, "channels"),
        (lambda: fourier.conv2d(torch.randn(1, 3, 4, 4), torch.randn(3, 3, 2, 2)), ValueError, "odd"),
        (lambda: fourier.conv2d(torch.randn(1, 3, 4, 4), torch.randn(3, 3, 3, 1)), ValueError, "square"),
        (lambda: fourier.conv2d(torch.full((1, 3, 4, 4), math.inf), torch.randn(3, 3, 3, 3)), ValueError, "non-finite"),
        (lambda: fourier.conv2d(torch.randn(1, 3, 4, 4).double(), torch.randn(3, 3, 3, 3)), TypeError, "dtype"),
        (lambda: fourier.logabsdet(torch.randn(3, 3, 3, 3), 4, 4, backend="qr"), ValueError, "backend"),
        (lambda: fourier.spectrum(torch.randn(3, 3, 3, 3), 0, 4), ValueError, "positive"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


@given(c=st.integers(1, 12), h=st.integers(2, 7), w=st.integers(2, 7), seed=st.integers(0, 2**16))
def test_fresh_condition_estimate_is_a_lower_bound(c, h, w, seed):
    """The one-step estimate never exceeds the exact 1-norm condition number."""
    torch.manual_seed(seed)
    weight = random_weight(c, 3, identity=0.3)
    exact = fourier.factorize(weight, h, w, explicit=True).condition
    y = torch.randn(2, c, h, w, dtype=torch.float64)
    _, estimate = fourier.factorize(weight, h, w).solve(fourier.to_frequencies(y))
    assert (estimate <= exact * (1 + 1e-9)).all()


def test_fresh_condition_estimate_is_close_enough_to_catch_singular_blocks():
    """After Hager's refinement step the estimate is within a factor 3 on these blocks, mostly exact."""
    weight = random_weight(16, 3, identity=0.3)
    exact = fourier.factorize(weight, 8, 8, explicit=True).condition
    y = torch.randn(4, 16, 8, 8, dtype=torch.float64)
    for backend in ("complex", "lifted"):
        _, estimate = fourier.factorize(weight, 8, 8, backend).solve(fourier.to_frequencies(y))
        ratio = estimate / exact
        assert ratio.min() > 1 / 3 and ratio.median() > 0.99


def test_fresh_inverse_refuses_a_condition_number_just_above_the_float32_limit():
    c = 8
    weight = torch.zeros(c, c, 3, 3)
    weight[:, :, 1, 1] = torch.eye(c)
    weight[0, 0, 1, 1] = 1 / 1.2e5  # condition number 1.2e5 > 8.4e4, the float32 limit
    with pytest.raises(iconv.NotInvertibleError):
        fourier.inverse(torch.randn(2, c, 4, 4), weight)
