"""iconv: exact, fast invertible convolutional networks.

Finzi, Izmailov, Maddox, Kirichenko, Wilson, "Invertible Convolutional Networks" (2019): circular
convolutions inverted frequency by frequency, SneakyReLU, invertible downsampling, and the fully
convolutional normalizing flow and classifier built from them.
"""
from . import data, fourier, lifting
from .activations import SneakyReLU, sneaky_relu, sneaky_relu_inverse, sneaky_relu_log_derivative
from .circular import circular_conv2d, dense_conv_matrix
from .conv import InvertibleConv2d
from .downsample import AvgDownsample, NNDownsample, Squeeze
from .errors import NotInvertibleError
from .classifier import ConvNet
from .flow import ConvFlow

__version__ = "0.1.0"

__all__ = [
    "data", "fourier", "lifting", "circular_conv2d", "dense_conv_matrix", "InvertibleConv2d", "SneakyReLU",
    "sneaky_relu", "sneaky_relu_inverse", "sneaky_relu_log_derivative", "Squeeze", "NNDownsample",
    "AvgDownsample", "NotInvertibleError", "ConvFlow", "ConvNet",
]
