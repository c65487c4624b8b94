"""python -m iconv.train: experiments from iconv.configs, outputs, and the resume / overwrite rules."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

import iconv
from iconv.train import main, read_checkpoint
from iconv.train.cli import experiment_from_args, parser

REPO = Path(__file__).resolve().parents[1]
FLOW = ["flow", "--data", "digits", "--steps", "4", "--batch-size", "16", "--depth", "1", "--eval-size", "32",
        "--no-progress", "--samples", "0", "--device", "cpu"]


def run_cli(argv, capsys):
    code = main([str(a) for a in argv])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_flags_override_the_configured_experiment():
    args = parser().parse_args(["flow", "--size", "gpu", "--steps", "5", "--lr", "0.01", "--holdout", "3",
                                "--clip", "0", "--model", "glow", "--samples", "0"])
    e = experiment_from_args(args)
    assert (e.size, e.model.kind, e.model.depth, e.training.steps, e.training.epochs) == ("gpu", "glow", 8, 5, None)
    assert (e.training.lr, e.training.clip, e.data.holdout, e.evaluation.samples) == (0.01, None, 3, 0)
    args = parser().parse_args(["classify", "--row", "5", "--width", "4", "--epochs", "2"])
    e = experiment_from_args(args)
    assert e.model.switches == iconv.configs.TABLE1[4].switches and e.model.width == 4
    assert (e.training.steps, e.training.epochs, e.training.optimizer) == (None, 2.0, "sgd")
    assert experiment_from_args(parser().parse_args(["flow"])) == iconv.configs.flow("ci")


def test_flow_trains_and_writes_results(tmp_path, capsys):
    out, ckpt = tmp_path / "run", tmp_path / "cli.pt"
    code, stdout, _ = run_cli(FLOW + ["--out", out, "--checkpoint", ckpt, "--samples", "4"], capsys)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics == json.loads(stdout.strip().splitlines()[-1])
    assert metrics["steps"] == 4 and metrics["model"] == "ConvFlow" and math.isfinite(metrics["test_bits/dim"])
    history = json.loads((out / "history.json").read_text())
    assert history["completed_steps"] == 4 and history["eval"][-1]["test_bits/dim"] == metrics["test_bits/dim"]
    assert (out / "samples.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    state = read_checkpoint(ckpt)
    assert state["step"] == 4 and state["experiment"]["data"]["name"] == "digits"
    assert state["run"]["run"]["data"] == {"name": "digits", "split": "train", "holdout": 0, "train_images": 10_000}
    model = iconv.load(ckpt)
    assert isinstance(model, iconv.ConvFlow) and model.shape == (1, 8, 8) and not model.training
    assert not [p for p in tmp_path.rglob("*.tmp")]


def test_glow_and_classifier(tmp_path, capsys):
    code, stdout, _ = run_cli(FLOW[:-4] + ["--model", "glow", "--depth", "2", "--hidden", "4", "--steps", "2",
                                           "--device", "cpu"], capsys)
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["model"] == "GlowBaseline"
    out = tmp_path / "cls"
    code, stdout, _ = run_cli(["classify", "--data", "digits", "--row", "6", "--width", "4", "--steps", "3",
                               "--batch-size", "16", "--eval-size", "40", "--no-progress", "--out", out,
                               "--checkpoint", tmp_path / "cls.pt"], capsys)
    assert code == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["model"] == "ConvNet" and 0 <= metrics["test_accuracy"] <= 1
    assert metrics["reconstruction_error"] < 1e-4  # row 6 is invertible
    net = iconv.load(tmp_path / "cls.pt")
    assert net.switches == iconv.configs.TABLE1[5].switches and net.width == 4


def test_resume_rules(tmp_path, capsys):
    ckpt = tmp_path / "r.pt"
    code, _, err = run_cli(FLOW + ["--checkpoint", ckpt, "--resume"], capsys)
    assert code == 2 and "does not exist" in err and "--resume-if-exists" in err and not ckpt.exists()
    with pytest.raises(SystemExit) as info:
        main(FLOW + ["--resume"])
    assert info.value.code == 2 and "need --checkpoint" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(FLOW + ["--checkpoint", str(ckpt), "--resume", "--overwrite"])
    assert "not allowed with argument" in capsys.readouterr().err

    assert run_cli(FLOW + ["--checkpoint", ckpt, "--resume-if-exists"], capsys)[0] == 0  # starts
    first = ckpt.read_bytes()
    code, _, err = run_cli(FLOW + ["--checkpoint", ckpt], capsys)
    assert code == 2 and "already exists" in err and ckpt.read_bytes() == first
    code, stdout, _ = run_cli(FLOW + ["--checkpoint", ckpt, "--resume-if-exists"], capsys)  # a finished run
    assert code == 0 and json.loads(stdout.strip().splitlines()[-1])["steps"] == 4
    code, _, err = run_cli(FLOW + ["--checkpoint", ckpt, "--resume", "--lr", "0.1", "--seed", "1"], capsys)
    assert code == 2 and "training.lr: checkpoint 0.003, now 0.1" in err and "training.seed" in err
    code, stdout, _ = run_cli(FLOW + ["--checkpoint", ckpt, "--resume", "--steps", "6", "--eval-size", "16"], capsys)
    assert code == 0 and read_checkpoint(ckpt)["step"] == 6  # more steps and another evaluation may change
    assert run_cli(FLOW + ["--checkpoint", ckpt, "--overwrite", "--steps", "2"], capsys)[0] == 0
    assert read_checkpoint(ckpt)["step"] == 2


def test_python_dash_m_runs_the_command_line():
    result = subprocess.run([sys.executable, "-m", "iconv.train", "flow", "--steps", "0"], cwd=REPO,
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2 and "argument --steps: must be an int >= 1, got 0" in result.stderr
