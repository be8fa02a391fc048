"""The C++ decode attention (decode_attention.cc) behind jax.ffi.

`make kernels` builds research/serving/core/_build/libcirrus_attention.so (every make target
that runs Python depends on it). Without it, `available()` is False and decode attention
runs as XLA einsums (`kv_cache.decode_attention`): the same numbers, slower at many rows.
"""

import os

import jax
import jax.numpy as jnp

from research import ffi

HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY = os.path.join(HERE, "_build", "libcirrus_attention.so")
TARGET = "cirrus_decode_attention"


KERNEL = ffi.Kernel(
    LIBRARY,
    {TARGET: "CirrusDecodeAttention"},
    "decode attention runs as XLA einsums (slower with many active slots)",
    "cirrus_attention_isa",
    off_variable="CIRRUS_ATTENTION_KERNEL",
)
available, isa = KERNEL.available, KERNEL.isa


def segment_stats(q_bkgh, keys_cksh, values_cksh, lengths_b):
    """Softmax statistics of one query per row against one float32 cache segment, reading
    keys 0..lengths_b[b]-1 of row b (rows b < B of the C >= B cache rows).

    Args:
      q_bkgh: [B, K, G, H] float32 queries, already scaled by 1 / sqrt(H).
      keys_cksh, values_cksh: [C, K, S, H] float32.
      lengths_b: [B] int32 keys to read per row (clipped to [0, S]).

    Returns:
      (max [B, K, G], sum [B, K, G], acc [B, K, G, H]): the largest logit (-3e38 for a row
      with no keys), sum of exp(logit - max), and that weighting of the values.
    """
    if not available():
        raise RuntimeError(f"{LIBRARY} is missing; build it with `make kernels`.")
    b, k, g, h = q_bkgh.shape
    out = (
        jax.ShapeDtypeStruct((b, k, g), jnp.float32),
        jax.ShapeDtypeStruct((b, k, g), jnp.float32),
        jax.ShapeDtypeStruct((b, k, g, h), jnp.float32),
    )
    call = jax.ffi.ffi_call(TARGET, out)
    return call(q_bkgh, keys_cksh, values_cksh, lengths_b.astype(jnp.int32))


def reference_stats(q_bkgh, keys_cksh, values_cksh, lengths_b):
    """`segment_stats` in plain JAX (the kernel's definition; also its non-CPU path)."""
    b, _, _, _ = q_bkgh.shape
    keys, values = keys_cksh[:b], values_cksh[:b]
    logits_bkgs = jnp.einsum("bkgh,bksh->bkgs", q_bkgh, keys, preferred_element_type=jnp.float32)
    valid_bs = jnp.arange(keys.shape[2])[None, :] < lengths_b[:, None]
    logits_bkgs = jnp.where(valid_bs[:, None, None], logits_bkgs, -jnp.inf)
    max_bkg = jnp.maximum(jnp.max(logits_bkgs, axis=-1), -3e38)
    weights_bkgs = jnp.exp(logits_bkgs - max_bkg[..., None])
    acc_bkgh = jnp.einsum("bkgs,bksh->bkgh", weights_bkgs, values)
    return max_bkg, jnp.sum(weights_bkgs, axis=-1), acc_bkgh
