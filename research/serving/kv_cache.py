"""A key/value cache per layer and the Decoder's forward pass through it.

The cache of layer l is k, v: [B, K, S, H] in the compute dtype: one row per slot, K kv heads
(grouped-query attention stores the K kv heads, never the N query heads), S cache positions.
Heads come before positions because a decode step's two attention matmuls batch over (B, K):
with [B, S, K, H], XLA:CPU copies every layer's whole cache into that order on every step
(ref_small at batch 8: 850 -> 1,130 tokens/s without the copies).

`prefill` and `decode_step` run a Decoder's own pieces (`Decoder.embed`, the blocks' norms,
`Attention.project_qkv` / `project_out`, `causal_attention` for prompts, MLPs,
`Decoder.unembed`) with the cache in between, so they stay exact against `Decoder.__call__`
without touching research/model; only the one-query attention over the cache is written
here.

Positions are per row: a prefill writes T tokens at positions 0..T-1 of every row; a decode
step writes one token at `positions_b` (each slot at its own length). Entries past a row's
current position are never attended to, so stale values from a previous request in that slot
need no clearing.
"""

import flax
import jax
import jax.numpy as jnp

from research import sharding
from research.model import Decoder, causal_attention, make_attention_mask

# [B, K, S, H]: slots over the batch axes, kv heads over "tensor" (dropped where K does not
# divide, see sharding.fit_spec).
CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")
_ACTIVATION_AXES = ("batch", "seq", "act_embed")
_MASK_VALUE = -1e30  # As research.model.attention: a fully masked row stays finite.


@flax.struct.dataclass
class KVCache:
    """keys[l], values[l]: [B, K, S, H] compute dtype, one pair per layer."""

    keys: tuple
    values: tuple

    @property
    def num_slots(self) -> int:
        return self.keys[0].shape[0]

    @property
    def max_len(self) -> int:
        return self.keys[0].shape[2]


def cache_shape(model_config, num_slots: int, max_len: int) -> jax.ShapeDtypeStruct:
    """The abstract [B, K, S, H] array of one layer's keys (or values)."""
    shape = (num_slots, model_config.num_kv_heads, max_len, model_config.resolved_head_dim)
    return jax.ShapeDtypeStruct(shape, jnp.dtype(model_config.dtype))


def init_cache(model_config, num_slots: int, max_len: int) -> KVCache:
    """A zero cache (call inside jit with out_shardings to create it sharded)."""
    spec = cache_shape(model_config, num_slots, max_len)
    layers = range(model_config.num_layers)
    return KVCache(
        keys=tuple(jnp.zeros(spec.shape, spec.dtype) for _ in layers),
        values=tuple(jnp.zeros(spec.shape, spec.dtype) for _ in layers),
    )


def cache_sharding(mesh, model_config, num_slots: int, max_len: int) -> KVCache:
    """NamedShardings of every cache leaf on `mesh`."""
    spec = cache_shape(model_config, num_slots, max_len)
    named = jax.sharding.NamedSharding(
        mesh, sharding.fit_spec(sharding.logical_to_spec(CACHE_AXES), spec.shape, mesh)
    )
    layers = tuple(named for _ in range(model_config.num_layers))
    return KVCache(keys=layers, values=layers)


def _mlp(block, x_btd):
    x_btd = x_btd + block.mlp(block.mlp_norm(x_btd))
    return sharding.constrain(x_btd, _ACTIVATION_AXES)


def prefill(
    model: Decoder, tokens_bt: jax.Array, last_index_b: jax.Array | None = None
) -> tuple[jax.Array, KVCache]:
    """Full causal forward of prompts that start at position 0, keeping every layer's k, v.

    Padding after a prompt is harmless: causality keeps real tokens from seeing it.

    Args:
      model: a Decoder (merged inside jit).
      tokens_bt: [B, T] int token ids.
      last_index_b: [B] int index of each prompt's last token; when given, the LM head runs
        on that position only.

    Returns:
      (float32 logits [B, T, V], or [B, V] at last_index_b; KVCache of [B, K, T, H] per
      layer).
    """
    b, t = tokens_bt.shape
    positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))
    mask_btt = make_attention_mask(jnp.ones((b, t), jnp.int32))
    x_btd = model.embed(tokens_bt, positions_bt)
    keys, values = [], []
    for block in model.layers:
        attention = block.attention
        q_btnh, k_btkh, v_btkh = attention.project_qkv(block.attention_norm(x_btd), positions_bt)
        keys.append(sharding.constrain(k_btkh.transpose(0, 2, 1, 3), CACHE_AXES))
        values.append(sharding.constrain(v_btkh.transpose(0, 2, 1, 3), CACHE_AXES))
        y_btnh = causal_attention(q_btnh, k_btkh, v_btkh, mask_btt)
        x_btd = _mlp(block, x_btd + attention.project_out(y_btnh))
    cache = KVCache(keys=tuple(keys), values=tuple(values))
    if last_index_b is None:
        return model.unembed(x_btd).astype(jnp.float32), cache
    x_b1d = jnp.take_along_axis(x_btd, last_index_b[:, None, None], axis=1)
    return model.unembed(x_b1d)[:, 0].astype(jnp.float32), cache


