"""A guard around batched matrix factorizations on the CPU.

torch 2.13's CPU build (MKL) returns wrong values, prints DLASWP errors or hangs when a *batched*
LU factorization (``lu_factor``, ``solve``, ``slogdet``, ``inv``) of matrices of size >= 150 runs
on two or more threads (pytorch issue 142815). The lifted path meets such sizes from c = 75
(2c = 150). Triangular solves and matrix products are not affected, and neither is CUDA.

Every factorization in iconv runs inside :func:`safe_factorization_threads`, which drops to one
thread for the call when the matrices are large enough to be at risk and restores the count after.
"""
from __future__ import annotations

import contextlib

import torch

#: Matrices at least this large are factorized on one CPU thread (the bug starts at 150).
RISKY_SIZE = 128


@contextlib.contextmanager
def safe_factorization_threads(matrices: torch.Tensor):
    """Run the enclosed factorization of ``matrices`` (..., n, n) on one thread when at risk."""
    threads = torch.get_num_threads()
    at_risk = matrices.device.type == "cpu" and matrices.shape[-1] >= RISKY_SIZE and threads > 1
    if not at_risk:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
