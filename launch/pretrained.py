"""--init_from for every training entry point (launch.train, launch.dpo): pretrained weights
whose shape and tokenizer are bound into gin before the configs are built."""

import dataclasses
import os
from collections.abc import Callable

import gin

from launch import config as gin_config
from research.checkpoint import load_pretrained
from research.checkpoint.pretrained import Pretrained
from research.data import DataConfig
from research.errors import UserError
from research.model import ModelConfig

# Set by the run's gin config even under --init_from: how to compute and what to train
# (LoRA adapters), not what the pretrained model is.
RUN_MODEL_FIELDS = ("dtype", "remat", "lora_rank", "lora_alpha", "lora_dropout", "lora_targets")


def bound(name: str, default):
    """A gin binding's value, or default when the configs leave it unset."""
    try:
        return gin.query_parameter(name)
    except ValueError:
        return default


def bind_pretrained(source: str, *, log: Callable[[str], None] = print) -> Pretrained:
    """Loads pretrained weights and binds their shape (model.*) and tokenizer
    (data.tokenizer_path) into gin before the configs are built; returns them (a quantized
    model's weights dequantized unless LoRA trains over them)."""
    pretrained = load_pretrained(source, log=log)
    lora_rank = bound("model.lora_rank", 0)
    if pretrained.model_config.quant != "none" and lora_rank:
        log(
            f"--init_from: QLoRA: rank-{lora_rank} adapters train over its frozen "
            f"{pretrained.model_config.quant} weights"
        )
    elif pretrained.model_config.quant != "none":  # A launch.compress output: train its floats.
        from research.compression.quantize import dequantize_params

        log(f"--init_from: dequantizing its {pretrained.model_config.quant} weights to float32")
        pretrained.model_config, pretrained.params = dequantize_params(
            pretrained.model_config, pretrained.params
        )
    config = pretrained.model_config
    data_config = gin_config.build(DataConfig)
    with gin.unlock_config():
        for field in dataclasses.fields(ModelConfig):
            if field.name not in RUN_MODEL_FIELDS:
                gin.bind_parameter(f"model.{field.name}", getattr(config, field.name))
        if data_config.tokenizer_path:
            log(
                f"--init_from: keeping data.tokenizer_path={data_config.tokenizer_path!r}; it "
                "must be the tokenizer the pretrained model was trained with."
            )
        else:
            tokenizer_dir = pretrained.local_tokenizer_dir(data_config.cache_root())
            if tokenizer_dir is None:
                raise UserError(
                    f"--init_from={source} has no tokenizer; set data.tokenizer_path to the "
                    "tokenizer the model was trained with."
                )
            gin.bind_parameter("data.tokenizer_path", tokenizer_dir)
    log(
        f"--init_from: {pretrained.source['format']} {source} "
        f"({config.num_layers} layers, d_model {config.d_model}, vocab {config.vocab_size}); "
        "its shape overrides gin's model.* settings"
    )
    return pretrained


def source_meta(pretrained: Pretrained) -> dict:
    """meta["init_from"] of a run started from `pretrained`: its source, with an absolute path
    (an adapter-only LoRA run reads its base from there again)."""
    source = dict(pretrained.source)
    if "://" not in str(source["path"]):
        source["path"] = os.path.abspath(source["path"])
    return {"init_from": source}
