r"""Self-describing checkpoints: what a file holds, how it is checked, and :func:`load`.

A checkpoint is a ``torch.save`` file of plain data (tensors, dicts, lists, str, numbers), read with
``torch.load(..., weights_only=True)``: loading never unpickles code, so a file carrying a pickled
payload is refused, not run. Its fields (format ``"iconv.checkpoint"``, :data:`VERSION` 2):

* ``model``: ``{"class": name in iconv.models.MODELS, "arguments": the constructor arguments}``
  (``model.arguments``), and ``state_dict``, the weights: ``MODELS[class](**arguments)`` rebuilds
  the model, which is all :func:`load` needs;
* ``experiment``: the :class:`iconv.configs.Experiment` as a dict, when the run came from one;
* ``run``: the definition of the run that a resume must match (model class and arguments, the
  data set, split and a digest of the training images, the seed, the training settings that
  fix the trajectory; see :func:`iconv.train.fit`);
* ``data`` (data set name and split), ``seed``, ``step`` (optimiser steps taken);
* ``training``: what resuming needs (optimiser, scheduler and RNG states, the history, the
  elapsed time, the trainer's ``TrainConfig``), or None for a file holding only a model;
* ``digest``: ``"sha256:<hex>"`` of everything else, tensors byte by byte (dtype, shape, bytes)
  and metadata, in a fixed order. A flipped bit anywhere is detected.

Every problem with a file raises :class:`CheckpointError`, whose one-line message names the file:
missing, truncated, not a torch file, a pickled payload, another format, a digest mismatch, an
unknown model class, weights that do not fit the recorded architecture.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import zipfile
from pathlib import Path

import torch
from torch import nn

from .files import atomic_write

__all__ = ["FORMAT", "VERSION", "CheckpointError", "build_model", "digest", "load", "model_record",
           "read_checkpoint", "write_checkpoint"]

FORMAT = "iconv.checkpoint"
VERSION = 2


class CheckpointError(ValueError):
    """A file is not a valid, intact iconv checkpoint (the message names the file and the reason)."""


# ----------------------------------------------------------------------------- the digest


def _feed(h, value, path: str) -> None:
    """Hash ``value`` with its structure: type tags, sorted dict keys, tensor dtype/shape/bytes."""
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        h.update(f"T{path}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    elif isinstance(value, dict):
        h.update(f"D{path}|{len(value)}|".encode())
        for key in sorted(value, key=repr):
            _feed(h, value[key], f"{path}/{key!r}")
    elif isinstance(value, (list, tuple)):
        h.update(f"{'L' if isinstance(value, list) else 'U'}{path}|{len(value)}|".encode())
        for i, item in enumerate(value):
            _feed(h, item, f"{path}/{i}")
    else:
        h.update(f"S{path}|{type(value).__name__}|{value!r}|".encode())


def digest(state: dict) -> str:
    """``"sha256:<hex>"`` of every field of ``state`` but ``digest`` (see the module docstring)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in state.items() if k != "digest"}, "")
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------- writing


def model_record(model: nn.Module) -> dict:
    """``{"class", "arguments"}`` of ``model``: its class name and ``model.arguments`` (None if it has none)."""
    arguments = getattr(model, "arguments", None)
    return {"class": type(model).__name__, "arguments": None if arguments is None else dict(arguments)}


def write_checkpoint(path: str | os.PathLike, model: nn.Module, *, step: int | None = None, run: dict | None = None,
                     experiment: dict | None = None, data: dict | None = None, seed: int | None = None,
                     training: dict | None = None, extra: dict | None = None) -> dict:
    """Write a checkpoint of ``model`` (and the given fields) to ``path`` atomically; returns the state.

    ``extra`` adds fields of plain data (e.g. ``{"metrics": ...}``).
    """
    state = {
        "format": FORMAT, "version": VERSION, "model": model_record(model),
        "state_dict": {k: v.detach().cpu() for k, v in model.state_dict().items()},
        "experiment": experiment, "run": run, "data": data, "seed": seed, "step": step, "training": training,
        **(extra or {}),
    }
    state["digest"] = digest(state)
    atomic_write(path, lambda f: torch.save(state, f))
    return state


# ----------------------------------------------------------------------------- reading


def _first_line(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    return f"{type(err).__name__}: {text[0] if text else ''}".rstrip(": ")


def read_checkpoint(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read and check a checkpoint: format, version and digest. Raises :class:`CheckpointError`
    (or :class:`FileNotFoundError`) with a one-line message naming ``path``."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"checkpoint {path} does not exist")
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} is not a regular file")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as err:
        raise CheckpointError(f"{path} holds objects other than tensors and plain data, refused without "
                              f"running them (weights_only load: {_first_line(err)[:200]})") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, OSError, KeyError, TypeError,
            AttributeError, IndexError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{path} is not a readable checkpoint (truncated or not a torch file: "
                              f"{_first_line(err)[:200]})") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        old = isinstance(state, dict) and (state.get("format") == 1 or "architecture" in state)
        hint = ("; it was written by an older iconv: rewrite it with tools/make_flow_results.py --convert"
                if old else "")
        raise CheckpointError(f"{path} is not an iconv checkpoint (no format {FORMAT!r}){hint}")
    if state.get("version") != VERSION:
        raise CheckpointError(f"{path} has checkpoint version {state.get('version')!r}; this iconv reads "
                              f"version {VERSION}")
    recorded = state.get("digest")
    if not isinstance(recorded, str) or recorded != digest(state):
        raise CheckpointError(f"{path} is corrupted: its contents do not match the recorded sha256 digest")
    return state


def build_model(record: dict, source="the checkpoint") -> nn.Module:
    """``MODELS[record["class"]](**record["arguments"])``: the untrained model a record describes."""
    from ..models import MODELS

    name, arguments = record.get("class"), record.get("arguments")
    if name not in MODELS:
        raise CheckpointError(f"{source} holds a model of class {name!r}, which iconv.load cannot build "
                              f"(known: {', '.join(MODELS)})")
    if not isinstance(arguments, dict):
        raise CheckpointError(f"{source} does not record the constructor arguments of its {name}")
    arguments = dict(arguments)
    if "shape" in arguments:
        arguments["shape"] = tuple(arguments["shape"])
    try:
        return MODELS[name](**arguments)
    except (TypeError, ValueError) as err:
        raise CheckpointError(f"{source}: cannot build {name} from its recorded arguments ({err})") from None


def load(path: str | os.PathLike, map_location="cpu") -> nn.Module:
    """The trained model of a checkpoint (written by :func:`iconv.train.fit`, the command line or
    the book's scripts), built from its recorded class and arguments, in the dtype of its saved
    weights, in evaluation mode.

    ``map_location`` as in ``torch.load`` (the model's device). Loading never runs code from the
    file (``weights_only=True``) and checks the digest; every problem raises
    :class:`CheckpointError` naming the file.
    """
    state = read_checkpoint(path, map_location=map_location)
    model = build_model(state["model"], source=str(path))
    floating = [t.dtype for t in state["state_dict"].values() if t.is_floating_point()]
    if floating:
        model.to(floating[0])  # the dtype the weights were saved in (float32, or float64 ...)
    try:
        model.load_state_dict(state["state_dict"])
    except RuntimeError as err:
        raise CheckpointError(f"{path}: the weights do not fit the recorded {state['model']['class']} "
                              f"({_first_line(err)[:200]})") from None
    device = map_location if isinstance(map_location, (str, torch.device)) else None
    if device is not None:
        model.to(device)
    return model.eval()
