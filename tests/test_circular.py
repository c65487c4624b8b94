import pytest
import torch
from hypothesis import given, strategies as st

from iconv.core.circular import check_weight, circular_conv2d, circular_pad, circular_pad_adjoint, dense_conv_matrix


def loop_conv(x, weight):
    """The circular cross-correlation by its definition, index by index (wraps any kernel)."""
    B, c, h, w = x.shape
    k = weight.shape[-1]
    p = k // 2
    y = torch.zeros_like(x)
    for a in range(k):
        for b in range(k):
            shifted = torch.roll(x, shifts=(p - a, p - b), dims=(2, 3))  # x[n + a - p]
            y += torch.einsum("oc,bchw->bohw", weight[:, :, a, b], shifted)
    return y


@given(c=st.integers(1, 4), k=st.sampled_from([1, 3, 5, 7, 9]), h=st.integers(2, 7), w=st.integers(2, 7))
def test_dense_matrix_matches_definition(c, k, h, w):
    weight = torch.randn(c, c, k, k, dtype=torch.float64)
    x = torch.randn(2, c, h, w, dtype=torch.float64)
    M = dense_conv_matrix(weight, h, w)
    assert M.shape == (c * h * w, c * h * w)
    y = (x.reshape(2, -1) @ M.T).reshape(x.shape)
    torch.testing.assert_close(y, loop_conv(x, weight), rtol=1e-12, atol=1e-12)
    if k // 2 <= min(h, w):
        torch.testing.assert_close(circular_conv2d(x, weight), y, rtol=1e-12, atol=1e-12)


def test_spatial_conv_refuses_kernel_wider_than_twice_the_image():
    with pytest.raises(ValueError, match="fourier.conv2d"):
        circular_conv2d(torch.randn(1, 1, 2, 2), torch.randn(1, 1, 7, 7))


@pytest.mark.parametrize(
    "weight, match",
    [
        (torch.randn(2, 2, 3), "shape"),
        (torch.randn(2, 2, 3, 5), "square"),
        (torch.randn(2, 2, 4, 4), "odd"),
        (torch.randn(3, 2, 3, 3), "c_out"),
        (torch.full((2, 2, 3, 3), float("nan")), "non-finite"),
    ],
)
def test_bad_weights_are_refused(weight, match):
    with pytest.raises(ValueError, match=match):
        check_weight(weight)


@pytest.mark.parametrize("p,h,w", [(1, 1, 1), (1, 3, 4), (2, 2, 5), (3, 7, 3)])
def test_circular_pad_wraps_rows_and_columns_around(p, h, w):
    x = torch.randn(2, 3, h, w, dtype=torch.float64)
    rows = torch.arange(-p, h + p) % h  # out[i, j] = x[(i - p) % h, (j - p) % w]
    cols = torch.arange(-p, w + p) % w
    assert torch.equal(circular_pad(x, p), x[:, :, rows][:, :, :, cols])


def test_circular_pad_adjoint_is_the_adjoint_and_the_gradient():
    torch.manual_seed(0)
    for p, (h, w) in [(1, (4, 5)), (2, (3, 2)), (2, (5, 5)), (3, (3, 4))]:
        x = torch.randn(2, 3, h, w, dtype=torch.float64, requires_grad=True)
        g = torch.randn(2, 3, h + 2 * p, w + 2 * p, dtype=torch.float64)
        padded = torch.nn.functional.pad(x, (p,) * 4, mode="circular")
        (expected,) = torch.autograd.grad(padded, x, g)
        torch.testing.assert_close(circular_pad_adjoint(g, p), expected, rtol=1e-14, atol=1e-14)
        lhs, rhs = (padded * g).sum(), (x * circular_pad_adjoint(g, p)).sum()
        assert abs(lhs.item() - rhs.item()) < 1e-12 * abs(lhs.item())
