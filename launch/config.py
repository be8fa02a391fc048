"""Gin for every entry point: the configurables users bind, parsing with clear errors.

research/ never imports gin; this is the only place the library's dataclasses are exposed:
`model.*` (ModelConfig), `data.*` (DataConfig), `train.*` (TrainConfig),
`checkpoint.*` (CheckpointConfig), `eval.*` (EvalConfig), `serve.*` (EngineConfig),
`compress.*` (CompressConfig), `dpo.*` (DPOConfig), `apps.*` (AppConfig) and `energy.*`
(EnergyConfig, launch.plan).
"""

import os

import gin

from research.checkpoint import CheckpointConfig
from research.compression.config import CompressConfig
from research.data import DataConfig
from research.energy import EnergyConfig
from research.errors import UserError
from research.evaluation import AppConfig, EvalConfig
from research.finetune import DPOConfig
from research.model import ModelConfig
from research.serving.engine import EngineConfig
from research.train import TrainConfig

# The gin-wrapped constructors: calling one applies the bindings (the plain class does not).
_CONFIGURABLES = {
    ModelConfig: gin.external_configurable(ModelConfig, "model"),
    DataConfig: gin.external_configurable(DataConfig, "data"),
    TrainConfig: gin.external_configurable(TrainConfig, "train"),
    CheckpointConfig: gin.external_configurable(CheckpointConfig, "checkpoint"),
    EvalConfig: gin.external_configurable(EvalConfig, "eval"),
    EngineConfig: gin.external_configurable(EngineConfig, "serve"),
    CompressConfig: gin.external_configurable(CompressConfig, "compress"),
    DPOConfig: gin.external_configurable(DPOConfig, "dpo"),
    AppConfig: gin.external_configurable(AppConfig, "apps"),
    EnergyConfig: gin.external_configurable(EnergyConfig, "energy"),
}

# Repository root: gin files are found relative to it (and to the working directory).
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
gin.add_config_file_search_path(ROOT)


def parse(gin_files=(), gin_bindings=()) -> None:
    """Parses gin files then bindings; a typo or bad value becomes a UserError."""
    gin.clear_config()
    for path in gin_files:
        if not os.path.exists(path) and not os.path.exists(os.path.join(ROOT, path)):
            raise UserError(
                f"--gin_file={path} does not exist; configs live under {ROOT}/configs "
                f"(e.g. configs/experiment/demo.gin)."
            )
    try:
        gin.parse_config_files_and_bindings(list(gin_files), list(gin_bindings))
    except (ValueError, SyntaxError, KeyError, TypeError) as error:
        raise UserError(
            f"bad gin configuration: {error}\nConfigurables are `model.*`, `data.*`, "
            f"`train.*`, `checkpoint.*`, `eval.*`, `serve.*`, `compress.*`, `dpo.*`, "
            f"`apps.*` and `energy.*`; check the name and value of the binding above (see "
            "configs/base.gin for every field)."
        ) from None


def build(cls):
    """Constructs a gin-bound config, turning a value rejected by its checks into UserError."""
    try:
        return _CONFIGURABLES[cls]()
    except UserError:
        raise
    except (ValueError, TypeError) as error:
        raise UserError(f"bad gin configuration: {error}") from None


def operative_config() -> str:
    return gin.operative_config_str()
