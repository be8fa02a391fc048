"""Positions: rotary embeddings (RoPE, Su et al. 2021) and learned absolute embeddings."""

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.parameter import param


def apply_rope(x_btnh: jax.Array, positions_bt: jax.Array, *, theta: float) -> jax.Array:
    """Rotates pairs (x[i], x[i + H/2]) by angle position * theta^(-2i/H).

    This is the "rotate_half" layout of HF Llama (not the interleaved pairs of the paper), so
    HF q/k weights load without a permutation.

    Args:
      x_btnh: [B, T, N, H] queries or keys (N may be K), any float dtype; H even.
      positions_bt: [B, T] integer positions.
      theta: the RoPE base (10_000 in Llama 2, 500_000 in Llama 3).

    Returns:
      [B, T, N, H], the dtype of x (angles and rotation in float32).
    """
    half = x_btnh.shape[-1] // 2
    inverse_frequency_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    angle_bth = positions_bt.astype(jnp.float32)[:, :, None] * inverse_frequency_h
    cos_bt1h = jnp.cos(angle_bth)[:, :, None, :]
    sin_bt1h = jnp.sin(angle_bth)[:, :, None, :]
    x = x_btnh.astype(jnp.float32)
    x1, x2 = x[..., :half], x[..., half:]
    rotated = jnp.concatenate(
        [x1 * cos_bt1h - x2 * sin_bt1h, x2 * cos_bt1h + x1 * sin_bt1h], axis=-1
    )
    return rotated.astype(x_btnh.dtype)


class LearnedPositions(nnx.Module):
    """A learned table of absolute position embeddings (GPT-2).

    Args:
      max_seq_len: number of positions L; `embedding` is float32 [L, D], logical (None, "embed").
      dim: D.
      init: initializer of the table.
      dtype: compute dtype of the output.
    """

    def __init__(
        self,
        max_seq_len: int,
        dim: int,
        *,
        init: nnx.Initializer,
        dtype=jnp.float32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.embedding = param(init, (max_seq_len, dim), (None, "embed"), rngs=rngs)

    def __call__(self, positions_bt: jax.Array) -> jax.Array:
        """positions: [B, T] int in [0, L) -> [B, T, D] compute dtype."""
        table = self.embedding[...].astype(self.dtype)
        return jnp.take(table, positions_bt, axis=0, mode="clip")

    def prefix(self, seq_len: int) -> jax.Array:
        """Positions 0..T-1 as a slice, [1, T, D] compute dtype (no gather; default positions)."""
        return self.embedding[:seq_len].astype(self.dtype)[None]
