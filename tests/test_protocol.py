r"""The one protocol test: every invertible layer and model of iconv keeps the same contract.

For every case (a module with non-identity parameters and an input of odd or even size, float64):

* round trip: ``inverse(forward(x)) == x`` and ``forward(inverse(y)) == y``;
* log-determinant: ``forward(x)[1]`` equals ``log|det J|`` of the autograd Jacobian of the
  flattened map (an independent reference: ``torch.linalg.slogdet``), sample by sample;
* batch independence: a sample's output and log-determinant do not depend on the other samples;
* the same map in train and eval mode, where the class promises it (everything but BatchNorm);
* dtype and device preserved (float64 and float32, every available device);
* ``transform(x) == forward(x)[0]``, ``output_shape`` equals the real output's shape, and the
  log-determinant has shape ``(B,)``.

:func:`test_every_export_has_a_case` walks ``iconv.layers`` and ``iconv.models`` and fails on a
module class that is neither an :class:`~iconv.layers.InvertibleModule` covered by a case nor
named in :data:`NOT_INVERTIBLE` with the reason: a new export without a case fails here.
"""
from __future__ import annotations

import dataclasses
import importlib
import inspect
import pkgutil
from typing import Callable

import pytest
import torch
from torch import nn

import iconv
import iconv.layers
import iconv.models
from iconv.layers import (ActNorm, AffineCoupling, AvgDownsample, Invertible1x1Conv, InvertibleBatchNorm2d,
                          InvertibleConv2d, InvertibleModule, InvertibleSequential, LogitTransform, MultiScale,
                          NNDownsample, PixelAffine, SneakyReLU, Squeeze)
from iconv.models import ConvFlow, ConvNet, GlowBaseline, PaperFlow
from iconv.models.flow import flow_step

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


# --------------------------------------------------------------------------- non-identity parameters


@torch.no_grad()
def perturb(module: nn.Module, scale: float = 0.2) -> nn.Module:
    """Move every parameter of the identity-initialised layers away from its start.

    ActNorm / PixelAffine get random scales and shifts, the couplings a non-zero last layer,
    1x1 convs a non-orthogonal weight (an orthogonal one has log|det| = 0, a check that cannot
    fail), convs a random bias and a weight scaled by 1.3 (log|det| clearly non-zero), BatchNorm
    random running statistics and affine parameters.
    """
    for m in module.modules():
        if isinstance(m, (ActNorm, PixelAffine)):
            m.log_scale.normal_(0, scale)
            m.bias.normal_(0, scale)
        elif isinstance(m, AffineCoupling):
            for p in m.net[-1].parameters():
                p.normal_(0, scale)
        elif isinstance(m, Invertible1x1Conv):
            m.weight.add_(scale * torch.randn_like(m.weight))
        elif isinstance(m, InvertibleConv2d):
            m.weight.mul_(1.3)
            if m.bias is not None:
                m.bias.normal_(0, scale)
        elif isinstance(m, InvertibleBatchNorm2d):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.uniform_(0.7, 1.5)
            m.bias.normal_(0, 0.3)
    return module


# --------------------------------------------------------------------------- the cases


@dataclasses.dataclass
class Case:
    """A module (built fresh, float64, perturbed) and the shape ``(C, H, W)`` of one input sample."""

    name: str
    build: Callable[[], InvertibleModule]
    shape: tuple[int, ...]
    #: ``"rand"``: inputs in (0, 1) (flows, the logit); ``"randn"``: anywhere.
    inputs: str = "randn"
    #: The class promises the same map in train and eval mode (BatchNorm does not).
    train_equals_eval: bool = True
    #: Run the checks in evaluation mode (BatchNorm: only there is the map a function of one sample).
    eval_mode: bool = False
    #: Round-trip tolerance in float32 (nine conv/BatchNorm/SneakyReLU blocks amplify rounding).
    float32_tolerance: float = 1e-3

    def module(self, dtype=torch.float64, device="cpu") -> InvertibleModule:
        torch.manual_seed(0)
        m = perturb(self.build().to(dtype)).to(device)
        return m.eval() if self.eval_mode else m.train()

    def input(self, batch: int, dtype=torch.float64, device="cpu", seed: int = 1) -> torch.Tensor:
        g = torch.Generator().manual_seed(seed)
        if self.inputs == "rand":
            x = 0.02 + 0.96 * torch.rand(batch, *self.shape, generator=g, dtype=torch.float64)
        else:
            x = torch.randn(batch, *self.shape, generator=g, dtype=torch.float64)
        return x.to(dtype=dtype, device=device)


def conv_net_extractor(downsample: str, in_channels: int = 2, width: int = 4) -> InvertibleModule:
    """The invertible ConvNet's feature extractor (a MultiScale), with random BatchNorm statistics."""
    net = ConvNet(in_channels, 10, width, padding="circular", activation="sneaky", downsample=downsample)
    return net.extractor


