"""SneakyReLU: accuracy, invertibility, log-derivative and input validation.

Error bounds (in ulps, eps = torch.finfo(dtype).eps; measured on 2e7 points with slopes in
[0.01, 0.99], |x| in [1e-30, 1e30] (float32) / [1e-30, 1e300] (float64)):
  forward, inverse, log-derivative vs a 700-digit mpmath reference: <= 3.1 ulps (tested: 4);
  forward(inverse(y)) vs y:   <= 4 ulps (tested: 5);
  inverse(forward(x)) vs x:   <= 13.5 ulps at s = 0.01, 5 at s = 0.1 (tested: 3 (1 + kappa) ulps,
      kappa = (1 + s) / (2 sqrt(s)) ~ the inverse's worst relative condition number: 18 ulps at
      s = 0.01, 8.2 ulps at s = 0.1; i.e. ~4e-15 resp. ~1e-6 in float64 resp. float32 at s = 0.01).
All bounds are relative (|error| <= tol |x|), with an absolute floor of a few `tiny` for subnormals.
"""
import math

import mpmath
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from iconv.layers.activations import (SneakyReLU, SneakyReLUWithLogDerivative, sneaky_relu, sneaky_relu_derivative,
                                     sneaky_relu_inverse, sneaky_relu_log_derivative)

DTYPES = [torch.float64, torch.float32]
SETTINGS = settings(max_examples=60, deadline=None)


def signed_log_uniform(lo_exp, hi_exp):
    return st.tuples(st.sampled_from([-1.0, 1.0]), st.floats(lo_exp, hi_exp)).map(lambda t: t[0] * 10.0 ** t[1])


# |x| up to 1e6: plain floats (hypothesis favours 0, +-1, boundaries) and log-uniform magnitudes
# that reach 1e-30 and very negative values.
values = st.one_of(st.floats(-1e6, 1e6, allow_subnormal=False), signed_log_uniform(-30, 6))
value_lists = st.lists(values, min_size=1, max_size=64)
slopes = st.one_of(st.sampled_from([0.1, 0.01, 0.5, 0.99]), st.floats(0.01, 0.99))


def ulps(dtype):
    return torch.finfo(dtype).eps


def assert_rel_close(actual, expected, rel, dtype):
    tiny = torch.finfo(dtype).tiny
    err = (actual - expected).abs()
    bound = rel * expected.abs() + 4 * tiny
    assert bool((err <= bound).all()), (
        f"max relative error {(err / expected.abs().clamp(min=tiny)).max().item():.3g} > {rel:.3g}; "
        f"worst at x = {expected[(err - bound).argmax()].item()!r}"
    )


def kappa(s):
    return (1 + s) / (2 * math.sqrt(s))


