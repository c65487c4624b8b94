"""Independent references shared by the tests."""
import torch

from iconv.circular import dense_conv_matrix


def dense_apply(weight, x):
    """Apply the circular conv through its dense matrix: ``(B, c, h, w)``."""
    h, w = x.shape[-2:]
    M = dense_conv_matrix(weight, h, w)
    return (x.reshape(x.shape[0], -1) @ M.T).reshape(x.shape)


def dense_logabsdet(weight, h, w):
    return torch.linalg.slogdet(dense_conv_matrix(weight, h, w))[1]


def relerr(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def random_weight(c, k, dtype=torch.float64, identity=1.0):
    """A random kernel plus ``identity`` at the centre tap (keeps random draws away from singular)."""
    w = torch.randn(c, c, k, k, dtype=dtype) / (c * k)
    w[:, :, k // 2, k // 2] += identity * torch.eye(c, dtype=dtype)
    return w
