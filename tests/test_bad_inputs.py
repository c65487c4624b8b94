"""The package's bad-input table (issue 10): each case gets the right answer or a clear error."""
import math

import pytest
import torch

import iconv
from iconv import fourier
from iconv.layers import ActNorm, AvgDownsample, InvertibleConv2d, NNDownsample, PixelAffine, Squeeze

C = 4


def image(batch=2, dtype=torch.float32, device="cpu"):
    return torch.randn(batch, C, 8, 8, dtype=dtype, device=device)


def layers():
    return [InvertibleConv2d(C), ActNorm(C), PixelAffine((C, 8, 8)), Squeeze(), NNDownsample(), AvgDownsample()]


@pytest.mark.parametrize("layer", layers(), ids=lambda l: type(l).__name__)
def test_an_empty_batch_gives_empty_outputs(layer):
    y, logabsdet = layer(image(0))
    assert y.shape[0] == 0 and logabsdet.shape == (0,)
    with torch.no_grad():
        assert layer.inverse(y).shape == (0, C, 8, 8)


@pytest.mark.parametrize("layer", layers(), ids=lambda l: type(l).__name__)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_is_refused_naming_argument_and_dtype(layer, dtype):
    with pytest.raises(TypeError, match=rf"x must be floating of dtype float32 or float64, got dtype {dtype}|"
                                        rf"input must be floating of dtype float32 or float64, got dtype {dtype}"):
        layer(image(dtype=dtype))


@pytest.mark.parametrize("layer", layers(), ids=lambda l: type(l).__name__)
def test_meta_tensors_are_refused(layer):
    with pytest.raises(ValueError, match="meta tensor"):
        layer(image(device="meta"))


@pytest.mark.parametrize("layer", [InvertibleConv2d(C), ActNorm(C), PixelAffine((C, 8, 8))],
                         ids=lambda l: type(l).__name__)
def test_float64_into_a_float32_layer_is_refused_both_ways(layer):
    with pytest.raises(TypeError, match=r"x has dtype torch.float64 but the layer's parameters are torch.float32"):
        layer(image(dtype=torch.float64))
    with torch.no_grad(), pytest.raises(TypeError, match=r"y has dtype torch.float64"):
        layer.inverse(image(dtype=torch.float64))
    y, _ = layer.double()(image(dtype=torch.float64))  # converted, it computes in float64
    assert y.dtype == torch.float64


def test_a_nan_bias_is_refused():
    layer = InvertibleConv2d(C)
    with torch.no_grad():
        layer.bias[1] = math.nan
    with pytest.raises(ValueError, match=r"InvertibleConv2d.bias holds non-finite"):
        layer(image())
    with torch.no_grad(), pytest.raises(ValueError, match=r"bias holds non-finite"):
        layer.inverse(image())
    w = layer.weight.detach()
    with pytest.raises(ValueError, match="bias holds non-finite"):
        fourier.inverse(image(), w, layer.bias.detach())


def test_validation_happens_only_at_the_boundary():
    """Inside a container the layers skip their checks (no per-layer host sync)."""
    model = iconv.InvertibleSequential(InvertibleConv2d(C), ActNorm(C))
    with torch.no_grad():
        model[1].bias[0] = math.nan  # an inner layer's bad parameter is not re-checked per call ...
    y, _ = model(image())
    assert not torch.isfinite(y).all()  # ... the model's own boundary check is the place for it
    with pytest.raises(TypeError, match="float16"):
        model(image(dtype=torch.float16))  # but the outermost call still validates its input


@pytest.mark.parametrize("cls", [ActNorm, PixelAffine])
@pytest.mark.parametrize("batch", ["constant", "one image"])
def test_data_dependent_start_on_degenerate_batches_stays_bounded(cls, batch):
    layer = cls(C) if cls is ActNorm else cls((C, 8, 8))
    x = torch.full((16, C, 8, 8), 0.3) if batch == "constant" else image(1)
    layer.initialize_from(x)
    assert torch.isfinite(layer.log_scale).all() and layer.log_scale.exp().max() <= 20.0 + 1e-4


@pytest.mark.parametrize("batch", ["constant", "one image"])
def test_a_flow_initialised_on_a_degenerate_batch_has_finite_bits_per_dim(batch):
    torch.manual_seed(0)
    flow = iconv.ConvFlow((1, 8, 8), depth=2)
    x = torch.full((8, 1, 8, 8), 0.3) if batch == "constant" else torch.rand(1, 1, 8, 8)
    flow.initialize(x)
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8)
    with torch.no_grad():
        bpd = flow.bits_per_dim(images)
    assert torch.isfinite(bpd).all() and bpd.max() < 1e3  # was inf / 1e15 with unfloored deviations
