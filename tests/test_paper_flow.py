"""PaperFlow's bound and importance-weighted estimate, against exact marginals; the flow study's --quick run.

The joint map's log-determinant against the autograd Jacobian, the round trip and the rest of the
contract are tests/test_protocol.py's (cases "PaperFlow*"). Here: what the model reports for images
alone. References: (1) a flow that is the identity on the noise, where the bound is exact and
equals the logit's density in closed form; (2) a 1-pixel image with one noise channel, where
:math:`p(x) = \\int p(x, u)\\,du` and the ELBO :math:`\\int q(u)(\\log p(x, u) - \\log q(u))\\,du`
are computed by quadrature on a fine grid.
"""
from __future__ import annotations

import json
import math
import subprocess
import sys
import statistics
import time
from pathlib import Path

import pytest
import torch

import iconv
from iconv.bounds import evaluate_bound_and_iw, paper_flow_loss
from iconv.layers import LogitTransform
from iconv.models import MODELS, PaperFlow
from iconv.models.flow import standard_normal_log_prob
from iconv.studies import compare
from iconv.train import read_checkpoint

ROOT = Path(__file__).resolve().parents[1]


def perturbed(model: PaperFlow, seed: int = 0, scale: float = 0.3) -> PaperFlow:
    """Move every conv away from its (near-orthogonal) start so that u and x interact."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(scale * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def identity_on_noise(shape=(1, 2, 3), pad=2) -> PaperFlow:
    """depth 0, one scale: logit on x, then one 1x1 conv set to the identity (zero bias)."""
    model = PaperFlow(shape, pad_channels=pad, depth=0, scales=1, kernel_size=1).double()
    (conv,) = [m for m in model.modules() if isinstance(m, iconv.InvertibleConv2d)]
    with torch.no_grad():
        conv.weight.copy_(torch.eye(conv.channels, dtype=torch.float64)[:, :, None, None])
        conv.bias.zero_()
    return model


def exact_identity_log_prob(x: torch.Tensor, alpha: float = 0.05) -> torch.Tensor:
    """log p(x) of that flow: the logit's change of variables under a standard normal, in closed form."""
    a = alpha + (1 - 2 * alpha) * x
    y = torch.log(a) - torch.log1p(-a)
    log_jac = math.log(1 - 2 * alpha) - torch.log(a) - torch.log1p(-a)
    return (-0.5 * (y ** 2 + math.log(2 * math.pi)) + log_jac).flatten(1).sum(1)


def test_logit_reference_is_independent_of_the_layer():
    """The closed form above agrees with iconv's LogitTransform (so reference (1) is meaningful)."""
    x = torch.rand(4, 1, 2, 3, dtype=torch.float64)
    y, ld = LogitTransform(0.05)(x)
    torch.testing.assert_close(exact_identity_log_prob(x), standard_normal_log_prob(y) + ld)


def test_bound_is_exact_when_the_flow_is_the_identity_on_the_noise():
    model = identity_on_noise()
    x = 0.01 + 0.98 * torch.rand(5, 1, 2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(3))
    exact = exact_identity_log_prob(x)
    for seed in range(3):
        g = torch.Generator().manual_seed(seed)
        torch.testing.assert_close(model.log_prob_bound(x, g), exact, atol=1e-10, rtol=1e-12)
        torch.testing.assert_close(model.importance_weighted_log_prob(x, 7, g), exact, atol=1e-10, rtol=1e-12)


