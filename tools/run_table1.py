"""Rebuild the paper's Table 1 (the path to invertibility) with iconv, outside CI.

Trains every row of ``iconv.configs.TABLE1`` (plus the iAvgPool2d row again with the spectral
penalty ``iconv.configs.TABLE1_PENALTY``) as the experiments ``iconv.configs.classifier(size, row,
penalty)``, run by ``iconv.train.run`` and checkpointed so that an interrupted job resumes where it
stopped (``resume="if-exists"``), and writes one JSON with the measured accuracies, the
conditioning history of every run and the float32 reconstruction error of the invertible ones:

    python tools/run_table1.py --size cpu --seeds 0 1 2 --jobs 2 \
        --work runs/table1-cpu --out book/results/classifier/table1_cpu.json \
        --pictures book/results/classifier/reconstructions_cpu.png --models book/results/classifier/models
    python tools/run_table1.py --quick --work /tmp/t1 --out /tmp/t1/table1.json   # seconds (CI)

Every run is repeated for each of ``--seeds`` (checkpoints under ``--work/seed<k>/``). The JSON
records the command, the commit, the machine, every run, and per configuration the mean and
standard deviation over seeds; per change of the table, the difference of the mean accuracies
against the row the paper compares with, its standard error ``sqrt(s_a^2/n_a + s_b^2/n_b)``, and
whether it lies within noise (``|difference| < 2`` standard errors).

The sizes are those of ``iconv.configs`` (explicit flags override them):

    ci     Fashion-MNIST, width 8,    60 steps of 32  (what chapter 9 trains at its ci size)
    cpu    Fashion-MNIST, width 16, 1000 steps of 64, 3 seeds  (the stored CPU run, ~50 min on 2 cores)
    gpu    CIFAR-10, width 64, 15 epochs of 128, augmentation  (Colab GPU)
    paper  CIFAR-10, width 64, 100 epochs of 50, SGD lr 0.1, augmentation (the paper's settings)

Checkpoints go to ``--work`` (default ``runs/table1-<size>`` in the current folder).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path


def run_names():
    """``(name, row index, penalty)`` of the seven runs."""
    from iconv.configs import TABLE1

    names = [(f"row{i + 1}", i, False) for i in range(len(TABLE1))]
    return names + [("row6+penalty", 5, True)]


#: ``--quick``: the ``ci`` size cut to seconds (tiny width, a few steps, 200 test images), two seeds.
QUICK = {"size": "ci", "width": 4, "steps": 4, "eval_every": 2, "test_images": 200, "seeds": (0, 1)}


def experiment(size: str, row: int, penalty: bool, overrides: dict, seed: int):
    """The configured experiment of one run, with the command line's overrides."""
    from iconv import configs

    e = configs.classifier(size, row, penalty)
    if "test_images" in overrides:
        e = e.replace(data={"test_images": overrides["test_images"]})
    training = {k: v for k, v in overrides.items() if k in ("steps", "epochs", "batch_size", "lr")}
    if "steps" in training:
        training["epochs"] = None
    elif "epochs" in training:
        training["steps"] = None
    model = {"width": overrides["width"]} if "width" in overrides else {}
    evaluation = {"every": overrides["eval_every"]} if "eval_every" in overrides else {}
    return e.replace(training=training, model=model, evaluation=evaluation, seed=seed)


