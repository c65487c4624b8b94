"""Invertible layers, all following one contract (:class:`InvertibleModule`), and the containers
models are built from (:class:`InvertibleSequential`, :class:`MultiScale`)."""
from .activations import SneakyReLU
from .affine import ActNorm, LogitTransform, PixelAffine
from .base import Forward, InvertibleModule, InvertibleSequential, MultiScale
from .conv import InvertibleConv2d
from .coupling import AffineCoupling, Invertible1x1Conv
from .downsample import AvgDownsample, NNDownsample, Squeeze
from .normalization import InvertibleBatchNorm2d

__all__ = ["ActNorm", "AffineCoupling", "AvgDownsample", "Forward", "Invertible1x1Conv", "InvertibleBatchNorm2d",
           "InvertibleConv2d", "InvertibleModule", "InvertibleSequential", "LogitTransform", "MultiScale",
           "NNDownsample", "PixelAffine", "SneakyReLU", "Squeeze"]
