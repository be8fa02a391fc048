"""Every configs/model/*.gin parses into a ModelConfig; full sizes checked via shapes only."""

import pathlib

import gin
import pytest

from research.model import ModelConfig, count_params, flops_per_token

CONFIG_DIR = pathlib.Path(__file__).resolve().parents[2] / "configs" / "model"

# launch/config.py registers the same name; registering it again here is harmless.
gin.external_configurable(ModelConfig, "model")


def load(name: str) -> ModelConfig:
    gin.clear_config()
    path = CONFIG_DIR / f"{name}.gin"
    gin.parse_config_file(str(path))
    first_line = path.read_text().splitlines()[0]
    assert first_line.startswith("# ") and "--gin_file=configs/model/" in first_line
    return ModelConfig(**gin.get_bindings("model"))


def test_every_model_gin_file_parses():
    names = sorted(path.stem for path in CONFIG_DIR.glob("*.gin"))
    assert {"tiny", "ref_small", "gpt2_124m", "llama3_8b", "llama3_1b"} <= set(names)
    for name in names:
        assert isinstance(load(name), ModelConfig)


# Published totals, embeddings included.
@pytest.mark.parametrize(
    "name,published",
    [
        ("ref_small", 29.55e6),  # shared/peers/refsmall.py
        ("gpt2_124m", 124.44e6),  # HF gpt2
        ("llama3_8b", 8.03e9),  # Meta-Llama-3-8B
        ("llama3_1b", 1.236e9),  # Llama-3.2-1B
    ],
)
def test_parameter_counts(name, published):
    assert count_params(load(name)) == pytest.approx(published, rel=0.005)


def test_tiny_config():
    config = load("tiny")
    assert (config.d_model, config.num_layers, config.num_heads, config.num_kv_heads) == (
        64,
        2,
        4,
        2,
    )
    assert (config.mlp_dim, config.vocab_size, config.max_seq_len) == (128, 512, 64)
    assert (config.positions, config.norm, config.mlp_activation) == ("rope", "rmsnorm", "swiglu")


def test_ref_small_matches_the_peer_exactly():
    config = load("ref_small")
    assert count_params(config) == 29_545_472  # refsmall.param_counts total
    # refsmall.train_flops_per_token: 6 N + 12 L d T with N excluding position embeddings.
    assert flops_per_token(config, 256) == 189_069_312