def train_one(job: dict) -> dict:
    """One configuration, in its own process (``threads`` CPU threads)."""
    import torch

    from iconv.configs import TABLE1
    from iconv.evaluation import reconstruction_error
    from iconv.train import run

    torch.set_num_threads(job["threads"])
    name, row = job["name"], TABLE1[job["row"]]
    e = experiment(job["size"], job["row"], job["penalty"], job["overrides"], job["seed"])
    start = time.time()
    result = run(e, checkpoint=Path(job["work"]) / f"seed{job['seed']}" / f"{name}.pt", resume="if-exists", device=job["device"],
                 progress=job["progress"], download=job["download"], log_every=10)
    net, history = result.model, result.history
    out = {
        "name": name, "seed": job["seed"], "change": row.change, "switches": row.switches,
        "penalty": {"spectral_weight": e.training.spectral_weight, "spectral_floor": e.training.spectral_floor}
        if job["penalty"] else None,
        "paper_accuracy": row.paper_accuracy, "paper_change": row.paper_change, "compared_with": row.compared_with,
        "parameters": net.effective_parameter_count(), "steps": history.steps, "stopped": history.stopped,
        "train_seconds": history.train[-1]["seconds"] if history.train else None,
        "wall_seconds_this_call": time.time() - start,
        "test_accuracy": history.last_eval["test_accuracy"],
        "eval_history": history.eval,
        "train_accuracy_last100": sum(r["acc"] for r in history.train[-10:]) / max(1, len(history.train[-10:])),
    }
    if net.is_invertible:
        net.cpu().float().eval()
        out["reconstruction_float32"] = reconstruction_error(net, result.test_images[:256])
        out["reconstruction_float64"] = reconstruction_error(net.double(), result.test_images[:256])
    return out


