"""Tiny models with distinct dims (D=12, F=20, N=4, K=2, H=6, V=37) and random weights."""

import functools

import jax
import numpy as np
from flax import nnx

from research.model import Decoder, ModelConfig

LLAMA = ModelConfig(
    vocab_size=37,
    d_model=12,
    num_layers=2,
    num_heads=4,
    num_kv_heads=2,
    head_dim=6,
    mlp_dim=20,
    max_seq_len=32,
    positions="rope",
    rope_theta=100.0,
    norm="rmsnorm",
    mlp_activation="swiglu",
    tie_embeddings=False,
)
GPT2 = LLAMA.replace(
    num_kv_heads=4,
    head_dim=3,
    positions="learned",
    norm="layernorm",
    mlp_activation="gelu",
    use_bias=True,
    tie_embeddings=True,
)
FAMILIES = {"llama": LLAMA, "gpt2": GPT2}


def random_split(config: ModelConfig, seed: int = 0, scale: float = 0.5):
    """(graphdef, params) of a Decoder with N(0, scale^2) parameters (peaky, distinct logits).

    Built with eval_shape and NumPy noise: no initializer compiles.
    """
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.normal(0.0, scale, x.shape).astype(np.float32), params)
    return graphdef, jax.tree.map(jax.numpy.asarray, params)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens_bt):
    return nnx.merge(graphdef, params)(tokens_bt)


def full_logits(graphdef, params, tokens_bt):
    """The Decoder's own forward over [B, T] tokens: [B, T, V] float32, as NumPy.

    Padded on the right to a multiple of 16 (causal: earlier logits are unchanged), so
    tests compile once for many lengths.
    """
    tokens_bt = np.asarray(tokens_bt)
    t = tokens_bt.shape[1]
    padded = np.pad(tokens_bt, ((0, 0), (0, -t % 16)))
    return np.asarray(_forward(graphdef, params, padded))[:, :t]
