r"""Training throughput: steps per second and peak memory of a flow's training step, side by side.

One *step* is what a training loop spends per batch besides the optimizer: the mean negative
log-likelihood of a batch of dequantized images (forward pass, every log-determinant included)
and its backward pass, ``-model.log_prob(x).mean()`` then ``.backward()``, gradients cleared
first. The models are the ones chapter 7 compares (:func:`iconv.train.build_flow`): a
:class:`iconv.ConvFlow` with ``depth`` steps per scale, and the Glow-style baseline
(:class:`iconv.GlowBaseline`, ``depth // 2`` steps per scale) whose coupling width
(:func:`iconv.models.glow.matching_hidden_width`) gives it the same parameter count. Both start
from a data-dependent initialisation on the measured batch (random ``uint8`` images of the given
shape: the cost of a step does not depend on the pixel values).

Time: the models' steps are interleaved round by round (:func:`iconv.bench.time_interleaved`);
each model gets the median and quartiles of its step time, and the ratio to the baseline is given
as the ratio of medians and as the median and quartiles of the per-round ratios. On the CPU this
runs once per thread count (``torch.set_num_threads``), by default 1 and 2.

Peak memory, "peak MiB": the most memory the step holds at once beyond what was allocated before
it started (parameters, the batch). On CUDA: ``torch.cuda.max_memory_allocated`` after
``reset_peak_memory_stats`` (the caching allocator's own count). On the CPU, where torch keeps no
such statistic and ``tracemalloc`` sees none of torch's buffers: every allocation and free of
torch's CPU allocator during one step, recorded by ``torch.profiler`` (``profile_memory=True``)
and replayed in time order; the peak of the running total is the answer (method
``"torch.profiler"``). Both count tensor memory, not the process's resident size (no Python
objects, no library workspaces), and neither depends on other programs on the machine.

Command line::

    python -m iconv.bench --training                       # Fashion-MNIST shape, depth 8, batch 64
    python -m iconv.bench --training --threads 1 --repeats 20 --csv training.csv
    python -m iconv.bench --training --image 3x32x32 --device cuda
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import tempfile
from typing import Callable, Sequence

import torch

from .core import metadata, resolve_device, resolve_dtype
from .timing import paired_ratios, spread, time_interleaved

__all__ = ["MODELS", "TRAINING_SHAPES", "build_models", "format_training_table", "measure_training", "parse_image",
           "peak_memory", "training_columns", "training_step"]

#: The models compared, in table order; the last one is the baseline of every ratio.
MODELS = ("convflow", "glow")
BASELINE = "glow"
LABELS = {"convflow": "ConvFlow", "glow": "Glow baseline"}

#: Image shapes of the book's studies: Fashion-MNIST (chapter 7) and CIFAR-10 (the paper's flow).
TRAINING_SHAPES = {"fashion-mnist": (1, 28, 28), "cifar10": (3, 32, 32)}


def parse_image(text: str) -> tuple[int, int, int]:
    """``"1x28x28"`` -> ``(1, 28, 28)``; also a data set name of :data:`TRAINING_SHAPES`."""
    if text in TRAINING_SHAPES:
        return TRAINING_SHAPES[text]
    try:
        shape = tuple(int(part) for part in text.lower().split("x"))
    except ValueError:
        shape = ()
    if len(shape) != 3 or min(shape) < 1:
        raise ValueError(f"an image shape is written CxHxW, e.g. 1x28x28, or one of {sorted(TRAINING_SHAPES)}; "
                         f"got {text!r}")
    return shape


def build_models(shape=(1, 28, 28), depth: int = 8, models: Sequence[str] = MODELS,
                 kernel_size: int = 3) -> dict[str, torch.nn.Module]:
    """The flows of chapter 7 (:func:`iconv.train.build_flow`): ConvFlow at ``depth`` with ``k x k``
    kernels, and the Glow baseline matched to its parameter count (depth 8, k = 3 is the study's
    small pair, depth 12, k = 5 its large one)."""
    from ..train import build_flow

    unknown = [m for m in models if m not in MODELS]
    if unknown:
        raise ValueError(f"unknown model(s) {unknown}; expected names from {list(MODELS)}")
    if isinstance(kernel_size, bool) or not isinstance(kernel_size, int) or kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd int, got {kernel_size!r}")
    return {name: build_flow(tuple(shape), name, depth=depth, kernel_size=kernel_size) for name in models}


def training_step(model: torch.nn.Module, x: torch.Tensor) -> Callable[[], torch.Tensor]:
    """A zero-argument step: clear the gradients, ``loss = -model.log_prob(x).mean()``, backward; returns the loss."""
    def step():
        model.zero_grad(set_to_none=True)
        loss = -model.log_prob(x).mean()
        loss.backward()
        return loss
    return step


def _replayed_peak(trace_path: str) -> int:
    """The peak of the running total of the ``[memory]`` events (bytes, + allocated / - freed) of a chrome trace."""
    with open(trace_path) as handle:
        events = json.load(handle)["traceEvents"]
    changes = sorted((e["ts"], e["args"]["Bytes"]) for e in events
                     if e.get("name") == "[memory]" and e.get("args", {}).get("Device Type", 0) == 0)
    total = peak = 0
    for _, change in changes:
        total += change
        peak = max(peak, total)
    return peak


@contextlib.contextmanager
def _stderr_silenced():
    """Send the process's file descriptor 2 to /dev/null for the block.

    Some torch builds (2.13's CPU wheel among them) print a tracing line to the process's stderr
    each time a profiler starts and stops; in a notebook they land in the page. Python's own
    ``sys.stderr`` is untouched, and the descriptor is restored even when the block raises.
    """
    try:
        saved = os.dup(2)
    except OSError:  # no descriptor 2 to redirect
        yield
        return
    try:
        with open(os.devnull, "wb") as null:
            os.dup2(null.fileno(), 2)
        yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def peak_memory(step: Callable[[], object], device: torch.device | str = "cpu") -> tuple[int, str]:
    """``(bytes, method)``: the peak memory one call of ``step()`` holds beyond what was allocated before it.

    CUDA: the caching allocator's peak statistic (``"torch.cuda.max_memory_allocated"``). CPU: the
    allocations and frees of torch's CPU allocator recorded by ``torch.profiler`` and replayed in
    time order (``"torch.profiler"``); see the module docstring.
    """
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before, "torch.cuda.max_memory_allocated"
    from torch.profiler import ProfilerActivity, profile

    with _stderr_silenced(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    fd, path = tempfile.mkstemp(suffix=".json")
    os.close(fd)
    try:
        prof.export_chrome_trace(path)
        return _replayed_peak(path), "torch.profiler"
    finally:
        os.remove(path)


def training_columns() -> list[str]:
    """The columns of :func:`measure_training`'s rows (and of ``--training --csv``), in order.

    ``depth`` is the steps per scale (``"8/8"``), ``kernel_size`` ConvFlow's conv kernel (0 for the
    baseline, whose coupling networks use 3x3 convs), ``hidden`` the baseline's coupling width (0 for
    ConvFlow, which has none), ``threads`` 0 on CUDA; ``*_vs_baseline`` are ratios to the Glow
    baseline measured in the same rounds (1 for the baseline itself): ``time_vs_baseline`` the ratio
    of the median step times, ``time_vs_baseline_paired`` the median of the per-round ratios and
    ``time_vs_baseline_q1``/``_q3`` their quartiles.
    """
    return ["model", "parameters", "depth", "kernel_size", "hidden", "image", "batch", "device", "hardware", "dtype",
            "threads", "step_ms", "step_ms_q1", "step_ms_q3", "rel_iqr", "repeats", "steps_per_s", "peak_mib",
            "memory_method", "time_vs_baseline", "time_vs_baseline_paired", "time_vs_baseline_q1",
            "time_vs_baseline_q3", "memory_vs_baseline"]


def measure_training(
    shape=(1, 28, 28),
    depth: int = 8,
    kernel_size: int = 3,
    batch: int = 64,
    device: str | torch.device = "cpu",
    dtype: str | torch.dtype = "float32",
    threads: Sequence[int | None] = (1, 2),
    repeats: int = 10,
    warmup: int = 2,
    models: Sequence[str] = MODELS,
    seed: int = 0,
    memory: bool = True,
) -> list[dict]:
    """One row per model and thread count (see :func:`training_columns`); ratios are to the Glow baseline.

    ``threads`` is ignored on CUDA (one row per model). The thread count in force before the call
    is restored afterwards.
    """
    device, dtype = resolve_device(device), resolve_dtype(dtype)
    if isinstance(batch, bool) or not isinstance(batch, int) or batch < 1:
        raise ValueError(f"batch must be a positive int, got {batch!r}")
    if device.type == "cuda":
        threads = [None]
    elif not threads or any(t is not None and (isinstance(t, bool) or not isinstance(t, int) or t < 1)
                            for t in threads):
        raise ValueError(f"threads must be positive ints, got {threads!r}")
    from ..data import dequantize

    torch.manual_seed(seed)
    built = build_models(shape, depth, models, kernel_size)
    generator = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (batch, *shape), generator=generator, dtype=torch.uint8)
    x = dequantize(images, generator=generator, dtype=dtype).to(device)
    steps = {}
    for name, model in built.items():
        model.to(device=device, dtype=dtype).initialize(x)
        steps[name] = training_step(model, x)
    hardware = metadata(device)["hardware"]
    before = torch.get_num_threads()
    rows = []
    try:
        for count in threads:
            if count is not None:
                torch.set_num_threads(count)
            samples = time_interleaved(steps, repeats=repeats, warmup=warmup, device=device)
            peaks = {}
            for name, step in steps.items():  # from a state without gradients, as after zero_grad(set_to_none)
                built[name].zero_grad(set_to_none=True)
                peaks[name] = peak_memory(step, device) if memory else (math.nan, "")
            for name, model in built.items():
                stats = spread(samples[name])
                ratio = spread(paired_ratios(samples[name], samples[BASELINE])) if BASELINE in samples else None
                peak, method = peaks[name]
                rows.append(dict(
                    model=name, parameters=model.num_parameters(), depth=_depth_text(model),
                    kernel_size=model.arguments.get("kernel_size", 0),
                    hidden=model.arguments.get("hidden", 0), image="x".join(map(str, shape)), batch=batch,
                    device=device.type, hardware=hardware, dtype=str(dtype).replace("torch.", ""),
                    threads=torch.get_num_threads() if device.type == "cpu" else 0,
                    step_ms=1e3 * stats["median"], step_ms_q1=1e3 * stats["q1"], step_ms_q3=1e3 * stats["q3"],
                    rel_iqr=stats["rel_iqr"], repeats=len(samples[name]), steps_per_s=1 / stats["median"],
                    peak_mib=peak / 2**20, memory_method=method,
                    time_vs_baseline=(stats["median"] / spread(samples[BASELINE])["median"]) if ratio else math.nan,
                    time_vs_baseline_paired=ratio["median"] if ratio else math.nan,
                    time_vs_baseline_q1=ratio["q1"] if ratio else math.nan,
                    time_vs_baseline_q3=ratio["q3"] if ratio else math.nan,
                    memory_vs_baseline=(peak / peaks[BASELINE][0]) if BASELINE in peaks and peaks[BASELINE][0]
                    else math.nan,
                ))
    finally:
        torch.set_num_threads(before)
    return rows


def _depth_text(model) -> str:
    """Steps per scale, e.g. ``"8/8"`` (ConvFlow takes one depth per scale, the baseline one for all)."""
    depth, scales = model.arguments["depth"], model.arguments["scales"]
    return "/".join(map(str, depth if isinstance(depth, (list, tuple)) else [depth] * scales))


def _fmt(value, digits: int = 3) -> str:
    if value is None or value == "" or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}g}" if isinstance(value, float) else str(value)


def _ratio(value) -> str:
    return "-" if isinstance(value, float) and math.isnan(value) else f"{value:.2f}"


def format_training_table(rows: Sequence[dict]) -> str:
    """The rows side by side: step time (median, quartiles), steps/s, peak memory and the ratios to the baseline."""
    head = ["model", "params", "depth", "hidden", "threads", "step ms", "IQR ms", "steps/s", "peak MiB",
            "time / glow", "per round (IQR)", "memory / glow"]
    body = []
    for r in rows:
        paired = "-" if math.isnan(r["time_vs_baseline_paired"]) else (
            f"{r['time_vs_baseline_paired']:.2f} ({r['time_vs_baseline_q1']:.2f}-{r['time_vs_baseline_q3']:.2f})")
        body.append([LABELS.get(r["model"], r["model"]), str(r["parameters"]), r["depth"], _fmt(r["hidden"] or ""),
                     str(r["threads"]) if r["device"] == "cpu" else r["device"], f"{r['step_ms']:.1f}",
                     f"{r['step_ms_q1']:.1f}-{r['step_ms_q3']:.1f}", f"{r['steps_per_s']:.1f}",
                     _fmt(r["peak_mib"]), _ratio(r["time_vs_baseline"]), paired, _ratio(r["memory_vs_baseline"])])
    widths = [max(len(line[i]) for line in [head] + body) for i in range(len(head))]
    lines = ["  ".join(cell.rjust(width) for cell, width in zip(line, widths)) for line in [head] + body]
    methods = sorted({r["memory_method"] for r in rows if r["memory_method"]})
    legend = (f"one step = forward + backward of the mean NLL, batch {rows[0]['batch'] if rows else '?'}, "
              f"image {rows[0]['image'] if rows else '?'}; median over interleaved rounds; "
              "time / glow = ratio of the medians; per round = median (quartiles) of the per-round ratios; "
              f"peak MiB = tensor memory held beyond the step's start ({', '.join(methods) or 'not measured'})")
    return "\n".join(lines + [legend])
