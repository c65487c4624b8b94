"""One trainer for every model in the book, its checkpoints, and the command line ``python -m iconv.train``.

* :mod:`iconv.train.loop`: :func:`fit` (the training loop: schedule, exact resume, divergence
  guard, DDP), :class:`TrainConfig`, :class:`History`, :class:`GlobalBatches`;
* :mod:`iconv.train.checkpoint`: self-describing checkpoints (model class and arguments, the
  experiment, the run's definition, a sha256 digest), loaded safely; :func:`load` (also
  ``iconv.load``) returns the ready model;
* :mod:`iconv.train.files`: atomic writes and the preflight of output locations;
* :mod:`iconv.train.experiment`: :func:`run`, a whole :class:`iconv.configs.Experiment` (data,
  model, :func:`fit`, evaluation, outputs);
* :mod:`iconv.train.cli`: ``python -m iconv.train flow|classify``.
"""
from ..distributed import cleanup as cleanup_distributed
from ..distributed import is_main_process, rank, world_size
from .checkpoint import CheckpointError, build_model as build_checkpoint_model, load, read_checkpoint, write_checkpoint
from .experiment import Result, build_flow, build_model, load_data, run, train_config, write_outputs
from .files import OutputLocationError, atomic_write, atomic_write_json
from .loop import (DEFINING_FIELDS, RESUMABLE_CHANGES, GlobalBatches, History, ResumeError, TrainConfig,
                   TrainingDiverged, fit, load_checkpoint, lr_factor, run_definition, seed_everything, step_seed)
from .cli import main

__all__ = [
    "DEFINING_FIELDS", "RESUMABLE_CHANGES", "CheckpointError", "GlobalBatches", "History", "OutputLocationError",
    "Result", "ResumeError", "TrainConfig", "TrainingDiverged", "atomic_write", "atomic_write_json",
    "build_checkpoint_model", "build_flow", "build_model", "cleanup_distributed", "fit", "is_main_process", "load",
    "load_checkpoint", "load_data", "lr_factor", "main", "rank", "read_checkpoint", "run", "run_definition",
    "seed_everything", "step_seed", "train_config", "world_size", "write_checkpoint", "write_outputs",
]
