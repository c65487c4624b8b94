import pytest
import torch
from hypothesis import given, strategies as st

from iconv import lifting


def crandn(*shape):
    return torch.complex(torch.randn(*shape, dtype=torch.float64), torch.randn(*shape, dtype=torch.float64))


@given(n=st.integers(1, 9), batch=st.integers(1, 4))
def test_lift_is_a_ring_homomorphism(n, batch):
    C, V = crandn(batch, n, n), crandn(batch, n, n)
    torch.testing.assert_close(lifting.lift(C @ V), lifting.lift(C) @ lifting.lift(V), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(lifting.lift(C + V), lifting.lift(C) + lifting.lift(V))
    torch.testing.assert_close(lifting.unlift(lifting.lift(C)), C)
    eye = torch.eye(n, dtype=torch.complex128)
    torch.testing.assert_close(lifting.lift(eye), torch.eye(2 * n, dtype=torch.float64))


@given(n=st.integers(1, 9), batch=st.integers(1, 4))
def test_logabsdet_is_half_the_lifted_one(n, batch):
    C = crandn(batch, n, n)
    torch.testing.assert_close(lifting.logabsdet(C), torch.linalg.slogdet(C)[1], rtol=1e-10, atol=1e-10)


@given(n=st.integers(1, 9), m=st.integers(1, 4))
def test_solve_matches_complex_solve(n, m):
    C = crandn(3, n, n) + 3 * torch.eye(n)
    B = crandn(3, n, m)
    torch.testing.assert_close(lifting.solve(C, B), torch.linalg.solve(C, B), rtol=1e-10, atol=1e-10)
    b = crandn(3, n)
    torch.testing.assert_close(C @ lifting.solve(C, b).unsqueeze(-1), b.unsqueeze(-1), rtol=1e-10, atol=1e-10)


def test_lifted_logabsdet_gradient_matches_complex_slogdet():
    C = crandn(2, 4, 4).requires_grad_(True)
    (g1,) = torch.autograd.grad(lifting.logabsdet(C).sum(), C)
    (g2,) = torch.autograd.grad(torch.linalg.slogdet(C)[1].sum(), C)
    torch.testing.assert_close(g1, g2, rtol=1e-10, atol=1e-10)


def test_large_batches_stay_right_past_the_cpu_lu_bug():
    """n = 2c >= 150 is where torch 2.13's batched LU on 2 threads breaks; the guard must hold."""
    C = crandn(8, 80, 80) + 10 * torch.eye(80)
    expected = torch.stack([torch.linalg.slogdet(c)[1] for c in C])  # one matrix at a time: unaffected
    torch.testing.assert_close(lifting.logabsdet(C), expected, rtol=1e-10, atol=1e-10)
    B = crandn(8, 80, 2)
    torch.testing.assert_close(C @ lifting.solve(C, B), B, rtol=1e-9, atol=1e-9)


def test_unlift_refuses_a_matrix_without_the_block_form():
    with pytest.raises(ValueError, match="block form"):
        lifting.unlift(torch.randn(4, 4, dtype=torch.float64))
    with pytest.raises(TypeError, match="complex"):
        lifting.lift(torch.randn(3, 3))