def test_bits_per_dim_bound_divides_by_the_image_dimensions():
    """D = C*H*W (6 here), not the joint (C + P)*H*W (18): the noise's density is subtracted."""
    model = identity_on_noise()
    images = torch.randint(0, 256, (4, 1, 2, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    bpd = model.bits_per_dim_bound(images, generator=torch.Generator().manual_seed(1))
    x = iconv.data.dequantize(images, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    expected = (-exact_identity_log_prob(x) / 6 + math.log(256)) / math.log(2)
    torch.testing.assert_close(bpd, expected, atol=1e-10, rtol=1e-12)
    with pytest.raises(TypeError, match="bits_per_dim_bound"):
        model.bits_per_dim(images)


def one_pixel_model() -> PaperFlow:
    """1x1 image, one noise channel, two (conv, SneakyReLU) steps: p(x) is a 1-d integral over u.

    Well-conditioned convs (``init_scale=1``: far from orthogonal) scaled by 1.5 (so the joint density
    decays in u faster than q(u) = N(0, 1): bounded importance weights, and a quadrature on a finite
    grid holds all the mass) with random biases.
    """
    torch.manual_seed(0)
    model = PaperFlow((1, 1, 1), pad_channels=1, depth=2, scales=1, kernel_size=1, init_scale=1.0, slope=0.3)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, iconv.InvertibleConv2d):
                m.bias.normal_(0, 0.5)
                m.weight.mul_(1.5)
    return model.double()


def quadrature(model: PaperFlow, x: torch.Tensor, step: float = 1e-3) -> tuple[torch.Tensor, torch.Tensor]:
    """(log p(x), ELBO) of each 1-pixel image ``x`` (B,) by the trapezoid rule on u in [-60, 30]."""
    u = torch.arange(-60, 30 + step / 2, step, dtype=torch.float64)
    log_q = -0.5 * (u ** 2 + math.log(2 * math.pi))
    weights = torch.full_like(u, step)
    weights[0] = weights[-1] = step / 2
    logs, elbos = [], []
    with torch.no_grad():
        for xi in x:
            log_joint = model.log_prob(torch.stack([xi.expand_as(u), u], 1).reshape(-1, 2, 1, 1))
            assert float(log_joint[[0, -1]].max()) < float(log_joint.max()) - 30, "the grid cuts off mass"
            logs.append(torch.logsumexp(log_joint + weights.log(), 0))
            elbos.append((weights * log_q.exp() * (log_joint - log_q)).sum())
    return torch.stack(logs), torch.stack(elbos)


def test_estimates_against_the_exact_marginal_of_a_one_pixel_flow():
    model = one_pixel_model()
    x = torch.tensor([0.1, 0.45, 0.8], dtype=torch.float64).reshape(3, 1, 1, 1)
    log_p, elbo = quadrature(model, x.flatten())
    g = torch.Generator().manual_seed(0)
    n = 20000
    draws = model.log_prob_bound(x.repeat(n, 1, 1, 1), g).detach().reshape(n, 3)
    stderr = draws.std(0) / math.sqrt(n)
    assert bool(((draws.mean(0) - elbo).abs() < 4 * stderr).all()), (draws.mean(0), elbo, stderr)
    iw = model.importance_weighted_log_prob(x, 20000, g).detach()
    assert bool((log_p - elbo > 3).all())  # a gap of several nats, which K = 20000 draws must close:
    torch.testing.assert_close(iw, log_p, atol=0.02, rtol=0)
    assert bool((iw - elbo > 3).all())


def test_iw_estimate_increases_with_k_and_bounds_the_bound():
    torch.manual_seed(1)
    model = perturbed(PaperFlow((1, 2, 2), pad_channels=2, depth=1, scales=1).double(), seed=1)
    x = 0.05 + 0.9 * torch.rand(8, 1, 2, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    g = torch.Generator().manual_seed(5)
    copies = x.repeat(40, 1, 1, 1)  # 40 independent estimates per image
    with torch.no_grad():
        means = [float(model.importance_weighted_log_prob(copies, k, g).mean()) for k in (1, 4, 16, 64)]
        bound = float(model.log_prob_bound(x.repeat(160, 1, 1, 1), g).mean())
    assert means == sorted(means) and means[-1] - means[0] > 0.05, means
    assert bound < means[1], (bound, means)


def test_evaluation_and_loss():
    torch.manual_seed(0)
    model = PaperFlow((1, 4, 4), pad_channels=1, depth=1).double()
    images = torch.randint(0, 256, (6, 1, 4, 4), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    result = evaluate_bound_and_iw(model, images, samples=8, batch_size=4)
    assert result == evaluate_bound_and_iw(model, images, samples=8, batch_size=4)  # seeded
    assert result["bits/dim (iw 8)"] < result["bits/dim (bound)"]
    loss, metrics = paper_flow_loss(model, images)
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())
    with pytest.raises(TypeError, match="PaperFlow"):
        paper_flow_loss(iconv.ConvFlow((1, 4, 4), depth=1), images)


def test_sample_shape_and_checkpoint_round_trip(tmp_path):
    model = PaperFlow((1, 4, 4), pad_channels=3, depth=[1, 0, 1], actnorm=True)
    model.initialize(torch.rand(8, 1, 4, 4))
    assert model.sample(5, 0.7).shape == (5, 1, 4, 4)
    assert MODELS["PaperFlow"] is PaperFlow
    iconv.train.write_checkpoint(tmp_path / "m.pt", model)
    loaded = iconv.load(tmp_path / "m.pt")
    assert isinstance(loaded, PaperFlow) and loaded.arguments == model.arguments
    joint = torch.rand(2, 4, 4, 4)
    torch.testing.assert_close(loaded(joint)[0], model.eval()(joint)[0])


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="pad_channels"):
        PaperFlow((1, 4, 4), pad_channels=0)
    with pytest.raises(ValueError, match="scales"):
        PaperFlow((1, 6, 6), scales=3)
    model = PaperFlow((1, 4, 4), pad_channels=2, depth=1)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        model.log_prob_bound(torch.full((1, 1, 4, 4), 3.0))
    with pytest.raises(ValueError, match="noise channels"):
        model(torch.rand(1, 1, 4, 4))
    with pytest.raises(ValueError, match="samples"):
        model.importance_weighted_log_prob(torch.rand(1, 1, 4, 4), 0)


STUDY_PAIRS = (("convflow", "glow"), ("convflow-large", "glow-large"), ("convflow-large", "convflow"),
               ("glow-large", "glow"), ("convflow", "paperflow"))


def test_flow_study_quick_run(tmp_path):
    """tools/run_flow_study.py --quick trains every model of the study for a few steps, resumably."""
    out, work = tmp_path / "results", tmp_path / "runs"
    command = [sys.executable, str(ROOT / "tools" / "run_flow_study.py"), "--quick", "--work", str(work),
               "--out", str(out)]
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=tmp_path, timeout=120, capture_output=True)
    first = time.perf_counter() - start
    study = json.loads((out / "study.json").read_text())
    assert {run["model"] for run in study["runs"]} >= {"convflow", "paperflow", "glow", "convflow-large",
                                                       "glow-large"}
    assert len(study["seeds"]) == 2 and study["command"] and study["machine"]
    for run in study["runs"]:
        assert run["steps"] >= 1 and math.isfinite(run["heldout_best"]) and math.isfinite(run["test"])
        assert isinstance(iconv.load(out / run["best_model"]), MODELS[run["class"]])
        assert read_checkpoint(out / run["best_model"])["data"]["name"] == "digits"  # self-describing
    paper = [r for r in study["runs"] if r["model"] == "paperflow"]
    assert all(r["likelihood"] == "bound" and math.isfinite(r["test_iw"]) for r in paper)
    # every comparison is the noise rule of iconv.studies applied to the per-seed numbers it names
    assert [(c["a"], c["b"]) for c in study["comparisons"]] == list(STUDY_PAIRS)
    for c in study["comparisons"]:
        tests = [[r["test"] for r in study["runs"] if r["model"] == m] for m in (c["a"], c["b"])]
        assert c["test"] == compare(*tests).as_dict()
        assert c["ratio"] == pytest.approx(statistics.fmean(tests[0]) / statistics.fmean(tests[1]), rel=1e-12)
        step = c["equal_steps"]["step"]
        at_step = [[[row["heldout"] for row in r["heldout_curve"] if row["step"] <= step][-1]
                    for r in study["runs"] if r["model"] == m] for m in (c["a"], c["b"])]
        assert c["equal_steps"]["difference"] == pytest.approx(compare(*at_step).difference, abs=1e-12)
    # a second launch finds every run finished and only rewrites the summary; a run whose record is lost
    # (an interrupted job) resumes from its checkpoint and reports the same numbers
    (work / "paperflow-seed1" / "done.json").unlink()
    start = time.perf_counter()
    subprocess.run(command, check=True, cwd=tmp_path, timeout=120, capture_output=True)
    again = json.loads((out / "study.json").read_text())
    assert [(r["test"], r.get("test_iw"), r["steps"]) for r in again["runs"]] == \
        [(r["test"], r.get("test_iw"), r["steps"]) for r in study["runs"]]
    print(f"quick study: {first:.1f} s, relaunch {time.perf_counter() - start:.1f} s")
