"""iconv.evaluation: bits/dim, accuracy, the conditioning of every conv, the classifier's reconstruction."""
import pytest
import torch

import iconv
from iconv.core.circular import dense_conv_matrix
from iconv.data import prepare_images
from iconv.evaluation import (conditioning_report, conditioning_summary, evaluate_accuracy, evaluate_bits_per_dim,
                              evaluate_classifier, reconstruction_error)
from iconv.models import ConvFlow, ConvNet


def tiny_images(n=32, channels=1, size=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, channels, size, size), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 10, (n,), generator=g)
    return images, labels


def test_evaluate_bits_per_dim_is_seeded_and_independent_of_batching():
    torch.manual_seed(0)
    flow = ConvFlow((1, 4, 4), depth=1)
    images = torch.randint(0, 256, (8, 1, 4, 4), dtype=torch.uint8)
    a = evaluate_bits_per_dim(flow, images, batch_size=3, seed=1)
    b = evaluate_bits_per_dim(flow, images, batch_size=8, seed=1)
    assert a == pytest.approx(b, rel=1e-6)  # seeded noise: independent of batching
    by_hand = flow.bits_per_dim(images, generator=torch.Generator().manual_seed(1)).double().mean().item()
    assert a == pytest.approx(by_hand, rel=1e-6)
    with pytest.raises(ValueError, match=r"expected \(B, 1, 4, 4\)"):
        evaluate_bits_per_dim(flow, torch.zeros(2, 1, 8, 8, dtype=torch.uint8))


def test_accuracy():
    images, labels = tiny_images(20)
    net = ConvNet(1, 10, 4)
    net.train()
    acc = evaluate_accuracy(net, images, labels, batch_size=7)
    assert net.training  # mode restored
    net.eval()
    expected = (net(prepare_images(images)).argmax(1) == labels).float().mean().item()
    assert acc == pytest.approx(expected)
    with pytest.raises(ValueError, match="20 images but 3 labels"):
        evaluate_accuracy(net, images, labels[:3])
    with pytest.raises(ValueError, match="no images"):
        evaluate_accuracy(net, images[:0], labels[:0])


def test_conditioning_report_matches_the_dense_matrix():
    net = ConvNet(1, 10, 4, padding="circular", activation="sneaky", downsample="squeeze", init_scale=0.8).double()
    report = conditioning_report(net, (8, 4))
    assert [entry["name"] for entry in report] == [name for name, _ in net.convs()]
    for entry, (_, conv) in zip(report, net.convs()):
        h, w = entry["size"]
        dense = torch.linalg.svdvals(dense_conv_matrix(conv.weight.detach(), h, w))
        assert entry["layer_condition"] == pytest.approx(float(dense[0] / dense[-1]), rel=1e-10)
        assert entry["sigma_max"] == pytest.approx(float(dense[0]), rel=1e-10)
        blocks = iconv.fourier.spectrum(conv.weight.detach(), h, w)  # (h, w//2+1, c, c)
        # the per-frequency condition number by hand: 1-norms with moduli |Re| + |Im|, over every frequency
        inverse = torch.linalg.inv(blocks)

        def norm1(m):
            return (m.real.abs() + m.imag.abs()).sum(-2).amax(-1)

        kappa = norm1(blocks) * norm1(inverse)
        assert entry["condition"] == pytest.approx(float(kappa.max()), rel=1e-8)
        assert kappa[entry["frequency"]] == pytest.approx(float(kappa.max()), rel=1e-12)
        # a 1-norm condition number is within a factor 2c of the 2-norm one (moduli |Re| + |Im|: sqrt(2) each)
        s = torch.linalg.svdvals(blocks)
        assert float(kappa.max()) <= 2 * blocks.shape[-1] * float((s[..., 0] / s[..., -1]).max()) * (1 + 1e-12)
        assert entry["padding"] == "circular"
    assert conditioning_report(ConvNet(1, 10, 4), (8, 8))[0]["padding"] == "zeros"


def test_conditioning_summary_and_flow_convs():
    net = ConvNet(1, 10, 4, padding="circular", activation="sneaky", downsample="squeeze").double()
    report = conditioning_report(net, (8, 8))
    summary = conditioning_summary(net, (8, 8))
    assert summary["max_condition"] == max(e["condition"] for e in report)
    assert summary["condition/stage2.block1"] == report[3]["condition"]
    torch.manual_seed(0)
    flow = ConvFlow((1, 4, 4), depth=1)
    flow(torch.rand(2, 1, 4, 4))  # every conv has seen an input: sizes=None works
    names = [e["name"] for e in conditioning_report(flow)]
    assert len(names) == len(flow.convs())
    assert [e["condition"] for e in conditioning_report(flow)] == pytest.approx(flow.condition_numbers(), rel=1e-4)


def test_evaluate_classifier():
    images, labels = tiny_images(16)
    net = ConvNet(1, 10, 4, padding="circular", activation="sneaky", downsample="avg")
    out = evaluate_classifier(net, images, labels, reconstruct=8)
    assert set(out) >= {"test_accuracy", "max_condition", "max_layer_condition", "reconstruction_error",
                        "condition/stage3.block3"}
    assert out["reconstruction_error"] < 1e-5  # float32
    assert "reconstruction_error" not in evaluate_classifier(ConvNet(1, 10, 4), images, labels)
    rec = reconstruction_error(net.double(), images[:4])
    assert rec["relative_error"] < 1e-12 and rec["padding_residual"] < 1e-12
