"""Pretrained weights from a Cirrus run, a Hugging Face directory or a GGUF file.

    pretrained = load_pretrained("path/to/model.gguf")   # or an HF dir, or a Cirrus workdir
    save_as_run("runs/smollm2", pretrained)             # a params-only checkpoint + tokenizer/
    train(pretrained.model_config, ..., init_params=pretrained.params)

`save_as_run` writes what `load_model(workdir)` reads: an Orbax step 0 holding only the
`params` and `meta` items (no optimizer or data state, so it is a starting point for
`launch.train --init_from`, not a run to resume), `tokenizer/` and a `config.gin` with the
model's `model.*` bindings.
"""

import dataclasses
import hashlib
import json
import os
import tempfile
from collections.abc import Callable
from typing import Any

from etils import epath

from research import storage
from research.checkpoint import hf
from research.checkpoint.manager import CheckpointConfig, Checkpointer, dumps_config
from research.data import Tokenizer
from research.errors import UserError
from research.model import ModelConfig

_TOKENIZER_CONFIG = "tokenizer_config.json"


@dataclasses.dataclass
class Pretrained:
    model_config: ModelConfig
    params: Any  # nnx.State of the parameters (float32; numpy for imports).
    source: dict  # {"format": "hf" | "gguf" | "cirrus", "path": ..., "family": ...}
    tokenizer: Tokenizer | None
    tokenizer_dir: str | None = None  # Local HF tokenizer files to copy as they are.
    tokenizer_extra: dict = dataclasses.field(default_factory=dict)  # -> tokenizer_config.json
    hf_config: dict | None = None

    def save_tokenizer(self, directory) -> bool:
        """Writes the Hugging Face tokenizer files to `directory` (local, gs://, s3://);
        False when the source has no tokenizer."""
        if self.tokenizer is None:
            return False
        with tempfile.TemporaryDirectory() as local:
            if self.tokenizer_dir:
                hf.copy_tokenizer_files(self.tokenizer_dir, local)
            else:
                self.tokenizer.save(local, model_max_length=self.model_config.max_seq_len)
            if self.tokenizer_extra:
                path = os.path.join(local, _TOKENIZER_CONFIG)
                with open(path, encoding="utf-8") as f:
                    config = json.load(f)
                with open(path, "w", encoding="utf-8") as f:
                    json.dump({**config, **self.tokenizer_extra}, f, indent=2)
            storage.upload_dir(local, directory)
        return True

    def local_tokenizer_dir(self, cache_root: str) -> str | None:
        """A local directory that `Tokenizer.load` reads (data.tokenizer_path), written under
        `cache_root` when the source has no such directory (GGUF); None without a tokenizer."""
        if self.tokenizer is None:
            return None
        if self.tokenizer_dir:
            return self.tokenizer_dir
        path = os.path.abspath(self.source["path"])
        stat = os.stat(path)
        key = hashlib.sha256(f"{path}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
        directory = os.path.join(os.path.expanduser(cache_root), "tokenizers", key[:16])
        if not os.path.isfile(os.path.join(directory, "tokenizer.json")):
            self.save_tokenizer(directory)
        return directory


def load_pretrained(source: str, *, log: Callable[[str], None] = print) -> Pretrained:
    """Loads a `.gguf` file, a Hugging Face directory (config.json) or a Cirrus workdir (ckpt/)."""
    if source.endswith(".gguf"):
        return _from_gguf(source, log)
    path = epath.Path(source)
    if not storage.is_remote(source) and (path / "config.json").exists():
        return _from_hf(source, log)
    if (path / "ckpt").exists():
        return _from_run(source, log)
    raise UserError(
        f"{source!r} is neither a .gguf file, a Hugging Face model directory (with config.json "
        "and *.safetensors) nor a Cirrus workdir (with ckpt/)."
    )


def _from_hf(directory: str, log) -> Pretrained:
    model_config, params, family, hf_config = hf.load_hf(directory)
    has_tokenizer = any(
        os.path.isfile(os.path.join(directory, name))
        for name in ("tokenizer.json", "tokenizer.model")
    )
    tokenizer = Tokenizer.load(directory) if has_tokenizer else None
    if tokenizer is None:
        log(f"warning: {directory} has no tokenizer.json or tokenizer.model; no tokenizer.")
    return Pretrained(
        model_config=model_config,
        params=params,
        source={"format": "hf", "path": os.path.abspath(directory), "family": family},
        tokenizer=tokenizer,
        tokenizer_dir=directory if tokenizer is not None else None,
        hf_config=hf_config,
    )


def _from_gguf(path: str, log) -> Pretrained:
    from research.checkpoint.gguf import load_gguf

    model_config, params, family, hf_config, tokenizer, extra = load_gguf(path, log)
    return Pretrained(
        model_config=model_config,
        params=params,
        source={"format": "gguf", "path": os.path.abspath(path), "family": family},
        tokenizer=tokenizer,
        tokenizer_extra=extra,
        hf_config=hf_config,
    )


def _from_run(workdir: str, log) -> Pretrained:
    from research.checkpoint.load import load_model, merge_lora

    loaded = merge_lora(load_model(workdir, log=log), log=log)
    tokenizer_dir = epath.Path(workdir) / "tokenizer"
    local = storage.local_copy(tokenizer_dir) if loaded.tokenizer is not None else None
    meta_source = read_source(workdir, loaded.step)
    return Pretrained(
        model_config=loaded.model_config,
        params=loaded.params,
        source={
            "format": "cirrus",
            "path": workdir,
            "step": loaded.step,
            "family": meta_source.get("family"),
        },
        tokenizer=loaded.tokenizer,
        tokenizer_dir=local,
    )


def read_source(workdir: str, step: int) -> dict:
    """The `source` entry of a step's metadata ({} for a trained, not imported, model)."""
    checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=False))
    try:
        return checkpointer.read_meta(step).get("source") or {}
    finally:
        checkpointer.close()


def save_as_run(workdir: str, pretrained: Pretrained, *, log: Callable[[str], None] = print):
    """Writes `pretrained` as a Cirrus workdir that `load_model` and `--init_from` read."""
    checkpointer = Checkpointer(workdir, CheckpointConfig(async_save=False))
    try:
        if checkpointer.all_steps():
            raise UserError(
                f"{checkpointer.directory} already holds checkpoints (steps "
                f"{checkpointer.all_steps()}); give an empty --workdir for the imported model."
            )
        meta = {
            "model_config": dumps_config(pretrained.model_config),
            "source": pretrained.source,
            "hf_config": pretrained.hf_config,
        }
        params = pretrained.params
        if isinstance(params, dict):  # A pure dict (e.g. quantized NumPy arrays): as a State,
            from flax import nnx  # the tree every restore expects.

            from research.train.state import abstract_model

            _, params = abstract_model(pretrained.model_config)
            nnx.replace_by_pure_dict(params, pretrained.params)
        checkpointer.save_params(0, params, meta)
        checkpointer.wait()
    finally:
        checkpointer.close()
    workdir_path = epath.Path(workdir)
    if pretrained.save_tokenizer(workdir_path / "tokenizer"):
        log(f"tokenizer    {workdir_path / 'tokenizer'} (vocab {pretrained.tokenizer.vocab_size})")
    else:
        log("tokenizer    none (the source has none); fine-tune with data.tokenizer_path set")
    lines = [f"# Imported from {pretrained.source['path']} by launch.convert: the model's shape."]
    for field in dataclasses.fields(ModelConfig):
        lines.append(f"model.{field.name} = {getattr(pretrained.model_config, field.name)!r}")
    (workdir_path / "config.gin").write_text("\n".join(lines) + "\n")