def multiscale_two_levels() -> MultiScale:
    """Levels at 6x10 and (after a squeeze) 3x5; one channel set aside."""
    return MultiScale([InvertibleSequential(InvertibleConv2d(2), SneakyReLU(0.3)),
                       InvertibleSequential(Squeeze(), ActNorm(4), InvertibleConv2d(4, 1))],
                      factor_out=[1], in_channels=2)


def multiscale_three_levels() -> MultiScale:
    """Parts set aside at 8x4 (packed by 4x4 space-to-depth) and at 4x2; the last level at 2x1."""
    return MultiScale([InvertibleSequential(ActNorm(2), SneakyReLU()),
                       InvertibleSequential(NNDownsample(), InvertibleConv2d(4, 3)),
                       InvertibleSequential(AvgDownsample(), InvertibleConv2d(12, 1))],
                      factor_out=[1, 1], in_channels=2)


CASES = [
    # InvertibleConv2d: both backends, kernel sizes 1, 3, 5, 7 (7 on a 2x5 image: the Fourier path)
    *[Case(f"InvertibleConv2d-{backend}-k{k}-{h}x{w}", lambda c=c, k=k, b=backend: InvertibleConv2d(c, k, backend=b),
           (c, h, w))
      for backend in ("complex", "lifted")
      for c, k, h, w in [(3, 1, 3, 4), (2, 3, 5, 4), (2, 5, 3, 3), (1, 7, 2, 5)]],
    Case("InvertibleConv2d-no-bias", lambda: InvertibleConv2d(3, 3, bias=False), (3, 4, 3)),
    Case("SneakyReLU", lambda: SneakyReLU(0.3), (2, 3, 5)),
    Case("Squeeze", Squeeze, (2, 6, 10)),
    Case("NNDownsample", NNDownsample, (1, 6, 2)),
    Case("AvgDownsample", AvgDownsample, (2, 2, 6)),
    Case("ActNorm", lambda: ActNorm(3), (3, 3, 5)),
    # FlowStep: called by the user (layer by layer) and inside a model (the affine folded into the conv)
    Case("FlowStep", lambda: flow_step(3, 3, slope=0.3), (3, 4, 5)),
    Case("FlowStep-inside", lambda: InvertibleSequential(SneakyReLU(0.3), flow_step(3, 3, slope=0.3)), (3, 4, 5)),
    Case("FlowStep-inside-k1-no-activation",
         lambda: InvertibleSequential(SneakyReLU(0.3), flow_step(2, 1, activation=False)), (2, 3, 3)),
    Case("PixelAffine", lambda: PixelAffine((2, 3, 5)), (2, 3, 5)),
    Case("LogitTransform", lambda: LogitTransform(0.1), (2, 3, 5), inputs="rand"),
    Case("Invertible1x1Conv", lambda: Invertible1x1Conv(4), (4, 3, 2)),
    Case("AffineCoupling-even", lambda: AffineCoupling(4, hidden=5), (4, 3, 3)),
    Case("AffineCoupling-odd-channels", lambda: AffineCoupling(3, hidden=4), (3, 2, 5)),
    Case("InvertibleBatchNorm2d-eval", lambda: InvertibleBatchNorm2d(3), (3, 3, 5),
         train_equals_eval=False, eval_mode=True),
    Case("InvertibleSequential", lambda: InvertibleSequential(ActNorm(2), InvertibleConv2d(2, 3), SneakyReLU(0.2)),
         (2, 5, 3)),
    Case("InvertibleSequential-empty", InvertibleSequential, (2, 3, 3)),
    Case("MultiScale-2-levels", multiscale_two_levels, (2, 6, 10)),
    Case("MultiScale-3-levels", multiscale_three_levels, (2, 8, 4)),
    *[Case(f"ConvFlow-{d}", lambda d=d: ConvFlow((1, 4, 4), depth=1, downsample=d, init_scale=0.3), (1, 4, 4),
           inputs="rand") for d in ("squeeze", "nn", "avg")],
    Case("ConvFlow-odd-levels", lambda: ConvFlow((1, 6, 10), depth=2, scales=1, kernel_size=5, slope=0.2), (1, 6, 10),
         inputs="rand"),
    Case("ConvFlow-3-scales", lambda: ConvFlow((1, 8, 8), depth=[1, 0, 1], scales=3, pixel_affine=False), (1, 8, 8),
         inputs="rand"),
    Case("ConvFlow-lifted-rgb", lambda: ConvFlow((3, 2, 6), depth=1, backend="lifted"), (3, 2, 6), inputs="rand"),
    Case("GlowBaseline", lambda: GlowBaseline((1, 4, 4), depth=2, hidden=6), (1, 4, 4), inputs="rand"),
    Case("GlowBaseline-rgb-2-scales", lambda: GlowBaseline((3, 4, 4), depth=1, hidden=4, scales=2), (3, 4, 4),
         inputs="rand"),
    Case("PaperFlow", lambda: PaperFlow((1, 4, 4), pad_channels=1, depth=1, init_scale=0.3), (2, 4, 4),
         inputs="rand"),
    Case("PaperFlow-actnorm-rgb-1-scale", lambda: PaperFlow((3, 3, 5), pad_channels=2, depth=[2], scales=1,
                                                           kernel_size=3, actnorm=True), (5, 3, 5), inputs="rand"),
    *[Case(f"ConvNet.extractor-{d}", lambda d=d: conv_net_extractor(d), (4, 4, 8), train_equals_eval=False,
           eval_mode=True, float32_tolerance=1e-2) for d in ("squeeze", "nn", "avg")],
]

