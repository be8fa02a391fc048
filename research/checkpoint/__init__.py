"""Checkpoints: Orbax save/restore of training runs (local, gs://, s3://), and model
interchange: Hugging Face safetensors import/export (hf.py), GGUF import (gguf.py), and
pretrained weights from any of them or a Cirrus run (pretrained.py), and `load`, the one
loader of a model for inference from any of them (load.py)."""

from research.checkpoint.hf import load_hf, save_hf
from research.checkpoint.load import LoadedModel, load, load_model, param_shardings
from research.checkpoint.manager import (
    CheckpointConfig,
    Checkpointer,
    abstract_with_shardings,
    checkpoint_dir,
    move_aside,
    restore_latest_usable,
)
from research.checkpoint.pretrained import Pretrained, load_pretrained, save_as_run

__all__ = [
    "CheckpointConfig",
    "Checkpointer",
    "LoadedModel",
    "Pretrained",
    "load",
    "load_hf",
    "load_model",
    "load_pretrained",
    "move_aside",
    "param_shardings",
    "abstract_with_shardings",
    "checkpoint_dir",
    "restore_latest_usable",
    "save_as_run",
    "save_hf",
]
