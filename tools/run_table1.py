"""Rebuild the paper's Table 1 (the path to invertibility) with iconv.classifier, outside CI.

Trains every row of ``iconv.classifier.TABLE1`` (plus the iAvgPool2d row again with the spectral
penalty) with the shared trainer ``iconv.train.fit``, checkpointing each run so that an
interrupted job resumes where it stopped, and writes one JSON with the measured accuracies, the
conditioning history of every run and the float32 reconstruction error of the invertible ones:

    python tools/run_table1.py --preset cpu --jobs 2 --out book/results/classifier/table1_cpu.json

Presets (explicit flags override them):

    ci     Fashion-MNIST, width 8,    60 steps of 32  (what the chapter trains at its ci size)
    cpu    Fashion-MNIST, width 16, 1500 steps of 64  (the larger CPU run, ~40 min on 2 cores)
    gpu    CIFAR-10, width 64, 15 epochs of 128, augmentation  (Colab GPU)
    paper  CIFAR-10, width 64, 100 epochs of 50, SGD lr 0.1, augmentation (the paper's settings)

Logs and checkpoints go to ``--work`` (default /tmp/iconv-runs/table1-<preset>/).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

PRESETS = {
    "ci": dict(data="fashion-mnist", width=8, steps=60, epochs=None, batch_size=32, lr=0.1, warmup=10,
               weight_decay=5e-4, augment=False, eval_every=10, eval_size=2000),
    "cpu": dict(data="fashion-mnist", width=16, steps=1500, epochs=None, batch_size=64, lr=0.05, warmup=50,
                weight_decay=5e-4, augment=False, eval_every=150, eval_size=None),
    "gpu": dict(data="cifar10", width=64, steps=None, epochs=15, batch_size=128, lr=0.1, warmup=200,
                weight_decay=5e-4, augment=True, eval_every=1000, eval_size=None),
    "paper": dict(data="cifar10", width=64, steps=None, epochs=100, batch_size=50, lr=0.1, warmup=0,
                  weight_decay=5e-4, augment=True, eval_every=5000, eval_size=None),
}
PENALTY = dict(spectral_weight=1.0, spectral_floor=0.2)


def run_names():
    from iconv.classifier import TABLE1

    names = [(f"row{i + 1}", i, False) for i in range(len(TABLE1))]
    return names + [("row6+penalty", 5, True)]


def train_one(job: dict) -> dict:
    """One configuration, in its own process (``threads`` CPU threads)."""
    import torch

    from iconv import data
    from iconv.classifier import TABLE1, ConvNet, evaluate_classifier, make_loss, reconstruction_error
    from iconv.train import TrainConfig, fit

    torch.set_num_threads(job["threads"])
    s, name, row = job["settings"], job["name"], TABLE1[job["row"]]
    kwargs = {"download": True} if s["data"] == "cifar10" and job["download"] else {}
    train_x, train_y = data.load(s["data"], "train", **kwargs)
    test_x, test_y = data.load(s["data"], "test", **kwargs)
    if s["eval_size"]:
        test_x, test_y = test_x[: s["eval_size"]], test_y[: s["eval_size"]]
    steps = s["steps"] or int(round(s["epochs"] * (len(train_x) // s["batch_size"])))
    torch.manual_seed(job["seed"])
    net = ConvNet(train_x.shape[1], 10, s["width"], **row.switches)
    penalty = PENALTY if job["penalty"] else {}
    config = TrainConfig(steps=steps, batch_size=s["batch_size"], lr=s["lr"], optimizer="sgd", momentum=0.9,
                         weight_decay=s["weight_decay"], warmup=s["warmup"], schedule="cosine",
                         eval_every=s["eval_every"], checkpoint_every=s["eval_every"], seed=job["seed"],
                         device=job["device"], log_every=10)
    start = time.time()
    history = fit(net, make_loss(augment=s["augment"], **penalty), train_x, train_y, config=config,
                  evaluate=lambda m: evaluate_classifier(m, test_x, test_y, 500, reconstruct=64),
                  checkpoint_path=Path(job["work"]) / f"{name}.pt", resume=True, progress=job["progress"])
    result = {
        "name": name, "change": row.change, "switches": row.switches, "penalty": penalty or None,
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
        result["reconstruction_float32"] = reconstruction_error(net, test_x[:256])
        result["reconstruction_float64"] = reconstruction_error(net.double(), test_x[:256])
    return result


def save_reconstructions(work: Path, settings: dict, png: str, names=("row6", "row6+penalty"), n: int = 8) -> dict:
    """Test images and their float32 reconstructions ``inverse(features(x))`` by the trained
    networks of ``names`` (read from their checkpoints in ``work``), as one PNG; returns the errors."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import torch

    from iconv import data
    from iconv.classifier import TABLE1, ConvNet, prepare_images, reconstruction_error
    from iconv.train import load_checkpoint

    test_x, _ = data.load(settings["data"], "test")
    images = test_x[:n]
    rows, errors = [("test images", prepare_images(images))], {}
    for name in names:
        row = TABLE1[int(name[3]) - 1]
        net = ConvNet(test_x.shape[1], 10, settings["width"], **row.switches)
        load_checkpoint(work / f"{name}.pt", net)
        net.eval()
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
    fig.suptitle(f"inverse(features(x)) in float32, {settings['data']}, width {settings['width']}, "
                 f"{settings['steps']} steps (measured outside CI)", fontsize=9)
    fig.subplots_adjust(hspace=0.35, wspace=0.05)
    fig.savefig(png, dpi=90, bbox_inches="tight")
    plt.close(fig)
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", choices=tuple(PRESETS), default="cpu")
    for key in ("width", "steps", "batch_size", "eval_every"):
        parser.add_argument("--" + key.replace("_", "-"), type=int)
    parser.add_argument("--epochs", type=float)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--jobs", type=int, default=1, help="configurations trained at once (processes)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--download", action="store_true", help="download CIFAR-10 if missing")
    parser.add_argument("--rows", default=None, help="comma-separated run names (default: all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--work", default=None, help="checkpoints (default /tmp/iconv-runs/table1-<preset>)")
    parser.add_argument("--out", default=None, help="JSON file for the results (required unless --pictures-only)")
    parser.add_argument("--progress", action="store_true")
    parser.add_argument("--pictures", default=None, help="PNG of float32 reconstructions by the trained row 6 nets")
    parser.add_argument("--pictures-only", action="store_true", help="only draw --pictures from the checkpoints")
    args = parser.parse_args(argv)

    settings = dict(PRESETS[args.preset])
    for key in ("width", "steps", "batch_size", "eval_every", "lr", "epochs"):
        if getattr(args, key) is not None:
            settings[key] = getattr(args, key)
    if args.steps is not None:
        settings["epochs"] = None
    elif args.epochs is not None:
        settings["steps"] = None
    work = Path(args.work or f"/tmp/iconv-runs/table1-{args.preset}")
    work.mkdir(parents=True, exist_ok=True)
    if args.pictures_only:
        if not args.pictures:
            parser.error("--pictures-only needs --pictures PNG")
        print(save_reconstructions(work, settings, args.pictures))
        return 0
    wanted = None if args.rows is None else set(args.rows.split(","))
    jobs = [dict(name=name, row=row, penalty=penalty, settings=settings, work=str(work), threads=args.threads,
                 device=args.device, download=args.download, seed=args.seed, progress=args.progress)
            for name, row, penalty in run_names() if wanted is None or name in wanted]
    if args.out is None:
        parser.error("--out JSON is required")
    start = time.time()
    if args.jobs > 1:
        with ProcessPoolExecutor(args.jobs) as pool:
            results = list(pool.map(train_one, jobs))
    else:
        results = [train_one(job) for job in jobs]
    import torch

    out = {
        "what": "Table 1 of Finzi et al. (2019) rebuilt with iconv.classifier; measured outside CI",
        "preset": args.preset, "settings": settings, "penalty_settings": PENALTY, "seed": args.seed,
        "machine": f"{platform.machine()} {os.cpu_count()} CPUs, torch {torch.__version__}, "
                   f"{args.jobs} job(s) x {args.threads} thread(s), shared with other work",
        "wall_seconds": time.time() - start, "runs": results,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(args.out).with_suffix(".tmp")
    tmp.write_text(json.dumps(out, indent=1))
    os.replace(tmp, args.out)
    for r in results:
        rec = r.get("reconstruction_float32", {}).get("relative_error")
        print(f"{r['name']:13s} {r['change']:42s} acc {100 * r['test_accuracy']:.2f}% (paper {r['paper_accuracy']})"
              + (f"  float32 reconstruction {rec:.2e}" if rec is not None else ""))
    print(f"wall {out['wall_seconds']:.0f} s -> {args.out}")
    if args.pictures:
        print(save_reconstructions(work, settings, args.pictures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
