"""tools/run_table1.py: its --quick run writes a complete, self-consistent JSON and a PNG, a relaunch
resumes from the checkpoints and reports the same numbers, and bad arguments fail before training."""
from __future__ import annotations

import importlib.util
import json
import math
import re
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import iconv
from iconv import configs

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tools" / "run_table1.py"

#: The row each run is compared with, as the paper's Table 1 does (the three downsampling rows
#: are alternatives to the SneakyReLU row) and the penalty run with the same row without it.
COMPARED_WITH = {"row1": None, "row2": "row1", "row3": "row2", "row4": "row3", "row5": "row3", "row6": "row3",
                 "row6+penalty": "row6"}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def tool():
    """tools/run_table1.py as a module (it is a script, not part of the package)."""
    spec = importlib.util.spec_from_file_location("run_table1", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def launch(tmp_path: Path, *extra: str, timeout: float = 300) -> tuple[subprocess.CompletedProcess, float]:
    """Run the script with ``extra`` arguments in ``tmp_path``; returns the process and its seconds."""
    start = time.perf_counter()
    done = subprocess.run([sys.executable, str(SCRIPT), *extra], cwd=tmp_path, timeout=timeout, capture_output=True,
                          text=True)
    return done, time.perf_counter() - start


def check_summary(table: dict, names: list[str], seeds: list[int]) -> None:
    """Every run name with every seed; mean, std, the difference against the compared row, its
    standard error and the within-noise flag recomputed from the runs' accuracies."""
    summary, runs = table["summary"], table["runs"]
    assert sorted(summary) == sorted(names) and set(COMPARED_WITH) == set(names)
    for name, entry in summary.items():
        mine = sorted((r for r in runs if r["name"] == name), key=lambda r: r["seed"])
        assert [r["seed"] for r in mine] == seeds and sorted(entry["seeds"]) == seeds
        accuracies = [r["test_accuracy"] for r in mine]
        assert sorted(entry["accuracies"]) == sorted(accuracies)
        assert entry["mean"] == pytest.approx(statistics.fmean(accuracies), rel=1e-12, abs=1e-15)
        assert entry["std"] == pytest.approx(statistics.stdev(accuracies), rel=1e-12, abs=1e-15)
        other = COMPARED_WITH[name]
        if other is None:
            assert "change_vs" not in entry and "compared_with" not in entry
            continue
        a, b = entry, summary[other]
        diff = a["mean"] - b["mean"]
        se = math.sqrt(a["std"] ** 2 / len(a["accuracies"]) + b["std"] ** 2 / len(b["accuracies"]))
        assert entry["compared_with"] == other
        assert entry["change_vs"] == pytest.approx(diff, rel=1e-12, abs=1e-15)
        assert entry["change_se"] == pytest.approx(se, rel=1e-12, abs=1e-15)
        assert entry["within_noise"] is (abs(diff) < 2 * se)


def check_runs(table: dict, quick: dict, work: Path) -> None:
    """Every run trained the quick steps, has a test accuracy, the row's settings and a checkpoint."""
    rows = {name: (row, penalty) for name, row, penalty in tool().run_names()}
    for r in table["runs"]:
        row, penalty = rows[r["name"]]
        assert r["steps"] == quick["steps"] and r["stopped"] == "completed"
        assert 0 <= r["test_accuracy"] <= 1
        assert r["switches"] == configs.TABLE1[row].switches and r["compared_with"] == configs.TABLE1[row].compared_with
        assert (r["penalty"] is not None) == penalty
        if configs.TABLE1[row].invertible:
            assert r["reconstruction_float32"]["relative_error"] < 1e-4
            assert r["reconstruction_float64"]["relative_error"] < 1e-12
        assert (work / f"seed{r['seed']}" / f"{r['name']}.pt").is_file()


def test_quick_run_and_relaunch(tmp_path):
    """--quick: all seven runs x two seeds, a consistent summary, the PNG; a relaunch resumes every
    run from its finished checkpoint (nothing is retrained: the recorded histories, with their
    timings, come back unchanged) and gives the same accuracies."""
    module = tool()
    names = [name for name, _, _ in module.run_names()]
    assert names == [f"row{i}" for i in range(1, 7)] + ["row6+penalty"]
    work, out, png = tmp_path / "work", tmp_path / "t.json", tmp_path / "r.png"
    arguments = ["--quick", "--work", str(work), "--out", str(out), "--pictures", str(png)]

    done, first = launch(tmp_path, *arguments)
    assert done.returncode == 0, done.stderr[-3000:]
    table = json.loads(out.read_text())
    seeds = list(module.QUICK["seeds"])
    assert table["seeds"] == seeds and len(seeds) == 2 and table["quick"] is True
    assert len(table["runs"]) == len(names) * len(seeds)
    check_summary(table, names, seeds)
    check_runs(table, module.QUICK, work)
    assert table["command"].startswith("python tools/run_table1.py") and "--quick" in table["command"]
    assert re.fullmatch(r"[0-9a-f]{40}(\+uncommitted)?|unknown", table["commit"])
    assert table["machine"] and table["noise_rule"]
    assert png.read_bytes()[:8] == PNG_SIGNATURE

    png.unlink()
    models = tmp_path / "models"
    done, again_seconds = launch(tmp_path, *arguments, "--models", str(models))
    assert done.returncode == 0, done.stderr[-3000:]
    again = json.loads(out.read_text())
    key = lambda r: (r["name"], r["seed"])
    before, after = sorted(table["runs"], key=key), sorted(again["runs"], key=key)
    assert [key(r) for r in after] == [key(r) for r in before]
    for old, new in zip(before, after):
        assert new["test_accuracy"] == old["test_accuracy"]
        assert new["eval_history"] == old["eval_history"] and new["train_seconds"] == old["train_seconds"]
    assert again["summary"] == table["summary"]
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    # --models: every trained net, without optimizer state, listed in the JSON; iconv.load opens each and it
    # computes what the training checkpoint computes
    assert sorted(again["models"]) == sorted(f"{r['name']}-seed{r['seed']}" for r in again["runs"])
    images = torch.rand(4, 1, 28, 28)
    for name, path in again["models"].items():
        shipped = iconv.load(out.parent / path)
        trained = iconv.load(work / f"seed{name.rsplit('-seed', 1)[1]}" / f"{name.rsplit('-seed', 1)[0]}.pt")
        assert "training" not in torch.load(out.parent / path, weights_only=True) or \
            torch.load(out.parent / path, weights_only=True)["training"] is None
        with torch.no_grad():
            assert torch.equal(shipped(images), trained(images))
    print(f"run_table1 --quick: {first:.1f} s, relaunch {again_seconds:.1f} s")


@pytest.mark.parametrize("bad, message", [
    (["--seeds", "1", "1"], r"--seeds must be distinct, got \[1, 1\]"),
    (["--rows", "row9"], r"--rows: unknown \['row9'\]; choose from \['row1'"),
    (["--jobs", "0"], r"--jobs and --threads must be positive, got 0 and 1"),
    (["--rows", "row1", "--pictures", "r.png"], r"--pictures draws the reconstructions of .*row6.*--rows row1"),
    (["--size", "gpu"], r"--quick runs its own cut of the ci size; drop --size gpu"),
], ids=["seeds-repeated", "rows-unknown", "jobs-zero", "pictures-without-row6", "quick-with-size"])
def test_bad_arguments_fail_before_training(tmp_path, bad, message):
    """A usage error (exit status 2) that names the argument, and no file written (no checkpoint, no JSON)."""
    done, seconds = launch(tmp_path, "--quick", "--work", str(tmp_path / "work"), "--out", str(tmp_path / "t.json"),
                           *bad, timeout=120)
    assert done.returncode == 2, (done.stdout, done.stderr)
    assert re.search(message, done.stderr) and "Traceback" not in done.stderr
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
    assert not (tmp_path / "work").exists()  # not even an empty folder
