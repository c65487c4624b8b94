"""The Fourier core: circular convolutions as per-frequency blocks, their exact inverse and
log-determinant (:mod:`~iconv.core.fourier`), the real lifting of complex matrices
(:mod:`~iconv.core.lifting`), the spatial definition and its dense matrix
(:mod:`~iconv.core.circular`), and the guard around CPU batched factorizations
(:mod:`~iconv.core.threads`)."""
from . import circular, fourier, lifting, threads

__all__ = ["circular", "fourier", "lifting", "threads"]
