"""Every gin file in configs/ parses and binds; bad bindings give a clear UserError."""

import glob
import os

import pytest

from launch import config as gin_config
from research.data import DataConfig
from research.errors import UserError
from research.evaluation import AppConfig
from research.finetune import DPOConfig
from research.model import ModelConfig
from research.train import TrainConfig

ROOT = gin_config.ROOT
BASE = os.path.join(ROOT, "configs", "base.gin")
REQUIRED = {"text_files.gin": ["data.sources = ('README.md',)"]}


def _all_gin_files():
    return sorted(glob.glob(os.path.join(ROOT, "configs", "**", "*.gin"), recursive=True))


@pytest.mark.parametrize("path", _all_gin_files(), ids=lambda p: os.path.relpath(p, ROOT))
def test_gin_file_parses_and_binds(path):
    files = [path] if "model" not in path else [BASE, path]
    gin_config.parse(files, REQUIRED.get(os.path.basename(path), []))
    for cls in (ModelConfig, DataConfig, TrainConfig, DPOConfig, AppConfig):
        gin_config.build(cls)
    with open(path) as f:
        assert f.readline().startswith("#"), "first line must be the command that runs it"


def test_bindings_override_files():
    gin_config.parse([BASE], ["train.num_steps = 7", "model.d_model = 64"])
    assert gin_config.build(TrainConfig).num_steps == 7
    assert gin_config.build(ModelConfig).d_model == 64


@pytest.mark.parametrize(
    "binding, fragment",
    [
        ("train.num_stpes = 3", "num_stpes"),
        ("trian.num_steps = 3", "trian"),
        ("model.d_model = ", "gin"),
    ],
)
def test_bad_binding_is_a_user_error(binding, fragment):
    with pytest.raises(UserError, match=fragment):
        gin_config.parse([BASE], [binding])


def test_bad_value_is_a_user_error_naming_the_field():
    gin_config.parse([BASE], ["train.batch_size = 10", "train.micro_batches = 4"])
    with pytest.raises(UserError, match="train.micro_batches"):
        gin_config.build(TrainConfig)
    gin_config.parse([BASE], ["model.num_kv_heads = 3"])
    with pytest.raises(UserError, match="num_kv_heads"):
        gin_config.build(ModelConfig)
    gin_config.parse([BASE], ["dpo.beta = -0.1"])
    with pytest.raises(UserError, match="dpo.beta"):
        gin_config.build(DPOConfig)


def test_missing_gin_file_is_a_user_error():
    with pytest.raises(UserError, match="does not exist"):
        gin_config.parse(["configs/experiment/nope.gin"], [])
