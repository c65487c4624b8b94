"""Helpers for data-parallel training under ``torchrun`` (PyTorch DistributedDataParallel).

``torchrun --nproc_per_node=K script.py`` starts K processes and gives each the environment
variables ``RANK``, ``LOCAL_RANK`` and ``WORLD_SIZE`` (and ``MASTER_ADDR``/``MASTER_PORT``).
:func:`setup` reads them and joins the process group: NCCL when the device is a GPU, gloo on the
CPU. Without ``torchrun`` (``WORLD_SIZE`` unset or 1) every helper degrades to the single-process
answer, so the same script runs either way.
"""
from __future__ import annotations

import os

import torch
import torch.distributed as dist

__all__ = [
    "cleanup", "is_distributed", "is_main_process", "launched_by_torchrun", "local_rank", "rank",
    "resolve_device", "setup", "world_size",
]


def launched_by_torchrun() -> bool:
    """True when the environment asks for more than one process (``WORLD_SIZE`` > 1)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def is_distributed() -> bool:
    """True when a process group with more than one member is up."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process's global rank (0 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank()
    return int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    """This process's rank on its node (selects its GPU)."""
    return int(os.environ.get("LOCAL_RANK", "0"))


def world_size() -> int:
    """The number of processes (1 without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return int(os.environ.get("WORLD_SIZE", "1"))


def is_main_process() -> bool:
    """Rank 0: the one process that prints, evaluates and writes checkpoints."""
    return rank() == 0


def resolve_device(device: str | torch.device = "auto") -> torch.device:
    """``"auto"`` -> ``cuda:LOCAL_RANK`` when CUDA is available, else ``cpu``; other values as given."""
    if isinstance(device, torch.device):
        return device
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda", local_rank() % torch.cuda.device_count())
        return torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} requested but CUDA is not available; use device='cpu' or 'auto'")
    if dev.type == "cuda" and dev.index is None and launched_by_torchrun():
        dev = torch.device("cuda", local_rank() % torch.cuda.device_count())
    return dev


def setup(device: torch.device) -> bool:
    """Join the process group if ``torchrun`` launched us; returns whether training is distributed.

    Backend: ``nccl`` for CUDA devices, ``gloo`` for the CPU. Does nothing if the group is already
    initialised (e.g. by the caller) or if ``WORLD_SIZE`` is 1.
    """
    if not launched_by_torchrun():
        return is_distributed()
    if not dist.is_available():
        raise RuntimeError("WORLD_SIZE > 1 but this PyTorch build has no torch.distributed")
    if not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return is_distributed()


def cleanup() -> None:
    """Leave the process group (call once at the end of a ``torchrun`` script)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
