"""Shared test helpers: tiny model configs, random parameters, float64 parameter copies."""

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.model import ModelConfig

# Tiny models with distinct dims (D=12, F=20, N=4, K=2, H=6, V=37), so that a swapped axis
# fails: a Llama-style one (RoPE, RMSNorm, SwiGLU, grouped-query attention, untied head) and
# a GPT-2-style one (learned positions, LayerNorm, GELU, biases, K = N, tied head).
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


def randomize(module, seed: int = 0, scale: float = 0.5):
    """Replaces every parameter by N(0, scale^2) noise, in place; returns the module.

    Init values (ones, zeros, std 0.02) would hide swapped or missing terms. NumPy noise needs
    no compilation, and works on an abstract module from `nnx.eval_shape` too.
    """
    rng = np.random.default_rng(seed)
    state = nnx.state(module, nnx.Param)
    leaves, treedef = jax.tree.flatten(state)
    new = [jnp.asarray(rng.normal(0.0, scale, leaf.shape), leaf.dtype) for leaf in leaves]
    nnx.update(module, jax.tree.unflatten(treedef, new))
    return module


def random_model(build, seed: int = 0, scale: float = 0.5):
    """`build()` (a module constructor) with random parameters, without running its init.

    Tests build many small models; eager initializers compile once per shape (seconds).
    """
    return randomize(nnx.eval_shape(build), seed, scale)


def numpy_params(module) -> dict:
    """The module's parameters as a nested dict of float64 NumPy arrays."""
    pure = nnx.state(module, nnx.Param).to_pure_dict()
    return jax.tree.map(lambda a: np.asarray(a, np.float64), pure)


def jitted(model):
    """model(tokens, **kwargs) as one compiled call (much faster than op-by-op in tests)."""
    graphdef, state = nnx.split(model)

    @jax.jit
    def forward(state, tokens, positions_bt, segment_ids_bt):
        module = nnx.merge(graphdef, state)
        return module(tokens, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt)

    return lambda tokens, positions_bt=None, segment_ids_bt=None: forward(
        state, tokens, positions_bt, segment_ids_bt
    )
