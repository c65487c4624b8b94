import pytest
import torch
from hypothesis import given, strategies as st

from iconv.core.circular import check_weight, circular_conv2d, dense_conv_matrix


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
