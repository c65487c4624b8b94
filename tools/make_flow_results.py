"""Write ``book/results/flow/``: the offline ConvFlow vs Glow-baseline run of chapters 7 and 8.

Two jobs, both writing files atomically in the self-describing checkpoint format of
``iconv.train.checkpoint`` (``iconv.load(path)`` returns the trained model):

**Train** (what produced the shipped files; about 20 CPU-minutes per model, both at once on 2 cores)::

    python tools/make_flow_results.py train --work runs/flow-cpu --out book/results/flow

trains ``iconv.configs.flow("cpu", model)`` for ``convflow`` and ``glow`` with ``iconv.train.run``
(checkpointed in ``--work``, so a killed job resumes), evaluates each on all 10,000 test images
(one uniform dequantization seeded with 0), and writes ``convflow_fashion_mnist.pt``,
``glow_fashion_mnist.pt`` and ``fashion_mnist_cpu.json``.

**Convert** files written by iconv 0.1 (``{"class", "shape", "architecture", "state_dict"}``
with the old module names)::

    python tools/make_flow_results.py convert book/results/flow/convflow_fashion_mnist.pt
    python tools/make_flow_results.py convert --all   # both shipped files, in place

maps the old parameter names onto today's module tree (the models are now ``net.``
:class:`~iconv.layers.InvertibleSequential` / :class:`~iconv.layers.MultiScale` trees; the
parameters themselves are unchanged) and records the experiment, the step count and the test
bits/dim from ``fashion_mnist_cpu.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "book" / "results" / "flow"
NAMES = {"convflow": ("ConvFlow", "convflow_fashion_mnist.pt"), "glow": ("Glow baseline", "glow_fashion_mnist.pt")}
SUMMARY = "fashion_mnist_cpu.json"
CURVE_WINDOW = 50  # training-curve points: mean bits/dim over this many steps


# ----------------------------------------------------------------------------- converting iconv 0.1 files


def convflow_key(old: str, depths: list[int]) -> str:
    """An iconv 0.1 ConvFlow parameter name -> today's: ``pixel_affine.`` -> ``net.1.``,
    ``levels.L.i.`` -> ``net.3.levels.L.i.``, ``mixers.L.`` -> the 1x1 step after level L's steps
    and downsample, ``head.`` -> the last level's final step."""
    if old.startswith("pixel_affine."):
        return "net.1." + old[len("pixel_affine."):]
    m = re.match(r"levels\.(\d+)\.(\d+)\.(.*)", old)
    if m:
        return f"net.3.levels.{m[1]}.{m[2]}.{m[3]}"
    m = re.match(r"mixers\.(\d+)\.(.*)", old)
    if m:
        level = int(m[1])
        return f"net.3.levels.{level}.{depths[level] + 1}.{m[2]}"
    if old.startswith("head."):
        return f"net.3.levels.{len(depths) - 1}.{depths[-1]}." + old[len("head."):]
    raise KeyError(f"unexpected ConvFlow parameter {old!r}")


def glow_key(old: str) -> str:
    """An iconv 0.1 GlowBaseline name -> today's: ``levels.L.i.layers.j.`` -> ``net.1.levels.L.(i+1).j.``
    (each level now starts with its squeeze)."""
    m = re.match(r"levels\.(\d+)\.(\d+)\.layers\.(\d+)\.(.*)", old)
    if not m:
        raise KeyError(f"unexpected GlowBaseline parameter {old!r}")
    return f"net.1.levels.{m[1]}.{int(m[2]) + 1}.{m[3]}.{m[4]}"


def convert_state(saved: dict):
    """The model of an iconv 0.1 file, its weights loaded under today's names (strict)."""
    import iconv

    shape = tuple(saved["shape"])
    if saved["class"] == "ConvFlow":
        model = iconv.ConvFlow(shape, **saved["architecture"])
        depths = list(model.arguments["depth"])
        state = {convflow_key(k, depths): v for k, v in saved["state_dict"].items()}
    elif saved["class"] == "GlowBaseline":
        model = iconv.GlowBaseline(shape, **saved["architecture"])
        state = {glow_key(k): v for k, v in saved["state_dict"].items()}
    else:
        raise ValueError(f"cannot convert a {saved['class']!r}")
    model.load_state_dict(state)  # strict: every parameter mapped, none left over
    return model


def summary_entry(model_name: str, summary_path: Path) -> dict:
    if not summary_path.exists():
        return {}
    return json.loads(summary_path.read_text())["models"].get(model_name, {})


def export(model, path: Path, kind: str, entry: dict) -> None:
    """Write ``model`` as a model-only checkpoint (no training state) with its experiment and results."""
    from iconv import configs
    from iconv.train import write_checkpoint

    experiment = configs.flow("cpu", kind)
    write_checkpoint(path, model, step=entry.get("steps"), experiment=experiment.to_dict(),
                     data={"name": experiment.data.name, "split": "train"}, seed=experiment.seed,
                     extra={"results": {k: entry[k] for k in ("test_bits_per_dim", "test_images", "stopped",
                                                              "parameters", "measured") if k in entry}})


def convert(path: Path, out: Path | None = None) -> None:
    import torch

    saved = torch.load(path, map_location="cpu", weights_only=True)
    if not (isinstance(saved, dict) and {"class", "shape", "architecture", "state_dict"} <= set(saved)):
        raise SystemExit(f"{path} is not an iconv 0.1 flow file")
    model = convert_state(saved)
    kind = "convflow" if saved["class"] == "ConvFlow" else "glow"
    export(model, out or path, kind, summary_entry(NAMES[kind][0], path.parent / SUMMARY))
    print(f"{path} -> {out or path}: {saved['class']} {model.num_parameters()} parameters")


