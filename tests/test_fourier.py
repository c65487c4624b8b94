import math

import pytest
import torch
from hypothesis import assume, given, strategies as st

import iconv
from iconv import fourier
from iconv.core.circular import dense_conv_matrix
from tests.helpers import (adversarial_weight, condition1, dense_apply, dense_logabsdet, probe_signs, random_weight,
                           relerr)

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


def full_blocks(weight, h, w):
    """All h*w Fourier blocks by the definition, tap by tap: ``(h, w, c, c)`` complex128."""
    k = weight.shape[-1]
    p = k // 2
    u = torch.arange(h, dtype=torch.float64)[:, None]
    v = torch.arange(w, dtype=torch.float64)[None, :]
    blocks = torch.zeros(h, w, *weight.shape[:2], dtype=torch.complex128)
    for a in range(k):
        for b in range(k):
            phase = torch.exp(2j * math.pi * (u * (a - p) / h + v * (b - p) / w))  # (h, w)
            blocks += phase[..., None, None] * weight[:, :, a, b].to(torch.complex128)
    return blocks


@pytest.mark.parametrize("w", [1, 2, 4, 5, 6, 7])
def test_half_spectrum_counts_mirrored_columns_twice(w):
    """Summing log|det| over all h*w full-spectrum blocks equals the weighted half-spectrum sum."""
    mult = fourier.conjugate_multiplicity(w)
    assert mult.sum().item() == w
    weight, h = random_weight(2, 3), 3
    expected = torch.linalg.slogdet(full_blocks(weight, h, w))[1].sum()
    assert abs(fourier.logabsdet(weight, h, w).item() - expected.item()) < 1e-12 * abs(expected.item()) + 1e-12
    torch.testing.assert_close(fourier.spectrum(weight, h, w), full_blocks(weight, h, w)[:, : w // 2 + 1])


@pytest.mark.parametrize("h,w", [(1, 1), (2, 2), (3, 4), (4, 4), (5, 7), (6, 5), (7, 8), (14, 14)])
def test_distinct_frequencies_cover_the_full_spectrum_once(h, w):
    """Each full-spectrum block is a listed block or the conjugate of one, counted exactly once."""
    indices, mult = fourier.distinct_frequencies(h, w)
    assert sum(mult) == h * w and len(set(indices)) == len(indices)
    wp = w // 2 + 1
    full = full_blocks(random_weight(2, 3), h, w)  # (h, w, c, c)
    counted = torch.zeros(h, w)
    for index, m in zip(indices, mult):
        u, v = divmod(index, wp)
        mirror = ((-u) % h, (-v) % w)
        torch.testing.assert_close(full[mirror], full[u, v].conj(), rtol=1e-12, atol=1e-12)
        counted[u, v] += 1
        if mirror != (u, v):
            counted[mirror] += 1
        assert m == (1.0 if mirror == (u, v) else 2.0)
    assert bool((counted == 1).all())


def test_spectrum_is_the_fft_of_the_conv():
    """A_f maps rfft2(x) to rfft2(conv(x)) at every frequency."""
    c, h, w = 3, 6, 5
    weight, x = torch.randn(c, c, 3, 3, dtype=torch.float64), torch.randn(1, c, h, w, dtype=torch.float64)
    A = fourier.spectrum(weight, h, w)
    X, Y = torch.fft.rfft2(x)[0], torch.fft.rfft2(dense_apply(weight, x))[0]  # (c, h, w')
    torch.testing.assert_close(torch.einsum("uvoc,cuv->ouv", A, X), Y, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("h,w,k", [(4, 5, 3), (4, 6, 3), (5, 4, 3), (3, 4, 1)])
def test_logabsdet_gradient_matches_dense_slogdet(backend, h, w, k):
    weight = random_weight(3, k).requires_grad_(True)
    (got,) = torch.autograd.grad(fourier.logabsdet(weight, h, w, backend), weight)
    (expected,) = torch.autograd.grad(dense_logabsdet(weight, h, w), weight)
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
        (lambda: fourier.conv2d(torch.randn(1, 3, 4, 4), torch.randn(3, 3, 3, 3), torch.full((3,), math.nan)),
         ValueError, "bias holds non-finite"),
        (lambda: fourier.inverse(torch.randn(1, 3, 4, 4), torch.randn(3, 3, 3, 3), torch.zeros(4)), ValueError,
         r"bias must have shape \(3,\)"),
        (lambda: fourier.conv2d(torch.randn(1, 3, 4, 4).half(), torch.randn(3, 3, 3, 3).half()), TypeError,
         "float32 or float64, got dtype torch.float16"),
        (lambda: fourier.logabsdet(torch.randn(3, 3, 3, 3, dtype=torch.bfloat16), 4, 4), TypeError,
         "weight must be floating of dtype float32 or float64, got dtype torch.bfloat16"),
        (lambda: fourier.inverse(torch.randn(1, 3, 4, 4, device="meta"), torch.randn(3, 3, 3, 3, device="meta")),
         ValueError, "meta tensor"),
    ],
)
def test_bad_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()


def old_one_step_estimate(block):
    """iconv 0.2's condition estimate (one Hager step from a fixed sign probe), reproduced to show it is fooled."""
    c = block.shape[-1]
    r = probe_signs(c).to(block.dtype)
    x = torch.linalg.solve(block, r)
    growth = (x.real.abs() + x.imag.abs()).sum() / c
    z = torch.linalg.solve(block.mH, x / x.abs())
    e = torch.zeros_like(r)
    e[int((z.real.abs() + z.imag.abs()).argmax())] = 1
    refined = torch.linalg.solve(block, e)
    refined = (refined.real.abs() + refined.imag.abs()).sum()
    norm = (block.real.abs() + block.imag.abs()).sum(-2).amax()
    return (norm * torch.maximum(growth, refined)).item()


@pytest.mark.parametrize("kind", ["probe", "complex"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("factor", [1.5, 10.0, 1e3])
def test_adversarial_near_singular_weights_are_refused(kind, dtype, factor):
    """Constructed near-null directions (against the old probe, or genuinely complex) above the limit: refused."""
    c, h, w = 16, 4, 6
    limit = fourier.condition_limit(dtype)
    weight, v0, true = adversarial_weight(c, factor * limit, dtype=dtype, kind=kind, w=w)
    assert true > limit  # the construction is what it claims, measured independently in float64
    exact = fourier.condition_numbers(weight, h, w)
    assert exact[:, v0].min() > limit
    y = torch.randn(2, c, h, w, dtype=dtype)
    with pytest.raises(iconv.NotInvertibleError) as err:
        fourier.inverse(y, weight)
    assert err.value.frequency[1] == v0
    layer = iconv.InvertibleConv2d(c).to(dtype)
    with torch.no_grad():
        layer.weight.copy_(weight)
        with pytest.raises(iconv.NotInvertibleError):
            layer.inverse(y)


def test_the_probe_construction_defeats_a_fixed_probe_estimate():
    """The "probe" weights are adversarial: the old one-step estimate calls condition 1e7 about 1."""
    weight, v0, true = adversarial_weight(16, 1e7, kind="probe")
    block = fourier.spectrum(weight, 4, 6)[0, v0]
    assert true > 0.99e7 and old_one_step_estimate(block) < 10
    assert fourier.condition_numbers(weight, 4, 6)[0, v0] > 0.99e7


@pytest.mark.parametrize("kind", ["probe", "complex"])
def test_adversarial_weights_below_the_limit_invert_accurately(kind):
    """Just under the float64 limit's reach (condition 1e6): inverted, and right to about cond * eps."""
    c, h, w = 16, 4, 6
    weight, v0, true = adversarial_weight(c, 1e6, kind=kind, w=w)
    exact = fourier.condition_numbers(weight, h, w)
    assert 0.5 * true <= exact[0, v0] <= 2 * true  # agrees with the independent float64 inverse
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    y = dense_apply(weight, x)
    assert relerr(fourier.inverse(y, weight), x) < 1e-7


@given(c=st.integers(1, 6), h=st.integers(1, 5), w=st.integers(1, 5), seed=st.integers(0, 2**16))
def test_condition_numbers_match_an_independent_inverse(c, h, w, seed):
    torch.manual_seed(seed)
    weight = random_weight(c, 3, identity=0.3)
    got = fourier.condition_numbers(weight, h, w)
    blocks = full_blocks(weight, h, w)[:, : w // 2 + 1]
    expected = torch.tensor([[condition1(blocks[u, v]) for v in range(w // 2 + 1)] for u in range(h)],
                            dtype=torch.float64)
    torch.testing.assert_close(got, expected, rtol=1e-8, atol=0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rank_deficient_weights_give_minus_inf(dtype, backend):
    c = 6
    torch.manual_seed(1)
    rank_one = torch.zeros(c, c, 3, 3, dtype=dtype)
    rank_one[:, :, 1, 1] = torch.randn(c, 1, dtype=dtype) @ torch.randn(1, c, dtype=dtype)
    dependent = random_weight(c, 3).to(dtype)
    dependent[-1] = dependent[0] - 0.5 * dependent[1]  # one output channel a combination of two: every block
    for weight in (rank_one, dependent):
        assert fourier.logabsdet(weight, 5, 6, backend).item() == -math.inf
        with pytest.raises(iconv.NotInvertibleError):
            fourier.inverse(torch.randn(1, c, 5, 6, dtype=dtype), weight, backend=backend)
    tiny = 1e-3 * random_weight(c, 3).to(dtype)  # a tiny determinant, but perfectly conditioned: finite and right
    expected = dense_logabsdet(tiny.double(), 5, 6).item()
    assert abs(fourier.logabsdet(tiny, 5, 6, backend).item() - expected) < 1e-4 * abs(expected)


def test_a_factorization_for_another_weight_or_size_is_refused():
    w1, w2 = random_weight(3, 3), random_weight(3, 3)
    fact = fourier.factorize(w1, 4, 5)
    y = torch.randn(2, 3, 4, 5, dtype=torch.float64)
    with pytest.raises(ValueError, match="another weight"):
        fourier.inverse(y, w2, factorization=fact)
    with pytest.raises(ValueError, match="another weight"):
        fourier.inverse(y, w1.float().double() + 1e-12, factorization=fact)
    with pytest.raises(ValueError, match="4x5 images"):
        fourier.inverse(torch.randn(2, 3, 4, 6, dtype=torch.float64), w1, factorization=fact)
    assert relerr(fourier.inverse(y, w1.clone(), factorization=fact), fourier.inverse(y, w1)) < 1e-14


def test_empty_batches_give_empty_results():
    weight = random_weight(3, 3)
    for f in (lambda e: fourier.conv2d(e, weight, torch.zeros(3, dtype=torch.float64)),
              lambda e: fourier.inverse(e, weight, torch.zeros(3, dtype=torch.float64))):
        out = f(torch.zeros(0, 3, 4, 5, dtype=torch.float64))
        assert out.shape == (0, 3, 4, 5)


def test_logabsdet_backward_is_right_in_float32():
    weight = random_weight(8, 3).float().requires_grad_(True)
    (got,) = torch.autograd.grad(fourier.logabsdet(weight, 6, 5), weight)
    w64 = weight.detach().double().requires_grad_(True)
    (expected,) = torch.autograd.grad(dense_logabsdet(w64, 6, 5), w64)
    assert relerr(got.double(), expected) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("c,k,h,w", [(3, 3, 4, 5), (2, 1, 3, 4), (4, 5, 5, 3)])
def test_logabsdets_of_many_convs_match_dense_and_single_calls(backend, c, k, h, w):
    """Values and gradients against the dense slogdet, and bit for bit against one call per weight."""
    weights = torch.stack([random_weight(c, k) for _ in range(4)])
    weights[2] = adversarial_weight(c, 1e6, w=w)[0] if (k, c) == (3, 3) else weights[2]  # near-singular member
    weights.requires_grad_(True)
    got = fourier.logabsdets(weights, h, w, backend)
    assert got.shape == (4,)
    (grad,) = torch.autograd.grad((got * torch.arange(1.0, 5.0, dtype=got.dtype)).sum(), weights)
    for g, weight in enumerate(weights.detach()):
        one = weight.clone().requires_grad_(True)
        single = fourier.logabsdet(one, h, w, backend)
        (single_grad,) = torch.autograd.grad((g + 1.0) * single, one)
        assert torch.equal(got[g].detach(), single.detach())
        assert torch.equal(grad[g], single_grad)
        dense = one.detach().clone().requires_grad_(True)
        expected = dense_logabsdet(dense, h, w)
        (dense_grad,) = torch.autograd.grad((g + 1.0) * expected, dense)
        assert abs(got[g].item() - expected.item()) <= 1e-10 * max(1.0, abs(expected.item()))
        torch.testing.assert_close(grad[g], dense_grad, rtol=1e-6, atol=1e-8)


def test_logabsdets_marks_each_singular_member_alone():
    weights = torch.stack([random_weight(3, 3), torch.zeros(3, 3, 3, 3, dtype=torch.float64), random_weight(3, 3)])
    got = fourier.logabsdets(weights, 4, 4)
    assert got[1].item() == -math.inf and bool(torch.isfinite(got[[0, 2]]).all())
    assert fourier.logabsdets(weights[:0], 4, 4).shape == (0,)


@pytest.mark.parametrize(
    "call, error, match",
    [
        (lambda: fourier.logabsdets(torch.randn(3, 3, 3, 3), 4, 4), ValueError, r"weights must be a \(G, c, c, k, k\)"),
        (lambda: fourier.logabsdets(torch.randn(2, 3, 2, 3, 3), 4, 4), ValueError, "c_out = 3, c_in = 2"),
        (lambda: fourier.logabsdets(torch.randn(2, 3, 3, 3, 3).index_fill(0, torch.tensor([1]), math.inf), 4, 4),
         ValueError, "weights hold non-finite"),
        (lambda: fourier.logabsdets(torch.randn(2, 3, 3, 3, 3).half(), 4, 4), TypeError, "float32 or float64"),
        (lambda: fourier.logabsdets(torch.randn(2, 3, 3, 3, 3), 4, 0), ValueError, "positive"),
    ],
)
def test_logabsdets_bad_input_gets_a_clear_error(call, error, match):
    with pytest.raises(error, match=match):
        call()