def save_reconstructions(work: Path, size: str, png: str, names=("row6", "row6+penalty"), n: int = 8) -> dict:
    """Test images and their float32 reconstructions ``inverse(features(x))`` by the trained
    networks of ``names`` (read with ``iconv.load`` from their checkpoints in ``work``), as one PNG;
    returns the errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    import iconv
    from iconv import configs
    from iconv.data import prepare_images
    from iconv.evaluation import reconstruction_error
    from iconv.train import atomic_write, load_data, read_checkpoint

    state = read_checkpoint(work / f"{names[0]}.pt")
    e = configs.Experiment.from_dict(state["experiment"]) if state["experiment"] else configs.classifier(size)
    test_x = load_data(e.data)[2]
    images = test_x[:n]
    rows, errors = [("test images", prepare_images(images))], {}
    for name in names:
        net = iconv.load(work / f"{name}.pt")
        with torch.no_grad():
            x_back = net.inverse(net.features(prepare_images(images)))
        errors[name] = reconstruction_error(net, test_x[:256])["relative_error"]
        label = f"{name}{'' if 'penalty' in name else ' (no penalty)'}: float32 error {errors[name]:.1e}"
        rows.append((label, x_back))
    fig, axes = plt.subplots(len(rows), n, figsize=(n, 1.25 * len(rows)))
    for r, (title, batch) in enumerate(rows):
        for c in range(n):
            img = (batch[c] * 0.25 + 0.5).clamp(0, 1).permute(1, 2, 0).squeeze(-1).numpy()
            axes[r, c].imshow(img, cmap="gray", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(title, fontsize=8, loc="left")
    steps = e.training.steps if e.training.steps is not None else f"{e.training.epochs:g} epochs of"
    fig.suptitle(f"inverse(features(x)) in float32, {e.data.name}, width {e.model.width}, "
                 f"{steps} steps (measured outside CI)", fontsize=9)
    fig.subplots_adjust(hspace=0.35, wspace=0.05)
    try:
        atomic_write(png, lambda f: fig.savefig(f, format="png", dpi=90, bbox_inches="tight"))
    finally:
        plt.close(fig)
    return errors


def export_models(work: Path, seeds, names, out_dir: Path, root: Path) -> dict:
    """Write every trained net ``work/seed<k>/<name>.pt`` to ``out_dir/<name>-seed<k>.pt`` without its
    optimizer state (the self-describing format: ``iconv.load`` opens each); returns name-seed -> path
    relative to ``root``."""
    from iconv.train import read_checkpoint, write_checkpoint

    import iconv

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = {}
    for seed in seeds:
        for name in names:
            source = work / f"seed{seed}" / f"{name}.pt"
            state = read_checkpoint(source)
            net = iconv.load(source)
            target = out_dir / f"{name}-seed{seed}.pt"
            write_checkpoint(target, net, step=state["step"], run=state["run"], experiment=state["experiment"],
                             data=state["data"], seed=state["seed"])
            paths[f"{name}-seed{seed}"] = os.path.relpath(target, root)
    return paths


def summarize(results: list[dict]) -> dict:
    """Per run name: the seeds' test accuracies, their mean and standard deviation; per change with
    a paper difference, the difference of means against the row it is compared with, its standard
    error and whether it is within noise (the rule of :mod:`iconv.studies`)."""
    from iconv.studies import compare, mean_std

    rows = {}
    for r in results:
        rows.setdefault(r["name"], []).append(r)
    out = {}
    for name, runs in rows.items():
        acc = [r["test_accuracy"] for r in runs]
        mean, std = mean_std(acc, f"{name} test accuracies")
        out[name] = {"change": runs[0]["change"], "seeds": [r["seed"] for r in runs], "accuracies": acc,
                     "mean": mean, "std": std,
                     "paper_accuracy": runs[0]["paper_accuracy"], "paper_change": runs[0]["paper_change"]}
    for name, entry in out.items():
        first = rows[name][0]
        if first["penalty"]:  # the penalty run is compared with the same row without it
            other = name.split("+")[0]
        else:
            other = None if first["compared_with"] is None else f"row{first['compared_with'] + 1}"
        if other in out:
            d = compare(entry["accuracies"], out[other]["accuracies"])
            entry.update(compared_with=other, change_vs=d.difference, change_se=d.standard_error,
                         within_noise=d.within_noise)
    return out


def main(argv=None) -> int:
    import shlex

    from iconv import configs

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", "--preset", choices=configs.CLASSIFIER_SIZES, default="cpu")
    for key in ("width", "steps", "batch_size", "eval_every", "test_images"):
        parser.add_argument("--" + key.replace("_", "-"), type=int)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--quick", action="store_true", help="seconds: the ci size cut down (proves the script)")
    parser.add_argument("--jobs", type=int, default=1, help="configurations trained at once (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    parser.add_argument("--rows", default=None, help="comma-separated run names (default: all)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="one run per seed (default: 0 1 2)")
    parser.add_argument("--work", default=None, help="checkpoints (default: runs/table1-<size> here)")
    parser.add_argument("--out", default=None, help="JSON file for the results (required unless --pictures-only)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--pictures", default=None, help="PNG of float32 reconstructions by the trained row 6 nets")
    parser.add_argument("--pictures-only", action="store_true", help="only draw --pictures from the checkpoints")
    parser.add_argument("--models", default=None,
                        help="folder for the trained nets without optimizer state (iconv.load opens each)")
    parser.add_argument("--models-only", action="store_true",
                        help="only write --models from finished checkpoints and list them in the --out JSON")
    args = parser.parse_args(argv)

    if args.quick:
        if args.size != parser.get_default("size"):
            parser.error(f"--quick runs its own cut of the ci size; drop --size {args.size} or --quick")
        for key, value in QUICK.items():
            if key != "seeds" and (key == "size" or getattr(args, key) is None):
                setattr(args, key, value)
        args.seeds = args.seeds or list(QUICK["seeds"])
    seeds = args.seeds or [0, 1, 2]
    if len(set(seeds)) != len(seeds):
        parser.error(f"--seeds must be distinct, got {seeds}")
    if args.jobs < 1 or args.threads < 1:
        parser.error(f"--jobs and --threads must be positive, got {args.jobs} and {args.threads}")
    overrides = {k: getattr(args, k) for k in ("width", "steps", "batch_size", "eval_every", "lr", "epochs",
                                               "test_images") if getattr(args, k) is not None}
    try:  # check the overrides once, before any process starts
        experiment(args.size, 0, False, overrides, seeds[0])
    except ValueError as err:
        parser.error(str(err))
    work = Path(args.work or Path("runs") / f"table1-{args.size}")
    if args.pictures_only:
        if not args.pictures:
            parser.error("--pictures-only needs --pictures PNG")
        print(save_reconstructions(work / f"seed{seeds[0]}", args.size, args.pictures))
        return 0
    if args.out is None:
        parser.error("--out JSON is required")
    if args.models_only:
        if not args.models:
            parser.error("--models-only needs --models FOLDER")
        known_names = [name for name, _, _ in run_names()]
        wanted_names = known_names if args.rows is None else args.rows.split(",")
        from iconv.train import atomic_write_json

        out = json.loads(Path(args.out).read_text())
        out["models"] = export_models(work, seeds, wanted_names, Path(args.models), Path(args.out).resolve().parent)
        atomic_write_json(args.out, out)
        print(f"{len(out['models'])} models -> {args.models}")
        return 0
    known = [name for name, _, _ in run_names()]
    wanted = None if args.rows is None else args.rows.split(",")
    if wanted is not None and set(wanted) - set(known):
        parser.error(f"--rows: unknown {sorted(set(wanted) - set(known))}; choose from {known}")
    pictured = ("row6", "row6+penalty")
    if args.pictures and wanted is not None and not set(pictured) <= set(wanted):
        parser.error(f"--pictures draws the reconstructions of {pictured}; --rows {args.rows} does not train both")
    for seed in seeds:
        (work / f"seed{seed}").mkdir(parents=True, exist_ok=True)
    Path(args.out).resolve().parent.mkdir(parents=True, exist_ok=True)
    jobs = [dict(name=name, row=row, penalty=penalty, size=args.size, overrides=overrides, work=str(work),
                 threads=args.threads, device=args.device, download=args.download, seed=seed,
                 progress=args.progress)
            for seed in seeds for name, row, penalty in run_names() if wanted is None or name in wanted]
    start = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(train_one, jobs))
    else:
        results = [train_one(job) for job in jobs]
    import torch

    from iconv.studies import NOISE_FACTOR, code_version
    from iconv.train import atomic_write_json

    e = experiment(args.size, 0, False, overrides, seeds[0])
    settings = {"data": e.data.name, "width": e.model.width, **dataclasses.asdict(e.training),
                "eval_every": e.evaluation.every, "eval_size": e.data.test_images}
    out = {
        "what": "Table 1 of Finzi et al. (2019) rebuilt with iconv; measured outside CI",
        "command": "python " + " ".join(shlex.quote(x) for x in ["tools/run_table1.py"] +
                                        list(sys.argv[1:] if argv is None else argv)),
        "commit": code_version(Path(__file__).resolve().parents[1]), "quick": args.quick,
        "preset": args.size, "settings": settings, "penalty_settings": configs.TABLE1_PENALTY, "seeds": seeds,
        "experiment": e.to_dict(),
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{args.jobs} job(s) x {args.threads} thread(s), shared with other work",
        "noise_rule": f"a change is within noise when |difference of means| < {NOISE_FACTOR:g} standard errors, "
                      "sqrt(s_a^2/n_a + s_b^2/n_b), over the seeds (iconv.studies)",
        "wall_seconds": time.time() - start, "summary": summarize(results), "runs": results,
    }
    if args.models:
        out["models"] = export_models(work, seeds, list(dict.fromkeys(r["name"] for r in results)),
                                      Path(args.models), Path(args.out).resolve().parent)
    atomic_write_json(args.out, out)
    for name, entry in out["summary"].items():
        std = f" ± {100 * entry['std']:.2f}" if entry["std"] is not None else ""
        change = (f"  change {100 * entry['change_vs']:+.2f}" if entry.get("change_vs") is not None else "")
        noise = "  (within noise)" if entry.get("within_noise") else ""
        print(f"{name:13s} {entry['change']:42s} acc {100 * entry['mean']:.2f}{std}% over {len(entry['seeds'])} "
              f"seed(s) (paper {entry['paper_accuracy']}){change}{noise}")
    print(f"wall {out['wall_seconds']:.0f} s -> {args.out}")
    if args.pictures:
        print(save_reconstructions(work / f"seed{seeds[0]}", args.size, args.pictures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
