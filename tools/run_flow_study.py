"""The flow study of issue 12 (item 1), one command: several flows x several seeds, each trained until
its held-out curve stops improving or its CPU budget is spent, resumable, with every number in one JSON.

    python tools/run_flow_study.py --jobs 2            # the full study (about 2 CPU-hours, see below)
    python tools/run_flow_study.py --quick --work /tmp/q --out /tmp/q/out   # seconds: proves the script works

The models (``MODELS`` below; ``--models`` picks some):

    convflow        this book's exact ConvFlow, depth 8 (chapter 7's cpu size, 8,520 parameters)
    paperflow       the paper's construction (iconv.models.PaperFlow): 3 Gaussian noise channels padded
                    onto the image, depths 3, 2, 2, nearest-neighbour downsampling, 1x1 conv before each
                    factor-out; it reports a BOUND (ELBO) and, on the test images, an importance-weighted
                    estimate with --iw-samples draws (both labelled as such in the JSON)
    glow            the Glow-style baseline with ConvFlow's parameter count (coupling width matched)
    convflow-large  ConvFlow with depth 12 and 5x5 kernels
    glow-large      the Glow baseline matched to convflow-large's parameter count

Data: Fashion-MNIST; the last ``--heldout`` training images are held out (the curve that decides
when to stop), training uses the rest, the first ``--test-images`` test images give the reported
numbers (of the best held-out checkpoint). Recipe: chapter 7's cpu size (``iconv.configs.flow("cpu")``:
Adam, batch 64, lr 3e-3, 200 warm-up steps, constant schedule, clip 50) for every model.

Stopping rule, per run: train in segments of ``--eval-every`` steps, evaluate the held-out bits/dim
after each; stop when (a) the best of the last ``--patience`` evaluations is not better than the best
before them by ``--min-improvement`` (0.005 bits/dim), or (b) the run has used ``--budget`` seconds of
its own process CPU time (training and evaluation; ``clock="process"``), or (c) ``--max-steps``.

Resume: every run checkpoints under ``--work/<model>-seed<k>/`` (``iconv.train.fit`` with
``resume="if-exists"``); launching the same command again continues every unfinished run exactly
and skips finished ones, then rewrites the JSON. Outputs in ``--out``: ``study.json`` (command,
commit, seeds, budget, stopping rule, machine, per run: parameters, steps, CPU seconds, the held-out
curve, a thinned training curve, test numbers; per model: mean and std over seeds) and
``models/<model>-seed<k>.pt``, the best checkpoint of each run in the self-describing format
(``iconv.load`` opens it).

CPU time of the full study (estimate): 5 models x 3 seeds x ``--budget`` 450 s = 1.9 CPU-hours at
most (early stopping ends some runs sooner), plus the test evaluations (a few minutes); with
``--jobs 2`` on 2 cores about 1 hour of wall-clock time.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

#: Model name -> (kind, constructor arguments); ``glow*`` match the parameter count of ``matches``.
MODELS = {
    "convflow": {"kind": "convflow", "args": {"depth": 8}},
    "paperflow": {"kind": "paperflow", "args": {"pad_channels": 3, "depth": [3, 2, 2]}},
    "glow": {"kind": "glow", "args": {"depth": 4}, "matches": "convflow"},
    "convflow-large": {"kind": "convflow", "args": {"depth": 12, "kernel_size": 5}},
    "glow-large": {"kind": "glow", "args": {"depth": 6}, "matches": "convflow-large"},
    # optional (not run unless named in --models): the paper's flow with an ActNorm before every conv
    "paperflow-actnorm": {"kind": "paperflow", "args": {"pad_channels": 3, "depth": [3, 2, 2], "actnorm": True},
                          "optional": True},
}
#: The same five at the --quick size (8x8 digits).
QUICK_MODELS = {
    "convflow": {"kind": "convflow", "args": {"depth": 1}},
    "paperflow": {"kind": "paperflow", "args": {"pad_channels": 1, "depth": 1}},
    "glow": {"kind": "glow", "args": {"depth": 1}, "matches": "convflow"},
    "convflow-large": {"kind": "convflow", "args": {"depth": 2, "kernel_size": 5}},
    "glow-large": {"kind": "glow", "args": {"depth": 1}, "matches": "convflow-large"},
}


@dataclasses.dataclass(frozen=True)
class Settings:
    """Everything that defines the study (recorded in study.json)."""

    data: str = "fashion-mnist"
    heldout: int = 2000
    train_images: int | None = None
    test_images: int = 2000
    seeds: tuple = (0, 1, 2)
    budget: float = 450.0
    eval_every: int = 250
    patience: int = 4
    min_improvement: float = 0.005
    max_steps: int = 200_000
    iw_samples: int = 16
    batch_size: int = 64
    lr: float = 3e-3
    warmup: int = 200
    clip: float = 50.0
    threads: int = 1


QUICK = Settings(data="digits", heldout=100, train_images=400, test_images=60, seeds=(0, 1), budget=20.0,
                 eval_every=3, patience=1, max_steps=6, iw_samples=4, batch_size=16, warmup=2)


# ----------------------------------------------------------------------------- models and data


def build(spec: dict, shape, models: dict):
    """The untrained model of ``spec`` for images of ``shape``."""
    from iconv.models import ConvFlow, GlowBaseline, PaperFlow
    from iconv.models.glow import matching_hidden_width

    kind, args = spec["kind"], dict(spec["args"])
    if kind == "convflow":
        return ConvFlow(shape, **args)
    if kind == "paperflow":
        return PaperFlow(shape, **args)
    target = build(models[spec["matches"]], shape, models).num_parameters()
    args.setdefault("hidden", matching_hidden_width(shape, target, args["depth"]))
    return GlowBaseline(shape, **args)


def load_data(s: Settings):
    """``(train, heldout, test)`` uint8 images: the training split minus its last ``heldout``."""
    from iconv import data as datasets

    train, _ = datasets.load(s.data, "train")
    test, _ = datasets.load(s.data, "test")
    if s.heldout >= len(train):
        raise ValueError(f"--heldout must be less than the {len(train)} training images, got {s.heldout}")
    train, heldout = train[:-s.heldout], train[-s.heldout:]
    if s.train_images:
        train = train[:s.train_images]
    return train, heldout, test[:s.test_images]


def data_record(s: Settings) -> dict:
    """What a shipped checkpoint says about its training data (``iconv.train.read_checkpoint(...)["data"]``)."""
    return {"name": s.data, "split": "train", "holdout": s.heldout, "train_images": s.train_images}


def is_bound(model) -> bool:
    from iconv.models import PaperFlow

    return isinstance(model, PaperFlow)


def heldout_bits(model, images, seed: int = 0) -> float:
    """Held-out bits/dim with common (seeded) noise: exact for an exact flow, the bound for PaperFlow."""
    from iconv.bounds import evaluate_bound_and_iw
    from iconv.evaluation import evaluate_bits_per_dim

    if is_bound(model):
        return evaluate_bound_and_iw(model, images, samples=1, seed=seed)["bits/dim (bound)"]
    return evaluate_bits_per_dim(model, images, seed=seed)


# ----------------------------------------------------------------------------- one run


def stop_reason(evals: list[float], s: Settings) -> str | None:
    """The stopping rule on the held-out curve: None, or why to stop."""
    if len(evals) > s.patience:
        recent, before = min(evals[-s.patience:]), min(evals[:-s.patience])
        if not recent < before - s.min_improvement:
            return f"no held-out improvement of {s.min_improvement} over the last {s.patience} evaluations"
    return None


def train_one(job: dict) -> dict:
    """Train one (model, seed) to its stopping rule, resumably; return its record for study.json."""
    import torch

    from iconv.bounds import evaluate_bound_and_iw, paper_flow_loss
    from iconv.data import dequantize
    from iconv.evaluation import evaluate_bits_per_dim
    from iconv.losses import flow_loss
    from iconv.train import TrainConfig, fit, load, load_checkpoint, write_checkpoint
    from iconv.train.files import atomic_write_json

    s, name, seed = job["settings"], job["name"], job["seed"]
    torch.set_num_threads(s.threads)
    work = Path(job["work"]) / f"{name}-seed{seed}"
    work.mkdir(parents=True, exist_ok=True)
    done_file = work / "done.json"
    if done_file.exists():
        return json.loads(done_file.read_text())
    train, heldout, test = load_data(s)
    torch.manual_seed(seed)
    model = build(job["models"][name], tuple(train.shape[1:]), job["models"])
    model.initialize(dequantize(train[:512], generator=torch.Generator().manual_seed(seed)))
    loss = paper_flow_loss if is_bound(model) else flow_loss
    checkpoint, best_path = work / "checkpoint.pt", work / "best.pt"
    reason, history = None, None
    steps = load_checkpoint(checkpoint)["step"] if checkpoint.exists() else 0
    while reason is None:
        target = min(s.max_steps, (steps // s.eval_every + 1) * s.eval_every)
        config = TrainConfig(steps=target, batch_size=s.batch_size, lr=s.lr, warmup=s.warmup, schedule="constant",
                             clip=s.clip, eval_every=s.eval_every, checkpoint_every=s.eval_every,
                             log_every=max(1, s.eval_every // 5), seed=seed, device="cpu", time_limit=s.budget,
                             clock="process")
        history = fit(model, loss, train, config=config, evaluate=lambda m: {"heldout": heldout_bits(m, heldout)},
                      checkpoint_path=checkpoint, resume="if-exists", run={"study": "flow", "model": name},
                      progress=False)
        steps = history.completed_steps
        evals = [row["heldout"] for row in history.eval]
        if evals and evals[-1] == min(evals) and (not best_path.exists() or
                                                   load_checkpoint(best_path)["step"] != steps):
            write_checkpoint(best_path, model, step=steps, seed=seed, data=data_record(s),
                             run={"study": "flow", "model": name}, extra={"heldout_bits_per_dim": evals[-1]})
        if history.stopped == "time_limit":
            reason = f"CPU budget of {s.budget:g} s spent"
        elif steps >= s.max_steps:
            reason = f"max_steps {s.max_steps} reached"
        else:
            reason = stop_reason(evals, s)
    best = load(best_path)
    if is_bound(best):
        numbers = evaluate_bound_and_iw(best, test, samples=s.iw_samples, seed=0)
        test_numbers = {"test": numbers["bits/dim (bound)"], "test_iw": numbers[f"bits/dim (iw {s.iw_samples})"],
                        "likelihood": "bound"}
    else:
        test_numbers = {"test": evaluate_bits_per_dim(best, test, seed=0), "likelihood": "exact"}
    record = {
        "model": name, "seed": seed, "class": type(best).__name__, "arguments": best.arguments,
        "parameters": best.num_parameters(), "steps": steps, "stopped": reason,
        "cpu_seconds": history.eval[-1]["process_seconds"] if history.eval else None,
        "heldout_best": min(row["heldout"] for row in history.eval),
        "best_step": load_checkpoint(best_path)["step"],
        "heldout_curve": [{k: row[k] for k in ("step", "process_seconds", "seconds", "heldout")}
                          for row in history.eval],
        "train_curve": [{k: row.get(k) for k in ("step", "process_seconds", "loss")} for row in history.train],
        **test_numbers,
    }
    atomic_write_json(done_file, record)
    return record


# ----------------------------------------------------------------------------- the study


def machine(s: Settings, jobs: int) -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "threads_per_run": s.threads, "parallel_runs": jobs}


def summary(runs: list[dict]) -> dict:
    """Per model: mean and std (over seeds) of the test and held-out numbers, steps and CPU time."""
    from iconv.studies import mean_std

    out = {}
    for name in dict.fromkeys(r["model"] for r in runs):
        rows = [r for r in runs if r["model"] == name]
        entry = {"seeds": len(rows), "parameters": rows[0]["parameters"], "likelihood": rows[0]["likelihood"]}
        for key in ("test", "test_iw", "heldout_best", "steps", "cpu_seconds"):
            values = [r[key] for r in rows if r.get(key) is not None]
            if values:
                mean, std = mean_std(values, f"{name} {key}")
                entry[key] = {"mean": mean, "std": std}
        out[name] = entry
    return out


#: The pairs the chapters compare: (a, b, what a - b means); "test" is exact for a flow, a bound for PaperFlow.
PAIRS = (
    ("convflow", "glow", "exact ConvFlow against the Glow-style baseline at equal parameter count"),
    ("convflow-large", "glow-large", "the same at the larger size"),
    ("convflow-large", "convflow", "what the larger ConvFlow (depth 12, 5x5 kernels) gains"),
    ("glow-large", "glow", "what the larger baseline gains"),
    ("convflow", "paperflow", "exact ConvFlow against the paper's noise-padded flow (its bound)"),
)


def value_at_step(run: dict, step: int) -> float:
    """The held-out bits/dim of ``run`` at its last evaluation at or before ``step``."""
    rows = [r for r in run["heldout_curve"] if r["step"] <= step]
    if not rows:
        raise ValueError(f"run {run['model']}-seed{run['seed']} has no evaluation at or before step {step}")
    return rows[-1]["heldout"]


def comparisons(runs: list[dict]) -> list[dict]:
    """Every pair of :data:`PAIRS` present in ``runs``: the difference of test means (and, for
    PaperFlow, of its importance-weighted estimate), the ratio of the means, and the equal-steps
    view (held-out bits/dim at the largest step every seed of both reached); each difference with
    its standard error and the noise verdict of :mod:`iconv.studies`."""
    from iconv.studies import compare

    by_model = {}
    for r in runs:
        by_model.setdefault(r["model"], []).append(r)
    out = []
    for a, b, what in PAIRS:
        if a not in by_model or b not in by_model:
            continue
        ra, rb = by_model[a], by_model[b]
        ta, tb = [r["test"] for r in ra], [r["test"] for r in rb]
        step = min(max(row["step"] for row in r["heldout_curve"]) for r in ra + rb)
        entry = {"a": a, "b": b, "what": what, "likelihood": [ra[0]["likelihood"], rb[0]["likelihood"]],
                 "test": compare(ta, tb).as_dict(), "ratio": (sum(ta) / len(ta)) / (sum(tb) / len(tb)),
                 "equal_steps": {"step": step, **compare([value_at_step(r, step) for r in ra],
                                                         [value_at_step(r, step) for r in rb]).as_dict()}}
        if rb[0].get("test_iw") is not None:
            entry["test_vs_iw"] = compare(ta, [r["test_iw"] for r in rb]).as_dict()
        out.append(entry)
    return out


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="a seconds-long run on 8x8 digits (CI)")
    p.add_argument("--work", default="runs/flow_study", help="checkpoints (resumable)")
    p.add_argument("--out", default=str(ROOT / "book" / "results" / "flow_study"), help="study.json and models/")
    p.add_argument("--models", nargs="+", help="a subset of the models")
    p.add_argument("--jobs", type=int, default=1, help="runs in parallel (one thread each)")
    for field in ("budget", "eval_every", "patience", "min_improvement", "max_steps", "iw_samples", "heldout",
                  "test_images"):
        p.add_argument("--" + field.replace("_", "-"), type=type(getattr(Settings, field)), default=None)
    p.add_argument("--seeds", type=int, nargs="+")
    a = p.parse_args(argv)
    s = QUICK if a.quick else Settings()
    changes = {f: getattr(a, f) for f in ("budget", "eval_every", "patience", "min_improvement", "max_steps",
                                          "iw_samples", "heldout", "test_images") if getattr(a, f) is not None}
    if a.seeds:
        changes["seeds"] = tuple(a.seeds)
    s = dataclasses.replace(s, **changes)
    table = QUICK_MODELS if a.quick else MODELS
    names = a.models or [n for n, spec in table.items() if not spec.get("optional")]
    unknown = [n for n in names if n not in table]
    if unknown:
        p.error(f"--models: unknown {unknown}; choose from {list(table)}")
    if a.jobs < 1:
        p.error(f"--jobs must be positive, got {a.jobs}")
    from iconv.studies import NOISE_FACTOR, code_version

    out, work = Path(a.out), Path(a.work)
    jobs = [{"settings": s, "name": n, "seed": seed, "work": str(work), "models": table}
            for n in names for seed in s.seeds]
    start = time.time()
    if a.jobs == 1:
        runs = [train_one(j) for j in jobs]
    else:
        with ProcessPoolExecutor(a.jobs) as pool:
            runs = list(pool.map(train_one, jobs))
    (out / "models").mkdir(parents=True, exist_ok=True)
    for r in runs:
        r["best_model"] = f"models/{r['model']}-seed{r['seed']}.pt"
        shutil.copyfile(work / f"{r['model']}-seed{r['seed']}" / "best.pt", out / r["best_model"])
    study = {
        "command": "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__, ROOT)] +
                                        list(sys.argv[1:] if argv is None else argv)),
        "commit": code_version(ROOT), "quick": a.quick, "settings": dataclasses.asdict(s), "seeds": list(s.seeds),
        "budget": {"cpu_seconds_per_run": s.budget, "clock": "process CPU time (training and evaluation)"},
        "stopping_rule": (f"stop when the best of the last {s.patience} held-out evaluations (every {s.eval_every} "
                          f"steps) is not {s.min_improvement} bits/dim better than the best before them, or after "
                          f"{s.budget:g} s of process CPU time, or at {s.max_steps} steps; report the best "
                          "held-out checkpoint on the test images"),
        "machine": machine(s, a.jobs), "wall_seconds_this_launch": time.time() - start,
        "noise_rule": f"within noise when |difference of means| < {NOISE_FACTOR:g} standard errors, "
                      "sqrt(s_a^2/n_a + s_b^2/n_b), over the seeds (iconv.studies)",
        "summary": summary(runs), "comparisons": comparisons(runs), "runs": runs,
    }
    from iconv.train.files import atomic_write_json

    atomic_write_json(out / "study.json", study)
    print(json.dumps(study["summary"], indent=1))
    return study


if __name__ == "__main__":
    main()
