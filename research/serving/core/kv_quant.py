"""int8 keys and values for the KV cache: quantize on write, read inside the attention.

One float32 scale per (slot, kv head, position): symmetric absmax over the head dimension,
x ~= q * scale with q = round(x / scale) in [-127, 127] and scale = max |x| / 127. Per
position, so a position's scale is fixed when it is written and nothing is ever rescaled
(per-channel key scales, as KIVI, Liu et al. 2024, would change as positions arrive; int8
leaves enough levels that the per-position grid meets the quality target, see
bench/RESULTS.md). Scales are stored as
[B, K, S, 1] next to the [B, K, S, H] int8 cache, so every cache copy (segments, prefix
blocks) handles them as a cache of head dimension 1.

The attention never builds a float copy of the cache. Scales are applied outside the
int8 -> float products, where they cost a [B, K, S] multiply:
  logits[s] = (q . k_int8[s]) * k_scale[s]
  y = sum_s (p[s] * v_scale[s]) * v_int8[s]
Decode computes both products as one fused multiply-and-reduce per segment (XLA:CPU fuses
the int8 -> float convert into the reduction; a dot would first convert the whole segment
into a float buffer). Prompt attention converts one key block at a time (the loop reads a
block anyway) and uses dots.
"""

import jax
import jax.numpy as jnp

# `Sampler(kv_dtype=...)` / `serve.kv_cache_dtype`: "auto" keeps the model's compute dtype.
KV_DTYPES = ("auto", "int8")
_LEVELS = 127  # Symmetric: -127..127, so q and -q are both representable.


def quantize(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """[..., H] float -> ([..., H] int8, [..., 1] float32 scale): x ~= q * scale.

    An all-zero vector gets scale 0 (and q 0), so it dequantizes to exact zeros.
    """
    x = x.astype(jnp.float32)
    scale = jnp.max(jnp.abs(x), axis=-1, keepdims=True) / _LEVELS
    inverse = jnp.where(scale > 0, 1.0 / jnp.where(scale > 0, scale, 1.0), 0.0)
    q = jnp.clip(jnp.round(x * inverse), -_LEVELS, _LEVELS).astype(jnp.int8)
    return q, scale


def dequantize(q: jax.Array, scale: jax.Array, dtype=jnp.float32) -> jax.Array:
    """[..., H] int8 and [..., 1] scale -> [..., H] in `dtype`."""
    return (q.astype(jnp.float32) * scale).astype(dtype)


def logits(q_bkgh: jax.Array, k_bksh: jax.Array, scale_bks1: jax.Array) -> jax.Array:
    """q . k of every query head against an int8 key segment: [B, K, G, S] float32.

    Args:
      q_bkgh: [B, K, G, H] queries (already scaled by 1/sqrt(H)), compute dtype.
      k_bksh: [B, K, S, H] int8 keys.
      scale_bks1: [B, K, S, 1] float32 key scales.
    """
    f32 = jnp.float32
    dots_bkgs = jnp.sum(q_bkgh[:, :, :, None, :].astype(f32) * k_bksh[:, :, None].astype(f32), -1)
    return dots_bkgs * scale_bks1[:, :, None, :, 0]


def weighted_values(p_bkgs: jax.Array, v_bksh: jax.Array, scale_bks1: jax.Array) -> jax.Array:
    """sum_s p[s] * v[s] over an int8 value segment: [B, K, G, H] float32.

    Args:
      p_bkgs: [B, K, G, S] float32 attention probabilities of the segment's positions.
      v_bksh: [B, K, S, H] int8 values.
      scale_bks1: [B, K, S, 1] float32 value scales (folded into p).
    """
    f32 = jnp.float32
    w_bkgs = p_bkgs.astype(f32) * scale_bks1[:, :, None, :, 0]
    return jnp.sum(w_bkgs[..., None] * v_bksh[:, :, None].astype(f32), axis=3)