# ----------------------------------------------------------------------------- training


def train_one(job: dict) -> dict:
    """Train one model of the offline comparison (in its own process, one thread)."""
    import torch

    from iconv import configs
    from iconv.evaluation import evaluate_bits_per_dim
    from iconv.train import load_data, run

    torch.set_num_threads(1)
    experiment = configs.flow("cpu", job["kind"])
    if job.get("steps"):  # a smoke test of this script
        experiment = experiment.replace(training={"steps": job["steps"]}, evaluation={"every": 0})
    train_x, train_y, _, _ = load_data(experiment.data)
    test_x = load_data(experiment.data.__class__(experiment.data.name))[2][: job.get("test_images")]
    data = (train_x, train_y, test_x[: experiment.data.test_images], None)
    result = run(experiment, checkpoint=Path(job["work"]) / f"{job['kind']}.pt", resume="if-exists",
                 device="cpu", progress=False, data=data, log_every=10)
    model = result.model.eval()
    history = result.history
    rows = history.train
    curve = []
    for end in range(CURVE_WINDOW, history.steps + 1, CURVE_WINDOW):
        window = [r for r in rows if end - CURVE_WINDOW < r["step"] <= end]
        if window:
            last = window[-1]
            curve.append([end, round(last["seconds"], 2), round(sum(r["bits/dim"] for r in window) / len(window), 5),
                          round(last["process_seconds"], 2)])
    evals = [[e["step"], round(e["seconds"], 2), round(e["test_bits/dim"], 5), round(e["process_seconds"], 2)]
             for e in history.eval]
    return {
        "kind": job["kind"], "model": type(model).__name__, "architecture": dict(model.arguments),
        "parameters": model.num_parameters(),
        "test_bits_per_dim": evaluate_bits_per_dim(model, test_x, seed=0), "test_images": len(test_x),
        "steps": history.steps, "stopped": history.stopped,
        "train_seconds": rows[-1]["seconds"] if rows else 0.0,
        "train_process_seconds": rows[-1]["process_seconds"] if rows else 0.0,
        "config": history.config, "budget_clock": experiment.training.clock, "train_curve": curve,
        "eval_curve": evals, "measured": time.strftime("%Y-%m-%dT%H:%M"), "torch": torch.__version__,
        "threads": 1, "machine": platform.machine(),
        "train_curve_note": "[step, wall seconds, mean training-batch bits/dim over the last 50 steps, CPU seconds]",
        "state_dict": {k: v.cpu() for k, v in model.state_dict().items()},
    }


def train(work: Path, out: Path, jobs: int, steps: int | None = None, test_images: int | None = None) -> None:
    import iconv
    from iconv import configs
    from iconv.train import atomic_write_json

    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    tasks = [{"kind": kind, "work": str(work), "steps": steps, "test_images": test_images} for kind in NAMES]
    if jobs > 1:
        with ProcessPoolExecutor(jobs) as pool:
            results = list(pool.map(train_one, tasks))
    else:
        results = [train_one(t) for t in tasks]
    models = {}
    for r in results:
        name, file = NAMES[r["kind"]]
        arguments = dict(r["architecture"], shape=tuple(r["architecture"]["shape"]))
        model = (iconv.ConvFlow if r["model"] == "ConvFlow" else iconv.GlowBaseline)(**arguments)
        model.load_state_dict(r.pop("state_dict"))
        entry = {k: v for k, v in r.items() if k != "kind"}
        export(model, out / file, r["kind"], entry)
        models[name] = entry
    t = configs.flow("cpu").training
    summary = {
        "description": "Fashion-MNIST test bits/dim (all 10,000 test images, one seeded uniform dequantization) "
                       "of ConvFlow and the Glow-style baseline at equal parameter count and equal CPU time",
        "setting": f"{t.time_limit / 60:.0f} CPU-minutes per model (1 thread each, TrainConfig(clock="
                   f"'{t.clock}', time_limit={t.time_limit:g})), both models trained concurrently on a "
                   f"{os.cpu_count()}-core {platform.machine()} machine",
        "ratio_convflow_over_glow": models["ConvFlow"]["test_bits_per_dim"]
        / models["Glow baseline"]["test_bits_per_dim"],
        "budget_clock": t.clock, "models": models,
    }
    atomic_write_json(out / SUMMARY, summary)
    print(json.dumps({k: v["test_bits_per_dim"] for k, v in models.items()}))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="job", required=True)
    t = sub.add_parser("train", help="train both models and write the results")
    t.add_argument("--work", required=True, help="folder for the resumable training checkpoints")
    t.add_argument("--out", default=str(RESULTS), help=f"results folder (default {RESULTS})")
    t.add_argument("--jobs", type=int, choices=(1, 2), default=2, help="models trained at once")
    t.add_argument("--smoke", action="store_true", help="a quick check of this script: 3 steps, 200 test images")
    c = sub.add_parser("convert", help="rewrite iconv 0.1 files in today's format")
    c.add_argument("files", nargs="*", type=Path)
    c.add_argument("--all", action="store_true", help="both shipped files, in place")
    args = p.parse_args(argv)
    if args.job == "train":
        if args.smoke and Path(args.out).resolve() == RESULTS.resolve():
            p.error("--smoke writes test numbers: give another --out")
        train(Path(args.work), Path(args.out), args.jobs, *((3, 200) if args.smoke else ()))
        return 0
    files = [RESULTS / file for _, file in NAMES.values()] if args.all else args.files
    if not files:
        p.error("give the files to convert, or --all")
    for path in files:
        convert(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
