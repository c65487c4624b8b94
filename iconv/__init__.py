"""iconv: exact, fast invertible convolutional networks.

Finzi, Izmailov, Maddox, Kirichenko, Wilson, "Invertible Convolutional Networks" (2019): circular
convolutions inverted frequency by frequency, SneakyReLU, invertible downsampling, and the fully
convolutional normalizing flow and classifier built from them.

Layout: :mod:`iconv.core` (the Fourier core), :mod:`iconv.layers` (invertible layers and
containers, one contract), :mod:`iconv.models` (flows and the classifier), and the tasks around
them: :mod:`iconv.losses`, :mod:`iconv.evaluation`, :mod:`iconv.train`, :mod:`iconv.data`,
:mod:`iconv.bench`, :mod:`iconv.configs`, :mod:`iconv.book`.
"""
import sys as _sys

from . import core, data, layers, models
from .core import circular, fourier, lifting
from .core.circular import circular_conv2d, dense_conv_matrix
from .errors import NotInvertibleError
from .layers import (ActNorm, AvgDownsample, InvertibleConv2d, InvertibleModule, InvertibleSequential, MultiScale,
                     NNDownsample, SneakyReLU, Squeeze)
from .layers.activations import sneaky_relu, sneaky_relu_inverse, sneaky_relu_log_derivative
from .models import ConvFlow, ConvNet, GlowBaseline
from .train.checkpoint import load  # iconv.load(path): the ready model of any checkpoint

# The core modules keep their historical import paths: ``import iconv.fourier`` works.
_sys.modules[__name__ + ".fourier"] = fourier
_sys.modules[__name__ + ".lifting"] = lifting

__version__ = "0.2.0"

__all__ = [
    "data", "core", "layers", "models", "fourier", "lifting", "circular", "circular_conv2d", "dense_conv_matrix",
    "InvertibleModule", "InvertibleSequential", "MultiScale", "InvertibleConv2d", "SneakyReLU", "ActNorm",
    "sneaky_relu", "sneaky_relu_inverse", "sneaky_relu_log_derivative", "Squeeze", "NNDownsample",
    "AvgDownsample", "NotInvertibleError", "ConvFlow", "GlowBaseline", "ConvNet", "load",
]
