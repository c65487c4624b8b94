"""iconv.models.classifier: the Table 1 ConvNet, its factor-out structure, its inverse, the loss and
diagnostics that go with it (iconv.losses, iconv.evaluation), a few training steps of every row.

The contract of the invertible feature extractor (round trip, log-determinant, batch independence)
is checked in tests/test_protocol.py.
"""
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings, strategies as st
from torch import nn

import iconv
from iconv.configs import TABLE1
from iconv.data import prepare_images
from iconv.evaluation import evaluate_accuracy
from iconv.layers import InvertibleBatchNorm2d, InvertibleConv2d, InvertibleSequential, MultiScale
from iconv.losses import classification_loss, make_loss
from iconv.models import classifier
from iconv.models.classifier import ChannelPad, ConfigurationNotInvertibleError, ConvNet, ZeroPaddedConv2d
from iconv.train import TrainConfig, fit, load_checkpoint
from tests.helpers import relerr

INVERTIBLE = [row for row in TABLE1 if row.invertible]


def tiny_images(n=32, channels=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def warmed_up(net, channels, h, w, dtype=torch.float64):
    """Give BatchNorm running statistics of inputs like ``sample_inputs`` and non-trivial affine
    parameters, then switch to evaluation mode."""
    net = net.to(dtype).train()
    with torch.no_grad():
        for _ in range(3):
            net(sample_inputs(32, channels, h, w, dtype))
        for norm in net.modules():
            if isinstance(norm, nn.BatchNorm2d):
                norm.weight.uniform_(0.8, 1.25)
                norm.bias.normal_(0, 0.3)
    return net.eval()


def sample_inputs(n, channels, h, w, dtype=torch.float64):
    return torch.randn(n, channels, h, w, dtype=dtype) + 0.3


def params(model):
    return torch.cat([p.detach().flatten() for p in model.state_dict().values() if p.is_floating_point()])


# --------------------------------------------------------------------------- Table 1


def test_table1_holds_the_papers_rows():
    assert [row.paper_accuracy for row in TABLE1] == [94.6, 94.6, 93.0, 92.0, 92.5, 92.6]
    for row in TABLE1[1:]:
        change = row.paper_accuracy - TABLE1[row.compared_with].paper_accuracy
        assert row.paper_change == pytest.approx(change, abs=1e-9)
    assert [row.invertible for row in TABLE1] == [False, False, False, True, True, True]
    assert {row.downsample for row in INVERTIBLE} == set(classifier.INVERTIBLE_DOWNSAMPLES)
    # each step changes exactly one switch relative to the row it is compared with
    for row in TABLE1[1:]:
        base = TABLE1[row.compared_with].switches
        assert sum(base[k] != v for k, v in row.switches.items()) == 1, row.change


@pytest.mark.parametrize("row", TABLE1, ids=lambda r: r.downsample + "-" + r.padding + "-" + r.activation)
def test_every_configuration_builds_and_trains_a_few_steps(row):
    images, labels = tiny_images(48)
    torch.manual_seed(0)
    net = ConvNet(1, 10, 4, **row.switches)
    before = params(net).clone()
    cfg = TrainConfig(steps=4, batch_size=16, lr=0.05, optimizer="sgd", momentum=0.9, device="cpu")
    history = fit(net, classification_loss, images, labels, config=cfg, progress=False,
                  evaluate=lambda m: {"test_accuracy": evaluate_accuracy(m, images, labels)})
    assert history.steps == 4 and all(math.isfinite(r["loss"]) for r in history.train)
    assert 0.0 <= history.last_eval["test_accuracy"] <= 1.0
    assert not torch.equal(params(net), before)
    assert net(prepare_images(images[:3])).shape == (3, 10)


def test_shapes_and_head_channels():
    x = torch.randn(2, 3, 12, 8)
    for row in TABLE1:
        net = ConvNet(3, 7, 6, **row.switches)
        features = net.features(x)
        channels = 16 * 6 if row.invertible else 2 * 6
        assert features.shape == (2, channels, 3, 2) and net.feature_channels == channels
        assert net.head_channels == 12
        logits = net(x)
        torch.testing.assert_close(logits, net.head(features[:, :12].mean((2, 3))))
        assert net.conv_sizes((12, 8))["stage3.block2"] == (3, 2)
    # invertible features hold exactly as many numbers as the channel-padded input
    assert 16 * 6 * 3 * 2 == 6 * 12 * 8


def test_effective_parameter_count():
    k, c_in, classes = 8, 3, 10
    net = ConvNet(c_in, classes, k)  # base convnet: convs c_in->k, k->k x2, k->2k, 2k->2k x5
    convs = 9 * (c_in * k + 2 * k * k + k * 2 * k + 5 * 4 * k * k)
    norms = 2 * (3 * k + 6 * 2 * k)
    head = 2 * k * classes + classes
    assert net.effective_parameter_count() == convs + norms + head
    inv = ConvNet(c_in, classes, k, padding="circular", activation="sneaky", downsample="nn")
    assert inv.effective_parameter_count() == 9 * (c_in * k + 2 * k * k + 6 * 4 * k * k) + norms + head


# --------------------------------------------------------------------------- layers


@pytest.mark.parametrize("conv", [InvertibleConv2d(5, 3, bias=False, init_scale=0.5), ZeroPaddedConv2d(5, 3, 0.5)],
                         ids=["circular", "zeros"])
def test_channel_padded_square_conv_is_an_ordinary_widening_conv(conv):
    conv = conv.double()
    x = torch.randn(2, 3, 6, 7, dtype=torch.float64)
    w = conv.weight[:, :3]  # (5, 3, 3, 3): the only columns that meet the input
    if isinstance(conv, InvertibleConv2d):
        expected = F.conv2d(F.pad(x, (1, 1, 1, 1), mode="circular"), w)
        got = conv.transform(ChannelPad(3, 5)(x))
    else:
        expected = F.conv2d(x, w, padding=1)
        got = conv(ChannelPad(3, 5)(x))
    torch.testing.assert_close(got, expected)
    assert torch.equal(ChannelPad(3, 5).inverse(ChannelPad(3, 5)(x)), x)
    with pytest.raises(ValueError, match="in_channels <= out_channels"):
        ChannelPad(5, 3)


def test_dead_parameters_are_the_weights_that_meet_zero_channels():
    net = ConvNet(3, 10, 4)  # pads 3 -> 4 before stage 1 and 4 -> 8 before stage 2
    assert net.dead_parameters() == 4 * 1 * 9 + 8 * 4 * 9
    inv = ConvNet(3, 10, 4, padding="circular", activation="sneaky", downsample="nn")
    assert inv.dead_parameters() == 4 * 1 * 9  # the factor-out stages see no zero channels


def test_invertible_configuration_is_built_from_the_containers():
    net = ConvNet(2, 10, 4, padding="circular", activation="sneaky", downsample="avg")
    assert isinstance(net.extractor, MultiScale) and net.extractor.factor_out == [2, 6]
    blocks = [b for level in net.extractor.levels for b in level if isinstance(b, InvertibleSequential)]
    assert len(blocks) == 9
    assert all([type(m) for m in b][:2] == [InvertibleConv2d, InvertibleBatchNorm2d] for b in blocks)
    assert [conv for _, conv in net.convs()] == [b[0] for b in blocks]


def test_features_keep_the_last_channels_and_pack_the_first():
    """features = [stage 3, space-to-depth(z2, 2), space-to-depth(z1, 4)], z_i the first channels of stage i."""
    k = 4
    net = warmed_up(ConvNet(2, 10, k, padding="circular", activation="sneaky", downsample="nn"), 2, 8, 12)
    x = sample_inputs(3, 2, 8, 12)
    levels = net.extractor.levels
    with torch.no_grad():
        s1 = levels[0].transform(net.pad(x))  # (B, k, 8, 12)
        s2 = levels[1].transform(s1[:, k // 2:])  # (B, 2k, 4, 6)
        s3 = levels[2].transform(s2[:, 3 * k // 2:])  # (B, 2k, 2, 3)
        expected = torch.cat([s3, F.pixel_unshuffle(s2[:, :3 * k // 2], 2), F.pixel_unshuffle(s1[:, :k // 2], 4)], 1)
        torch.testing.assert_close(net.features(x), expected, rtol=1e-13, atol=1e-13)


def test_batchnorm_inverse_and_its_singular_case():
    net = warmed_up(ConvNet(1, 10, 4, padding="circular", activation="sneaky", downsample="avg"), 1, 8, 8)
    bn = dict(net.named_modules())["extractor.levels.1.1.1"]
    assert isinstance(bn, InvertibleBatchNorm2d)
    x = torch.randn(3, 8, 4, 4, dtype=torch.float64)
    y, lad = bn(x)
    assert relerr(bn.inverse(y), x) < 1e-14
    scale = bn.weight / torch.sqrt(bn.running_var + bn.eps)
    torch.testing.assert_close(y, x * scale.view(1, -1, 1, 1) + (bn.bias - bn.running_mean * scale).view(1, -1, 1, 1))
    torch.testing.assert_close(lad, (16 * scale.abs().log().sum()).expand(3))
    with torch.no_grad():
        bn.weight[2] = 0.0
    with pytest.raises(iconv.NotInvertibleError, match="channel 2"):
        bn.inverse(y)
    with pytest.raises(iconv.NotInvertibleError, match=r"\.eval\(\)"):
        bn.train().inverse(y)


# --------------------------------------------------------------------------- the inverse


@pytest.mark.parametrize("row", INVERTIBLE, ids=lambda r: r.downsample)
@pytest.mark.parametrize("in_channels", [1, 3])
def test_invertible_configuration_reconstructs_its_input(row, in_channels):
    h, w = 8, 12
    net = warmed_up(ConvNet(in_channels, 10, 4, **row.switches), in_channels, h, w)
    x = sample_inputs(3, in_channels, h, w)
    with torch.no_grad():
        x_hat = net.inverse(net.features(x))
        padding = net.extractor.inverse(net.features(x))[:, in_channels:]
    assert x_hat.shape == x.shape and padding.shape == (3, 4 - in_channels, h, w)
    assert (x_hat - x).abs().max() <= 1e-10
    assert padding.abs().max() <= 1e-10  # the zero channels come back as zeros
    # the autograd path (uncached conv factorizations) inverts too
    assert (net.inverse(net.features(x)) - x).abs().max() <= 1e-10


@settings(max_examples=8)
@given(k=st.sampled_from([2, 4, 6]), h4=st.integers(1, 3), w4=st.integers(1, 3),
       downsample=st.sampled_from(["squeeze", "nn", "avg"]), seed=st.integers(0, 2**16))
def test_reconstruction_for_random_shapes(k, h4, w4, downsample, seed):
    torch.manual_seed(seed)
    h, w = 4 * h4, 4 * w4
    net = warmed_up(ConvNet(2, 3, k, padding="circular", activation="sneaky", downsample=downsample), 2, h, w)
    x = sample_inputs(2, 2, h, w)
    with torch.no_grad():
        assert (net.inverse(net.features(x)) - x).abs().max() <= 1e-10


def test_inverse_refuses_non_invertible_configurations_and_training_mode():
    features = torch.randn(1, 8, 2, 2)
    with pytest.raises(ConfigurationNotInvertibleError, match="padding='zeros'.*activation='relu'.*maxpool"):
        ConvNet(1, 10, 4).inverse(features)
    for row in TABLE1[1:3]:
        with pytest.raises(ConfigurationNotInvertibleError, match="maxpool"):
            ConvNet(1, 10, 4, **row.switches).eval().inverse(features)
    for padding, activation in [("zeros", "sneaky"), ("circular", "relu")]:
        with pytest.raises(ValueError, match="needs padding='circular' and activation='sneaky'"):
            ConvNet(1, 10, 4, padding=padding, activation=activation, downsample="nn")
    net = ConvNet(1, 10, 4, padding="circular", activation="sneaky", downsample="nn")
    assert isinstance(ConfigurationNotInvertibleError("x"), iconv.NotInvertibleError)
    with pytest.raises(ConfigurationNotInvertibleError, match=r"net\.eval\(\)"):
        net.inverse(net.features(torch.randn(2, 1, 8, 8)))
    with pytest.raises(ValueError, match="features has 8 channels.*expected 64"):
        net.eval().inverse(torch.randn(1, 8, 2, 2))


def test_bad_switches_and_inputs_give_clear_errors():
    with pytest.raises(ValueError, match="padding must be one of 'zeros', 'circular'; got 'reflect'"):
        ConvNet(padding="reflect")
    with pytest.raises(ValueError, match="activation must be one of 'relu', 'sneaky'; got 'tanh'"):
        ConvNet(activation="tanh")
    with pytest.raises(ValueError, match="downsample must be one of 'maxpool', 'squeeze', 'nn', 'avg'"):
        ConvNet(downsample="stride")
    with pytest.raises(ValueError, match="padding must be one of"):
        ConvNet(padding=None)
    with pytest.raises(ValueError, match="width must be even"):
        ConvNet(width=5)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        ConvNet(width=0)
    with pytest.raises(ValueError, match=r"width \(2\) must be at least in_channels \(3\)"):
        ConvNet(3, width=2)
    with pytest.raises(ValueError, match="slope"):
        ConvNet(slope=1.5)
    net = ConvNet(1, 10, 4)
    with pytest.raises(ValueError, match="divisible by 4"):
        net(torch.randn(1, 1, 10, 8))
    with pytest.raises(ValueError, match="has 3 channels.*expected 1"):
        net(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match="give image_size"):
        ConvNet(1, 10, 4).conv_sizes()


# --------------------------------------------------------------------------- training (iconv.train)


def test_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path):
    images, labels = tiny_images(64)
    cfg = TrainConfig(steps=6, batch_size=16, lr=0.05, optimizer="sgd", momentum=0.9, weight_decay=5e-4,
                      checkpoint_every=3, device="cpu")
    switches = TABLE1[4].switches
    loss_fn = make_loss(augment=True, spectral_weight=0.1, spectral_floor=0.5)

    torch.manual_seed(0)
    straight = ConvNet(1, 10, 4, **switches)
    fit(straight, loss_fn, images, labels, config=cfg, checkpoint_path=tmp_path / "a.pt", progress=False)

    class Crash(Exception):
        pass

    calls = 0

    def crash_at_step_5(model, x, y):
        nonlocal calls
        calls += 1
        if calls == 5:
            raise Crash
        return loss_fn(model, x, y)

    torch.manual_seed(0)
    interrupted = ConvNet(1, 10, 4, **switches)
    with pytest.raises(Crash):
        fit(interrupted, crash_at_step_5, images, labels, config=cfg, checkpoint_path=tmp_path / "b.pt",
            progress=False)
    assert load_checkpoint(tmp_path / "b.pt")["step"] == 3
    torch.manual_seed(999)
    resumed = ConvNet(1, 10, 4, **switches)
    fit(resumed, loss_fn, images, labels, config=cfg, checkpoint_path=tmp_path / "b.pt", resume=True,
        progress=False)
    assert torch.equal(params(resumed), params(straight))  # weights and BatchNorm statistics
