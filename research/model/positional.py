"""Positions: rotary embeddings (RoPE, Su et al. 2021) and learned absolute embeddings."""

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.parameter import param


@dataclasses.dataclass(frozen=True)
class RopeScaling:
    """Llama 3.1's RoPE frequency scaling (HF rope_type "llama3").

    Frequencies whose wavelength exceeds original_max_len / low_freq_factor are divided by
    `factor`; those below original_max_len / high_freq_factor are kept; in between, a linear
    interpolation of the two (Meta's `apply_scaling` in the Llama 3.1 reference code).
    """

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_len: int


def rope_inverse_frequency(
    head_dim: int, theta: float, scaling: RopeScaling | None = None
) -> jax.Array:
    """[H/2] float32: theta^(-2i/H), then `scaling` if given."""
    half = head_dim // 2
    inverse_frequency_h = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
    if scaling is None:
        return inverse_frequency_h
    wavelength_h = 2 * math.pi / inverse_frequency_h
    smooth_h = (scaling.original_max_len / wavelength_h - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    interpolated_h = (1 - smooth_h) * inverse_frequency_h / scaling.factor
    interpolated_h = interpolated_h + smooth_h * inverse_frequency_h
    long_h = wavelength_h > scaling.original_max_len / scaling.low_freq_factor
    short_h = wavelength_h < scaling.original_max_len / scaling.high_freq_factor
    return jnp.where(
        long_h,
        inverse_frequency_h / scaling.factor,
        jnp.where(short_h, inverse_frequency_h, interpolated_h),
    )


def apply_rope(
    x_btnh: jax.Array,
    positions_bt: jax.Array,
    *,
    theta: float,
    scaling: RopeScaling | None = None,
) -> jax.Array:
    """Rotates pairs (x[i], x[i + H/2]) by angle position * theta^(-2i/H).

    This is the "rotate_half" layout of HF Llama (not the interleaved pairs of the paper), so
    HF q/k weights load without a permutation.

    Args:
      x_btnh: [B, T, N, H] queries or keys (N may be K), any float dtype; H even.
      positions_bt: [B, T] integer positions.
      theta: the RoPE base (10_000 in Llama 2, 500_000 in Llama 3).
      scaling: Llama 3.1 frequency scaling, or None.

    Returns:
      [B, T, N, H], the dtype of x (angles and rotation in float32).
    """
    half = x_btnh.shape[-1] // 2
    inverse_frequency_h = rope_inverse_frequency(x_btnh.shape[-1], theta, scaling)
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
        return jnp.take(self.embedding[...], positions_bt, axis=0, mode="clip").astype(self.dtype)

    def prefix(self, seq_len: int) -> jax.Array:
        """Positions 0..T-1 as a slice, [1, T, D] compute dtype (no gather; default positions)."""
        return self.embedding[:seq_len].astype(self.dtype)[None]
