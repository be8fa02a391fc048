"""DataConfig: validation with field-naming UserErrors, the cache key."""

import dataclasses

import pytest

from research.data import DataConfig
from research.errors import UserError


def test_key_is_stable_and_ignores_cache_dir():
    config = DataConfig()
    assert config.key() == DataConfig().key() and len(config.key()) == 16
    assert DataConfig(cache_dir="/elsewhere").key() == config.key()
    for change in (
        {"vocab_size": 4096},
        {"sources": ("a.txt",)},
        {"min_chars": 1},
        {"split_seed": 1},
        {"num_shards": 2},
        {"text_field": "body"},
        {"tokenizer_path": "tok"},
        {"validation_fraction": 0.1},
    ):
        assert dataclasses.replace(config, **change).key() != config.key(), change


def test_cache_root(monkeypatch, tmp_path):
    monkeypatch.setenv("CIRRUS_DATA_DIR", str(tmp_path / "env"))
    assert DataConfig().cache_root() == str(tmp_path / "env")
    assert DataConfig(cache_dir=str(tmp_path / "c")).prepared_dir().startswith(str(tmp_path / "c"))
    monkeypatch.delenv("CIRRUS_DATA_DIR")
    assert DataConfig().cache_root().endswith("/.cache/cirrus/data")


def test_sources_accept_a_string_or_list():
    assert DataConfig(sources="a.txt").sources == ("a.txt",)
    assert DataConfig(sources=["a", "b"]).sources == ("a", "b")


@pytest.mark.parametrize(
    "fields, name",
    [
        ({"vocab_size": 100}, "data.vocab_size"),
        ({"validation_fraction": 1.0}, "data.validation_fraction"),
        ({"test_fraction": -0.1}, "data.test_fraction"),
        ({"validation_fraction": 0.5, "test_fraction": 0.5}, "data.test_fraction"),
        ({"num_shards": 0}, "data.num_shards"),
        ({"min_chars": -1}, "data.min_chars"),
        ({"text_field": ""}, "data.text_field"),
        ({"sources": ("ok", "")}, "data.sources"),
    ],
)
def test_bad_values_are_user_errors_naming_the_field(fields, name):
    with pytest.raises(UserError, match=name):
        DataConfig(**fields)