# ---------------------------------------------------------------- invertibility


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(xs=value_lists, s=slopes)
def test_inverse_of_forward(dtype, xs, s):
    x = torch.tensor(xs, dtype=dtype)
    x_back = sneaky_relu_inverse(sneaky_relu(x, s), s)
    assert_rel_close(x_back, x, 3 * (1 + kappa(s)) * ulps(dtype), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(ys=value_lists, s=slopes)
def test_forward_of_inverse(dtype, ys, s):
    y = torch.tensor(ys, dtype=dtype)
    assert_rel_close(sneaky_relu(sneaky_relu_inverse(y, s), s), y, 5 * ulps(dtype), dtype)


@pytest.mark.parametrize("dtype, hi", [(torch.float32, 30), (torch.float64, 300)])
def test_round_trip_far_beyond_1e6(dtype, hi):
    g = torch.Generator().manual_seed(0)
    n = 20000
    mags = 10.0 ** (torch.rand(n, generator=g, dtype=torch.float64) * (hi + 30) - 30)
    signs = torch.randint(0, 2, (n,), generator=g) * 2 - 1
    x = (mags * signs).to(dtype)
    y = sneaky_relu(x)
    assert bool(torch.isfinite(y).all()) and bool(torch.isfinite(sneaky_relu_log_derivative(x)).all())
    assert_rel_close(sneaky_relu_inverse(y), x, 3 * (1 + kappa(0.1)) * ulps(dtype), dtype)
    assert_rel_close(sneaky_relu(sneaky_relu_inverse(x)), x, 5 * ulps(dtype), dtype)


def test_special_points():
    s = 0.1
    a = (1 - s) / (1 + s)
    x = torch.tensor([0.0, -a / (1 + a), -2 * a / (1 + a)], dtype=torch.float64)
    # sigma(0) = 0; y = -alpha/(1+alpha) is z = 0 (the inverse's branch point); z = -alpha is where the
    # z >= 0 formula's denominator vanishes (its branch must not leak NaN into values or gradients).
    assert sneaky_relu(x[:1]).item() == 0.0 and sneaky_relu_inverse(x[:1]).item() == 0.0
    assert sneaky_relu_log_derivative(x[:1]).item() == pytest.approx(math.log((1 + s) / 2), rel=1e-15)
    y = x.clone().requires_grad_()
    back = sneaky_relu_inverse(y)
    (grad,) = torch.autograd.grad(back.sum(), y)
    assert bool(torch.isfinite(back).all()) and bool(torch.isfinite(grad).all())
    assert_rel_close(sneaky_relu(back.detach()), x, 5 * ulps(torch.float64), torch.float64)


# ---------------------------------------------------------------- high-precision reference

REF_POINTS = [-1e30, -1e12, -1e6, -1234.5, -1.42, -1.0, -1e-3, -1e-7, -1e-30, 0.0,
              1e-30, 1e-7, 1e-3, 1.0, 3.0, 1e3, 1e6, 1e12, 1e30]


def mp_sigma(x, s):
    a = (1 - s) / (1 + s)
    return (x + a * (mpmath.sqrt(1 + x * x) - 1)) / (1 + a)


def mp_log_derivative(x, s):
    a = (1 - s) / (1 + s)
    return mpmath.log((1 + a * x / mpmath.sqrt(1 + x * x)) / (1 + a))


def mp_inverse(y, s):
    if y == 0:  # sigma(0) = 0; the textbook root below leaves a ~1e-200 rounding residue there
        return mpmath.mpf(0)
    a = (1 - s) / (1 + s)
    z = (1 + a) * y + a
    return (z - a * mpmath.sqrt(z * z + 1 - a * a)) / (1 - a * a)


def rel_err(value, ref, tiny):
    """Relative error, with an absolute floor at the dtype's smallest normal number (a reference
    below it, like log sigma'(1e30) ~ -2e-61 in float32, is only required to round to ~0)."""
    return float(abs(value - ref) / max(abs(ref), tiny))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", [0.1, 0.01, 0.9])
def test_against_mpmath(dtype, s):
    """Every output within 4 ulps of a 200-digit evaluation of the textbook formulas.

    The reference uses the same float64 slope the code sees, and the dtype-rounded input; in
    float32 the naive formulas would be off by up to 100% at |x| = 1e6 (sqrt(1 + x^2) - 1 and
    x + alpha sqrt(1 + x^2) cancel); the log-derivative reference near +1e30 is ~1e-61 and the
    relative bound still holds there.
    """
    with mpmath.workdps(200):  # enough for 1 - x/r ~ 1e-60 at x = 1e30
        x = torch.tensor(REF_POINTS, dtype=dtype)
        tol = 4 * ulps(dtype)
        sm = mpmath.mpf(s)
        outputs = {"forward": sneaky_relu(x, s), "log-derivative": sneaky_relu_log_derivative(x, s),
                   "inverse": sneaky_relu_inverse(x, s)}
        refs = {"forward": mp_sigma, "log-derivative": mp_log_derivative, "inverse": mp_inverse}
        for name, out in outputs.items():
            for xi, oi in zip(x.tolist(), out.tolist()):
                ref = refs[name](mpmath.mpf(xi), sm)
                assert rel_err(mpmath.mpf(oi), ref, torch.finfo(dtype).tiny) <= tol, f"{name} at x = {xi}: {oi} vs {mpmath.nstr(ref, 20)}"


# ---------------------------------------------------------------- derivative and log-determinant


@SETTINGS
@given(xs=value_lists, s=slopes)
def test_log_derivative_matches_autograd(xs, s):
    x = torch.tensor(xs, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(sneaky_relu(x, s).sum(), x)
    torch.testing.assert_close(sneaky_relu_log_derivative(x.detach(), s).exp(), grad, rtol=1e-13, atol=0)


def test_logabsdet_matches_dense_jacobian():
    torch.manual_seed(0)
    layer = SneakyReLU(0.2)
    x = (3 * torch.randn(2, 2, 3, 3, dtype=torch.float64)).requires_grad_()
    y, logabsdet = layer(x)
    assert y.shape == x.shape and logabsdet.shape == (2,)
    jac = torch.autograd.functional.jacobian(lambda t: layer(t)[0], x).reshape(2, 18, 2, 18)
    for b in range(2):
        sign, logdet = torch.linalg.slogdet(jac[b, :, b, :])
        assert sign.item() == 1.0
        torch.testing.assert_close(logabsdet[b], logdet, rtol=1e-12, atol=1e-12)
        assert bool((jac[b, :, 1 - b, :] == 0).all())  # samples do not mix
    (g,) = torch.autograd.grad(logabsdet.sum(), x)  # differentiable, and finite
    assert bool(torch.isfinite(g).all())


def branch_points(s):
    """x = 0 (sigma and log sigma' switch formulas) and y = -(1 - s)/2, i.e. z = 0 (the inverse switches)."""
    return 0.0, -(1 - s) / 2


@pytest.mark.parametrize("s", [0.1, 0.01, 0.7])
def test_gradcheck_and_gradgradcheck_including_branch_points(s):
    x0, y0 = branch_points(s)
    pts = [x0, -0.0, y0, -2 * (1 - s) / 2, 1e-3, -1e-3, 1e-9, -1e-9] + torch.linspace(-4, 4, 9).tolist()
    x = torch.tensor(pts, dtype=torch.float64, requires_grad=True)
    for f in (sneaky_relu, sneaky_relu_inverse, sneaky_relu_log_derivative, sneaky_relu_derivative):
        assert torch.autograd.gradcheck(lambda t: f(t, s), (x,)), f.__name__
        assert torch.autograd.gradgradcheck(lambda t: f(t, s), (x,)), f.__name__
    v = x.detach()[None].clone().requires_grad_()  # the layer: (sigma, log sigma') and the summed logabsdet
    assert torch.autograd.gradcheck(lambda t: SneakyReLUWithLogDerivative.apply(t, s), (v,))
    assert torch.autograd.gradgradcheck(lambda t: SneakyReLUWithLogDerivative.apply(t, s), (v,))
    assert torch.autograd.gradgradcheck(lambda t: SneakyReLU(s)(t)[1], (v,))


def mp_derivatives(x, s):
    """sigma', sigma'' and (log sigma')' = sigma''/sigma' from their closed forms, in mpmath."""
    a = (1 - s) / (1 + s)
    r = mpmath.sqrt(1 + x * x)
    d1 = (1 + a * x / r) / (1 + a)
    d2 = a / (1 + a) / r**3
    return d1, d2, d2 / d1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("s", [0.1, 0.01, 0.9])
def test_first_and_second_derivatives_exactly_at_the_branch_points(dtype, s):
    """Autograd's first and second derivatives at x = 0, x = -0 and y = -(1 - s)/2 against mpmath.

    These are the points where the formulas switch branches; the derivatives must not depend on how
    a torch release differentiates clamp/abs/where at their edges (torch 2.14 returns 0 here for
    autograd through clamp-split formulas).
    """
    with mpmath.workdps(50):
        sm = mpmath.mpf(s)
        tol = 8 * ulps(dtype)
        x0, y0 = branch_points(s)
        d1, d2, dl = mp_derivatives(mpmath.mpf(0), sm)
        # log sigma'' at 0 = (h q^3 / sigma')' = -(sigma'')^2 / sigma'^2 there (q'(0) = 0)
        dl2 = -dl * dl
        alpha = (1 - sm) / (1 + sm)
        xb = -alpha / mpmath.sqrt(1 - alpha**2)  # sigma(xb) = y0: z = xb + alpha sqrt(1 + xb^2) = 0
        b1, b2, _ = mp_derivatives(xb, sm)  # the inverse at y0 has x = xb, dx/dy = 1/sigma', d2x/dy2 = -sigma''/sigma'^3
        cases = [(sneaky_relu, x0, d1, d2), (sneaky_relu, -0.0, d1, d2),
                 (sneaky_relu_log_derivative, x0, dl, dl2), (sneaky_relu_log_derivative, -0.0, dl, dl2),
                 (sneaky_relu_inverse, y0, 1 / b1, -b2 / b1**3)]
        for f, p, first, second in cases:
            x = torch.tensor([p], dtype=dtype, requires_grad=True)
            (g,) = torch.autograd.grad(f(x, s).sum(), x, create_graph=True)
            (gg,) = torch.autograd.grad(g.sum(), x)
            for name, got, want in (("first", g, first), ("second", gg, second)):
                assert rel_err(mpmath.mpf(got.item()), want, 0) <= (tol if name == "first" else 64 * tol), (
                    f"{f.__name__} {name} derivative at {p}: {got.item()!r}, exact {mpmath.nstr(want, 17)}")
        # the layer, both outputs, at x = 0 and -0
        x = torch.tensor([[0.0, -0.0]], dtype=dtype, requires_grad=True)
        y, logabsdet = SneakyReLU(s)(x)
        (g,) = torch.autograd.grad(y.sum() + 2 * logabsdet.sum(), x)
        want = float(d1 + 2 * dl)
        assert all(abs(v - want) <= tol * abs(want) for v in g[0].tolist()), (g, want)


@pytest.mark.parametrize("s", [0.1, 0.01, 0.9])
def test_derivatives_against_mpmath(s):
    """sigma', (log sigma')' and (sigma^-1)' from autograd, at REF_POINTS, within a few ulps (float64)."""
    with mpmath.workdps(200):
        sm = mpmath.mpf(s)
        x = torch.tensor(REF_POINTS, dtype=torch.float64, requires_grad=True)
        (g_sigma,) = torch.autograd.grad(sneaky_relu(x, s).sum(), x)
        (g_log,) = torch.autograd.grad(sneaky_relu_log_derivative(x, s).sum(), x)
        (g_inv,) = torch.autograd.grad(sneaky_relu_inverse(x, s).sum(), x)
        tiny = torch.finfo(torch.float64).tiny
        for i, xi in enumerate(REF_POINTS):
            d1, _, dl = mp_derivatives(mpmath.mpf(xi), sm)
            back = mp_inverse(mpmath.mpf(xi), sm)
            inv = 1 / mp_derivatives(back, sm)[0]
            for name, got, want in (("sigma'", g_sigma, d1), ("(log sigma')'", g_log, dl), ("inverse'", g_inv, inv)):
                assert rel_err(mpmath.mpf(got[i].item()), want, tiny) <= 8 * ulps(torch.float64), (
                    f"{name} at x = {xi}: {got[i].item()!r} vs {mpmath.nstr(want, 17)}")


def test_inverse_of_the_largest_floats_is_finite_or_overflows_honestly():
    """sigma^{-1}(3e38) ~ 3e38 in float32 (was NaN: (1 + alpha) y overflowed); below -s * max the true
    inverse is not representable and is -inf, never NaN."""
    for dtype, big in ((torch.float32, 3e38), (torch.float64, 1.7e308)):
        top = torch.finfo(dtype).max
        y = torch.tensor([big, top, -big / 2 * 0.1, -top], dtype=dtype)
        x = sneaky_relu_inverse(y, 0.1)
        assert not bool(torch.isnan(x).any())
        assert bool(torch.isfinite(x[:3]).all()) and x[3].item() == -math.inf
        assert_rel_close(sneaky_relu(x[:3], 0.1), y[:3], 5 * ulps(dtype), dtype)


def test_zero_sized_batch():
    layer = SneakyReLU()
    for shape in ((0, 3, 4, 4), (0,)):
        x = torch.zeros(shape, requires_grad=True)
        y, logabsdet = layer(x)
        assert y.shape == shape and logabsdet.shape == (0,)
        assert layer.inverse(y).shape == shape and sneaky_relu_log_derivative(x).shape == shape
        (y.sum() + logabsdet.sum()).backward()
        assert x.grad.shape == shape


def test_layer_transform_and_one_dimensional_input():
    layer = SneakyReLU(0.2)
    x = torch.randn(5, dtype=torch.float64) * 4
    y, logabsdet = layer(x)  # (B,) input: each entry its own sample
    assert torch.equal(y, layer.transform(x)) and torch.equal(logabsdet, sneaky_relu_log_derivative(x, 0.2))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_clearly(dtype):
    with pytest.raises(TypeError, match="float32 or float64"):
        sneaky_relu(torch.zeros(3, dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES)
def test_gradients_finite_at_extremes(dtype):
    big = 1e30
    x = torch.tensor([0.0, -0.0, 1e-30, -1e-30, big, -big, -0.45, -0.9], dtype=dtype, requires_grad=True)
    for f in (sneaky_relu, sneaky_relu_inverse, sneaky_relu_log_derivative):
        (g,) = torch.autograd.grad(f(x).sum(), x)
        assert bool(torch.isfinite(g).all()), f.__name__


@pytest.mark.parametrize("s", [0.1, 0.01, 0.7])
def test_slope_limits(s):
    x = torch.tensor([-1e8, -1e12, 0.0, 1e8, 1e12], dtype=torch.float64)
    slope = sneaky_relu_log_derivative(x, s).exp()
    torch.testing.assert_close(slope, torch.tensor([s, s, (1 + s) / 2, 1.0, 1.0], dtype=torch.float64), rtol=1e-14, atol=0)
    # asymptotes: sigma(x) - (s x - alpha c) = alpha c / (r - x) -> 0 as x -> -inf, and
    # sigma(x) - (x - alpha c) = alpha c / (r + x) -> 0 as x -> +inf (c = 1 / (1 + alpha))
    a, c = (1 - s) / (1 + s), (1 + s) / 2
    y = sneaky_relu(x, s)
    torch.testing.assert_close(y[[0, 1]], s * x[[0, 1]] - a * c, rtol=1e-14, atol=0)
    torch.testing.assert_close(y[[3, 4]], x[[3, 4]] - a * c, rtol=1e-14, atol=0)


@pytest.mark.parametrize("dtype", DTYPES)
@SETTINGS
@given(xs=value_lists, s=slopes)
def test_monotonic(dtype, xs, s):
    x = torch.tensor(sorted(xs), dtype=dtype)
    y = sneaky_relu(x, s)
    assert bool((y[1:] >= y[:-1]).all())
    assert bool(((x > 0) == (y > 0)).all()) and bool(((x < 0) == (y < 0)).all())
    d = sneaky_relu_log_derivative(x, s).exp()
    assert bool((d >= s * (1 - 4 * ulps(dtype))).all()) and bool((d <= 1).all())


# ---------------------------------------------------------------- module and validation


def test_module_matches_functional_and_inverts():
    torch.manual_seed(1)
    layer = SneakyReLU(0.3)
    x = 5 * torch.randn(4, 3, 5, 6)  # float32
    y, logabsdet = layer(x)
    assert y.dtype == x.dtype and logabsdet.shape == (4,) and logabsdet.dtype == x.dtype
    torch.testing.assert_close(y, sneaky_relu(x, 0.3), rtol=0, atol=0)
    torch.testing.assert_close(logabsdet, sneaky_relu_log_derivative(x, 0.3).sum((1, 2, 3)))
    torch.testing.assert_close(layer.inverse(y), x, rtol=3e-6, atol=0)
    assert "slope=0.3" in repr(layer)
    assert SneakyReLU().slope == 0.1
    _, flat_logdet = layer(x.reshape(4, -1))  # (B, D) inputs work too
    torch.testing.assert_close(flat_logdet, logabsdet)


@pytest.mark.parametrize("slope", [0.0, 1.0, -0.1, 1.5, float("nan"), float("inf")])
def test_bad_slope_value(slope):
    msg = "slope must lie strictly between 0 and 1"
    with pytest.raises(ValueError, match=msg):
        SneakyReLU(slope)
    for f in (sneaky_relu, sneaky_relu_inverse, sneaky_relu_log_derivative):
        with pytest.raises(ValueError, match=msg):
            f(torch.zeros(3), slope)


@pytest.mark.parametrize("slope", ["0.1", None, True, torch.tensor(0.1)])
def test_bad_slope_type(slope):
    with pytest.raises(TypeError, match="slope must be a real number"):
        SneakyReLU(slope)


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_input(bad):
    x = torch.zeros(2, 1, 2, 2)
    x[1, 0, 1, 1] = bad
    layer = SneakyReLU()
    for call in (sneaky_relu, sneaky_relu_inverse, sneaky_relu_log_derivative, layer, layer.inverse):
        with pytest.raises(ValueError, match="non-finite"):
            call(x)


def test_bad_input_type_and_shape():
    with pytest.raises(TypeError, match="floating"):
        sneaky_relu(torch.arange(4))
    with pytest.raises(TypeError, match="torch.Tensor"):
        sneaky_relu([1.0, 2.0])
    with pytest.raises(ValueError, match="batch dimension"):
        SneakyReLU()(torch.tensor(1.0))


def test_layer_gradients_are_the_analytic_ones_of_the_accurate_formulas():
    """The fused layer's hand-written backward equals autograd through the functional forms, and passes gradcheck."""
    x = (torch.randn(4, 3, 5, 5, dtype=torch.float64) * 3).requires_grad_()
    for slope in (0.1, 0.4, 0.7):
        y, logabsdet = SneakyReLU(slope)(x)
        ya = sneaky_relu(x, slope)
        la = sneaky_relu_log_derivative(x, slope).reshape(4, -1).sum(1)
        assert torch.equal(y, ya) and torch.allclose(logabsdet, la, rtol=1e-14, atol=0)
        g = torch.autograd.grad((y**2).sum() + logabsdet.sum(), x)[0]
        ga = torch.autograd.grad((ya**2).sum() + la.sum(), x)[0]
        torch.testing.assert_close(g, ga, rtol=1e-12, atol=1e-12)
    v = x[0, 0].detach().clone().requires_grad_()
    assert torch.autograd.gradcheck(lambda t: SneakyReLUWithLogDerivative.apply(t, 0.1), (v,))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_layer_gradients_stay_finite_at_huge_inputs(dtype):
    x = torch.tensor([[-1e30, -1e20, -1e6, 0.0, 1e6, 1e20, 1e30]], dtype=dtype, requires_grad=True)
    y, logabsdet = SneakyReLU(0.1)(x)
    (g,) = torch.autograd.grad(y.sum() + logabsdet.sum(), x)
    assert torch.isfinite(g).all()
    torch.testing.assert_close(g[0, 0], torch.tensor(0.1, dtype=dtype), rtol=1e-5, atol=0)
    torch.testing.assert_close(g[0, -1], torch.tensor(1.0, dtype=dtype), rtol=1e-5, atol=0)
