"""Checkpoints: Orbax save/restore of training runs (local, gs://, s3://)."""

from research.checkpoint.load import LoadedModel, load_model, param_shardings
from research.checkpoint.manager import (
    CheckpointConfig,
    Checkpointer,
    abstract_with_shardings,
    checkpoint_dir,
    restore_latest_usable,
)

__all__ = [
    "CheckpointConfig",
    "Checkpointer",
    "LoadedModel",
    "load_model",
    "param_shardings",
    "abstract_with_shardings",
    "checkpoint_dir",
    "restore_latest_usable",
]