def decode_attention(
    q_bnh: jax.Array,
    k_bksh: jax.Array,
    v_bksh: jax.Array,
    mask_bs: jax.Array,
    own_kv: tuple[jax.Array, jax.Array] | None = None,
) -> jax.Array:
    """softmax(q k^T / sqrt(H) masked) v for one query per row, against the cache.

    The same math as `research.model.dot_product_attention` (query head n uses kv head
    n // G; float32 logits and softmax; a masked key gets a large negative logit).

    Args:
      q_bnh: [B, N, H] queries, compute dtype.
      k_bksh, v_bksh: [B, K, S, H] cache, compute dtype.
      mask_bs: [B, S] bool, True where the cached key may be attended to (at least one per
        row unless own_kv is given).
      own_kv: ([B, K, H], [B, K, H]) the query token's own key and value, attended to after
        the cache, when they are not in it yet (see `decode_step`).

    Returns:
      [B, N, H] in the dtype of v.
    """
    b, n, h = q_bnh.shape
    k, s = k_bksh.shape[1], k_bksh.shape[2]
    q_bkgh = (q_bnh * jnp.asarray(h**-0.5, q_bnh.dtype)).reshape(b, k, n // k, h)
    f32 = jnp.float32
    if k == n:  # No group axis: XLA:CPU handles a size-1 axis in these dots poorly.
        logits_bks = jnp.einsum(
            "bkh,bksh->bks", q_bkgh[:, :, 0], k_bksh, preferred_element_type=f32
        )
        logits_bkgs = logits_bks[:, :, None]
    else:
        logits_bkgs = jnp.einsum("bkgh,bksh->bkgs", q_bkgh, k_bksh, preferred_element_type=f32)
    logits_bkgs = jnp.where(mask_bs[:, None, None], logits_bkgs, _MASK_VALUE)
    if own_kv is not None:
        own_bkg = jnp.einsum("bkgh,bkh->bkg", q_bkgh, own_kv[0], preferred_element_type=f32)
        logits_bkgs = jnp.concatenate([logits_bkgs, own_bkg[..., None]], axis=-1)
    probs_bkgs = jax.nn.softmax(logits_bkgs, axis=-1).astype(v_bksh.dtype)
    if k == n:
        y_bkgh = jnp.einsum("bks,bksh->bkh", probs_bkgs[:, :, 0, :s], v_bksh)[:, :, None]
    else:
        y_bkgh = jnp.einsum("bkgs,bksh->bkgh", probs_bkgs[..., :s], v_bksh)
    if own_kv is not None:
        y_bkgh = y_bkgh + probs_bkgs[..., s:] * own_kv[1][:, :, None]
    return y_bkgh.reshape(b, n, h)


def decode_step(
    model: Decoder, tokens_b: jax.Array, positions_b: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """One new token per row at its own position: attends to 0..pos and writes its k, v there.

    Each layer's attention reads the cache rows before pos plus the token's own key and value
    (given apart), and the new row is written after, through a value that depends on the
    attention's output (`_after`). That dependency lets XLA order the write after the read
    and update every layer's cache in place. Without it (reading the cache a scatter had
    just written, as before), XLA:CPU copied every layer's cache twice to four times a step
    at batch 1: ref_small 223 -> 280 tokens/s with the dependency.

    Args:
      model: a Decoder (merged inside jit).
      tokens_b: [B] int token ids.
      positions_b: [B] int32 positions in [0, S); each row's key/value lands at this index.
      cache: KVCache of [B, K, S, H] per layer.

    Returns:
      ([B, V] float32 logits, the updated cache).
    """
    s = cache.max_len
    positions_b1 = positions_b[:, None]
    earlier_bs = jnp.arange(s)[None, :] < positions_b1
    x_btd = model.embed(tokens_b[:, None], positions_b1)
    keys, values = [], []
    for block, k_bksh, v_bksh in zip(model.layers, cache.keys, cache.values, strict=True):
        attention = block.attention
        q_b1nh, k_b1kh, v_b1kh = attention.project_qkv(block.attention_norm(x_btd), positions_b1)
        own_kv = k_b1kh[:, 0].astype(k_bksh.dtype), v_b1kh[:, 0].astype(v_bksh.dtype)
        y_bnh = decode_attention(q_b1nh[:, 0], k_bksh, v_bksh, earlier_bs, own_kv)
        k_bkh, v_bkh = _after(y_bnh, own_kv)
        keys.append(_write_rows(k_bksh, k_bkh, positions_b))
        values.append(_write_rows(v_bksh, v_bkh, positions_b))
        x_btd = _mlp(block, x_btd + attention.project_out(y_bnh[:, None]))
    logits_bv = model.unembed(x_btd)[:, 0].astype(jnp.float32)
    return logits_bv, KVCache(keys=tuple(keys), values=tuple(values))


def _after(y_bnh: jax.Array, arrays: tuple) -> tuple:
    """[B, K, H] `arrays`, unchanged in value but computed from `y_bnh`: XLA runs their users
    (the cache writes) after the attention that made y.

    Adds an exact zero made from one element of y per (row, kv head), finite or not: local
    to every shard when heads are split over a mesh. An optimization_barrier did not order
    the cache writes; this data dependency does.
    """
    b, k = arrays[0].shape[:2]
    first_bk1 = y_bnh.reshape(b, k, -1)[:, :, :1]  # Query head n belongs to kv head n // G.
    zero_bk1 = jnp.where(jnp.isfinite(first_bk1), first_bk1 * 0, 0)
    return tuple(a + zero_bk1.astype(a.dtype) for a in arrays)


_write_rows = jax.vmap(lambda row_ksh, new_kh, index: row_ksh.at[:, index].set(new_kh))
"""cache[b, :, positions_b[b]] = new[b] for every row b: a scatter XLA performs in place."""


def extend_attention(
    q_btnh: jax.Array, k_bksh: jax.Array, v_bksh: jax.Array, mask_bts: jax.Array
) -> jax.Array:
    """`decode_attention` for T queries per row: softmax(q k^T / sqrt(H) masked) v.

    Args:
      q_btnh: [B, T, N, H] queries, compute dtype.
      k_bksh, v_bksh: [B, K, S, H] cache, compute dtype.
      mask_bts: [B, T, S] bool, True where query t may attend to key s.

    Returns:
      [B, T, N, H] in the dtype of v.
    """
    b, t, n, h = q_btnh.shape
    k = k_bksh.shape[1]
    q_bkgth = (q_btnh * jnp.asarray(h**-0.5, q_btnh.dtype)).reshape(b, t, k, n // k, h)
    q_bkgth = q_bkgth.transpose(0, 2, 3, 1, 4)
    logits_bkgts = jnp.einsum(
        "bkgth,bksh->bkgts", q_bkgth, k_bksh, preferred_element_type=jnp.float32
    )
    logits_bkgts = jnp.where(mask_bts[:, None, None], logits_bkgts, _MASK_VALUE)
    probs_bkgts = jax.nn.softmax(logits_bkgts, axis=-1).astype(v_bksh.dtype)
    y_bkgth = jnp.einsum("bkgts,bksh->bkgth", probs_bkgts, v_bksh)
    return y_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def extend(
    model: Decoder, tokens_bt: jax.Array, start_b: jax.Array, cache: KVCache
) -> tuple[jax.Array, KVCache]:
    """T more prompt tokens per row, at positions start..start+T-1, on top of the cache.

    What chunked prefill and the prefix cache need: the first `start` positions of each row
    hold a prompt's keys and values already (an earlier chunk, or blocks copied from the
    prefix cache); this writes the next T tokens' keys and values after them and attends to
    everything up to each token's own position. Positions past the cache (padding of a last
    chunk) are dropped, never written.

    Args:
      model: a Decoder (merged inside jit).
      tokens_bt: [B, T] int token ids (padding after the real tokens is harmless).
      start_b: [B] int32 position of each row's first new token.
      cache: KVCache of [B, K, S, H] per layer.

    Returns:
      ([B, T, D] final hidden states, before `Decoder.unembed`; the updated cache).
    """
    b, t = tokens_bt.shape
    s = cache.max_len
    positions_bt = start_b[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    mask_bts = jnp.arange(s)[None, None, :] <= positions_bt[:, :, None]
    x_btd = model.embed(tokens_bt, jnp.minimum(positions_bt, s - 1))

    def write_row(row_ksh, new_tkh, positions_t):
        return row_ksh.at[:, positions_t].set(new_tkh.transpose(1, 0, 2), mode="drop")

    write = jax.vmap(write_row)
    keys, values = [], []
    for block, k_bksh, v_bksh in zip(model.layers, cache.keys, cache.values, strict=True):
        attention = block.attention
        q_btnh, k_btkh, v_btkh = attention.project_qkv(block.attention_norm(x_btd), positions_bt)
        k_bksh = write(k_bksh, k_btkh.astype(k_bksh.dtype), positions_bt)
        v_bksh = write(v_bksh, v_btkh.astype(v_bksh.dtype), positions_bt)
        keys.append(k_bksh)
        values.append(v_bksh)
        y_btnh = extend_attention(q_btnh, k_bksh, v_bksh, mask_bts)
        x_btd = _mlp(block, x_btd + attention.project_out(y_btnh))
    return x_btd, KVCache(keys=tuple(keys), values=tuple(values))