#: Classes of iconv.layers / iconv.models that are deliberately not covered, and why.
NOT_INVERTIBLE = {
    "InvertibleModule": "the abstract base class (every case is one)",
    "FlowModel": "the abstract base of ConvFlow, GlowBaseline and PaperFlow (all are cases)",
    "Downsample2x2": "the abstract base of the three 2x2 downsamplings (all three are cases)",
    "Forward": "an adapter that uses an invertible module as an ordinary one (f.transform)",
    "ConvNet": "a classifier (images -> logits); its invertible part, ConvNet.extractor, is a case",
    "ChannelPad": "injective, not a bijection (appends zero channels); tested in test_classifier",
    "ZeroPaddedConv2d": "the non-invertible zero-padded conv of Table 1's first rows",
}


def tolerance(dtype, float32: float = 1e-3):
    return {"atol": 1e-10, "rtol": 1e-10} if dtype == torch.float64 else {"atol": float32, "rtol": float32}


# --------------------------------------------------------------------------- the checks


def check_contract(f: InvertibleModule, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Shapes, dtype, device, ``transform`` and ``output_shape``; returns ``forward(x)``."""
    y, logabsdet = f(x)
    assert isinstance(y, torch.Tensor) and isinstance(logabsdet, torch.Tensor)
    assert logabsdet.shape == (x.shape[0],), f"logabsdet has shape {tuple(logabsdet.shape)}, expected (B,)"
    for name, t in (("y", y), ("logabsdet", logabsdet)):
        assert t.dtype == x.dtype, f"{name} has dtype {t.dtype}, input {x.dtype}"
        assert t.device == x.device, f"{name} is on {t.device}, input on {x.device}"
        assert bool(torch.isfinite(t).all()), f"{name} is not finite"
    assert y.numel() == x.numel(), "a bijection keeps the number of dimensions"
    assert tuple(f.output_shape(x.shape[1:])) == tuple(y.shape[1:]), "output_shape disagrees with the output"
    torch.testing.assert_close(f.transform(x), y, atol=0, rtol=1e-14)
    return y, logabsdet


def check_round_trip(f: InvertibleModule, x: torch.Tensor, y: torch.Tensor, float32: float = 1e-3) -> None:
    x_back = f.inverse(y)
    assert x_back.dtype == x.dtype and x_back.device == x.device and x_back.shape == x.shape
    torch.testing.assert_close(x_back, x, **tolerance(x.dtype, float32))
    # and the other way round, from a point that is not the image of the test input
    g = torch.Generator().manual_seed(7)
    y2 = y + 0.05 * torch.randn(y.shape, generator=g, dtype=torch.float64).to(y)
    torch.testing.assert_close(f(f.inverse(y2))[0], y2, **tolerance(x.dtype, float32))


def jacobian_logabsdet(f: InvertibleModule, x: torch.Tensor) -> torch.Tensor:
    """log|det| of the autograd Jacobian of the flattened map at each sample: ``(B,)``.

    Row ``k`` of the Jacobian at ``x_i`` is the gradient of output ``k``; all ``D`` rows come from
    one backward pass through a batch of ``D`` copies of ``x_i`` (copy ``k`` carries output ``k``),
    which is exact because the map acts on each sample separately (checked by
    :func:`check_batch_independence`).
    """
    out = []
    d = x[0].numel()
    for xi in x:
        copies = xi.detach().expand(d, *xi.shape).clone().requires_grad_(True)
        y = f(copies)[0].reshape(d, -1)
        assert y.shape[1] == d, f"the Jacobian is {y.shape[1]} x {d}, not square"
        (jac,) = torch.autograd.grad(y.diagonal().sum(), copies)
        out.append(torch.linalg.slogdet(jac.reshape(d, d))[1])
    return torch.stack(out)


def check_batch_independence(f: InvertibleModule, x: torch.Tensor, y: torch.Tensor, logabsdet: torch.Tensor) -> None:
    """Sample ``i`` alone, and the batch in reverse order, give the same outputs."""
    for i in range(x.shape[0]):
        yi, li = f(x[i:i + 1])
        torch.testing.assert_close(yi[0], y[i], atol=1e-12, rtol=1e-12)
        torch.testing.assert_close(li[0], logabsdet[i], atol=1e-12, rtol=1e-12)
    y_rev, l_rev = f(x.flip(0))
    torch.testing.assert_close(y_rev, y.flip(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(l_rev, logabsdet.flip(0), atol=1e-12, rtol=1e-12)
    torch.testing.assert_close(f.inverse(y[1:2])[0], f.inverse(y)[1], atol=1e-12, rtol=1e-12)


def check_train_equals_eval(f: InvertibleModule, x: torch.Tensor) -> None:
    was_training = f.training
    y_train, l_train = f.train()(x)
    y_eval, l_eval = f.eval()(x)
    x_train, x_eval = f.train().inverse(y_train), f.eval().inverse(y_train)
    f.train(was_training)
    assert torch.equal(y_train, y_eval) and torch.equal(l_train, l_eval), "forward differs in train and eval mode"
    assert torch.equal(x_train, x_eval), "inverse differs in train and eval mode"


# --------------------------------------------------------------------------- the test


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_protocol(case: Case):
    f = case.module()
    assert isinstance(f, InvertibleModule)
    x = case.input(3)
    y, logabsdet = check_contract(f, x)
    check_round_trip(f, x, y)
    assert logabsdet.abs().max() > 1e-3 or case.name.startswith(("Squeeze", "NNDownsample", "InvertibleSequential-"
                                                                 "empty")), "a trivial log-determinant"
    torch.testing.assert_close(logabsdet[:2], jacobian_logabsdet(f, x[:2]), atol=1e-9, rtol=1e-10)
    check_batch_independence(f, x, y, logabsdet)
    if case.train_equals_eval:
        check_train_equals_eval(f, x)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_protocol_in_float32(case: Case, device: str):
    """The same contract in float32 (and on every available device): dtype and device preserved."""
    f = case.module(torch.float32, device)
    x = case.input(2, torch.float32, device)
    y, _ = check_contract(f, x)
    check_round_trip(f, x, y, case.float32_tolerance)


# --------------------------------------------------------------------------- coverage


def exported_module_classes() -> dict[str, type]:
    """Every public ``nn.Module`` class defined in a module of iconv.layers or iconv.models, or exported by them."""
    found = {}
    for package in (iconv.layers, iconv.models):
        modules = [package] + [importlib.import_module(f"{package.__name__}.{info.name}")
                               for info in pkgutil.iter_modules(package.__path__)]
        for module in modules:
            names = set(getattr(module, "__all__", ())) | {
                name for name, obj in vars(module).items()
                if inspect.isclass(obj) and obj.__module__ == module.__name__}
            for name in names:
                obj = getattr(module, name)
                if inspect.isclass(obj) and issubclass(obj, nn.Module) and not name.startswith("_"):
                    if obj.__module__.startswith("iconv."):
                        found[name] = obj
    return found


def covered_classes() -> set[type]:
    covered = set()
    for case in CASES:
        covered |= {type(m) for m in case.build().modules()}
    return covered


def test_every_export_has_a_case():
    exported = exported_module_classes()
    assert {"InvertibleConv2d", "ConvFlow", "MultiScale", "ConvNet"} <= set(exported)  # the walk finds things
    covered = covered_classes()
    top_level = {type(case.build()) for case in CASES}
    missing = []
    for name, cls in sorted(exported.items()):
        if name in NOT_INVERTIBLE:
            continue
        if not issubclass(cls, InvertibleModule):
            missing.append(f"{name} is exported but is not an InvertibleModule")
        elif cls not in top_level:
            missing.append(f"{name} has no case in tests/test_protocol.py CASES")
    assert not missing, "; ".join(missing)
    assert not [n for n in NOT_INVERTIBLE if n not in exported], "NOT_INVERTIBLE names a class that is gone"
    assert covered >= {cls for name, cls in exported.items() if name not in NOT_INVERTIBLE}


def test_every_public_name_of_the_package_that_is_a_layer_is_invertible():
    """``iconv.X`` for every layer and model of ``iconv.__all__`` (issue 8's public names)."""
    for name in iconv.__all__:
        obj = getattr(iconv, name)
        if inspect.isclass(obj) and issubclass(obj, nn.Module) and name not in NOT_INVERTIBLE:
            assert issubclass(obj, InvertibleModule), name
