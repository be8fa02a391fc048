"""A key/value cache per layer and the Decoder's forward pass through it.

Each layer's cache holds, for keys and for values, the positions 0..S-1 of every slot, split
at the decode key buckets into segments: [B, K, S_i, H] arrays in the compute dtype (one row
per slot, K kv heads: grouped-query attention stores the K kv heads, never the N query
heads). For max_len 2048 the segments hold positions [0, 256), [256, 1024), [1024, 2048).
Heads come before positions because a decode step's two attention matmuls batch over (B, K).
With kv_dtype "int8" the segments are int8 and each has a [B, K, S_i, 1] float32 scale
segment beside it (kv_quant.py: quantized on write, scales applied inside the attention).

Why segments: a decode call that needs only the first L positions reads whole segments, with
no slice. XLA:CPU copies a slice of a buffer before a dot, and those copies cost as much as
the attention itself: 16 slots of SmolLM2 reading 256 of 2048 positions took 52 ms a step
sliced, 38 ms reading a 256-position segment.

`extend` (prompt tokens) and `decode_step` (one token per row) run a Decoder's own pieces
(`Decoder.embed`, the blocks' norms, `Attention.project_qkv` / `project_out`, MLPs,
`Decoder.unembed`) with the cache in between, so they stay exact against `Decoder.__call__`
without touching research/model; only attention over the cache is written here.

Work follows what is in use, not the cache's size:
  - a decode step runs on the first R rows and reads the segments below L (static buckets
    chosen by the sampler from the live slots), so one active slot of 16 costs what one
    slot costs, and a short exchange costs the same at any max_len;
  - prompt attention walks the filled key blocks only (a loop whose trip count is the
    prompt's end), so its memory is queries x block, never queries x max_len.

Positions are per row. Entries past a row's current position are never attended to, so stale
values from a previous request in that slot need no clearing; rows that are not decoding
(free, or a prompt half prefilled) are never written by a decode step.
"""

import functools

import flax
import jax
import jax.numpy as jnp

from research import sharding
from research.errors import UserError
from research.model import Decoder
from research.serving.core import kv_quant
from research.serving.core.kv_quant import KV_DTYPES

# [B, K, S, H]: slots over the batch axes, kv heads over "tensor" (dropped where K does not
# divide, see sharding.fit_spec).
CACHE_AXES = ("batch", "kv_heads", "seq", "head_dim")
_ACTIVATION_AXES = ("batch", "seq", "act_embed")
_MASK_VALUE = -1e30  # As research.model.attention: a fully masked row stays finite.
# Keys per step of prompt attention's loop: measured on SmolLM2, 256 beat 512 and 1024.
KEY_BLOCK = 256
_MIN_KEYS = 256  # The smallest decode key bucket; then x4 up to max_len.


def key_buckets(max_len: int) -> tuple[int, ...]:
    """Cache positions a decode call may read: 256 x powers of four, then max_len. They
    are also the segments' ends."""
    buckets, size = [], _MIN_KEYS
    while size < max_len:
        buckets.append(size)
        size *= 4
    return (*buckets, max_len)


def segment_bounds(max_len: int) -> tuple[tuple[int, int], ...]:
    """(start, end) of every segment."""
    ends = key_buckets(max_len)
    return tuple(zip((0, *ends[:-1]), ends, strict=True))


def check_kv_dtype(kv_dtype: str, field: str = "kv_dtype") -> None:
    """UserError naming `field` unless kv_dtype is one of KV_DTYPES."""
    if kv_dtype not in KV_DTYPES:
        raise UserError(
            f"{field}={kv_dtype!r} is not a KV cache dtype; use 'auto' (the model's compute "
            "dtype) or 'int8' (int8 keys and values with a float32 scale per kv head and "
            "position: about a quarter of a float32 cache, half of a bfloat16 one)."
        )


@flax.struct.dataclass
class KVCache:
    """keys[l], values[l]: per layer, a tuple of segments [B, K, S_i, H] (compute dtype, or
    int8). key_scales[l], value_scales[l]: for an int8 cache the matching [B, K, S_i, 1]
    float32 scale segments; () for a float cache."""

    keys: tuple
    values: tuple
    key_scales: tuple
    value_scales: tuple

    @property
    def num_slots(self) -> int:
        return self.keys[0][0].shape[0]

    @property
    def quantized(self) -> bool:
        return bool(self.key_scales[0])

    @property
    def max_len(self) -> int:
        return sum(segment.shape[2] for segment in self.keys[0])

    @property
    def bounds(self) -> tuple[tuple[int, int], ...]:
        return segment_bounds(self.max_len)


def whole(segments) -> jax.Array:
    """One layer's segments as a single [B, K, S, H] array (a copy: tests, prefix blocks)."""
    return segments[0] if len(segments) == 1 else jnp.concatenate(segments, axis=2)


def cache_shape(
    model_config, num_slots: int, max_len: int, kv_dtype: str = "auto"
) -> jax.ShapeDtypeStruct:
    """The abstract [B, K, S, H] array of one layer's keys (or values), all segments."""
    shape = (num_slots, model_config.num_kv_heads, max_len, model_config.resolved_head_dim)
    dtype = jnp.int8 if kv_dtype == "int8" else jnp.dtype(model_config.dtype)
    return jax.ShapeDtypeStruct(shape, dtype)


def init_cache(model_config, num_slots: int, max_len: int, kv_dtype: str = "auto") -> KVCache:
    """A zero cache (call inside jit with out_shardings to create it sharded)."""
    check_kv_dtype(kv_dtype)
    spec = cache_shape(model_config, num_slots, max_len, kv_dtype)
    b, k, _, h = spec.shape

    def layer(last, dtype):
        return tuple(
            jnp.zeros((b, k, end - start, last), dtype) for start, end in segment_bounds(max_len)
        )

    layers = range(model_config.num_layers)
    cache = tuple(layer(h, spec.dtype) for _ in layers), tuple(layer(h, spec.dtype) for _ in layers)
    if kv_dtype == "int8":
        scales = tuple(layer(1, jnp.float32) for _ in layers)
        scales = scales, tuple(layer(1, jnp.float32) for _ in layers)
    else:
        scales = tuple(() for _ in layers), tuple(() for _ in layers)
    return KVCache(keys=cache[0], values=cache[1], key_scales=scales[0], value_scales=scales[1])


def cache_sharding(
    mesh, model_config, num_slots: int, max_len: int, kv_dtype: str = "auto"
) -> KVCache:
    """NamedShardings of every cache leaf on `mesh` (scales as the keys: heads split)."""
    abstract = jax.eval_shape(lambda: init_cache(model_config, num_slots, max_len, kv_dtype))
    spec = sharding.logical_to_spec(CACHE_AXES)
    return jax.tree.map(
        lambda leaf: jax.sharding.NamedSharding(mesh, sharding.fit_spec(spec, leaf.shape, mesh)),
        abstract,
    )


def _mlp(block, x_btd):
    x_btd = x_btd + block.mlp(block.mlp_norm(x_btd))
    return sharding.constrain(x_btd, _ACTIVATION_AXES)


def _write_kv(segments, scales, bounds, rows, positions, new):
    """`_write` of new keys (or values) [..., K, H]: as they are into a float cache, or
    quantized into int8 segments plus their scale segments. Returns (segments, scales)."""
    if not scales:
        return _write(segments, bounds, rows, positions, new), scales
    q, scale = kv_quant.quantize(new)
    return _write(segments, bounds, rows, positions, q), _write(
        scales, bounds, rows, positions, scale
    )


def _write(segments, bounds, rows, positions, new):
    """segments[.][rows, :, position - start] = new, each position into its own segment
    (elsewhere dropped). rows, positions: index arrays of one shape; new: that shape + [K, H]."""
    out = []
    for segment, (start, end) in zip(segments, bounds, strict=True):
        inside = (positions >= start) & (positions < end)
        local = jnp.where(inside, positions - start, end - start)  # Out of range: dropped.
        out.append(segment.at[rows, :, local].set(new.astype(segment.dtype), mode="drop"))
    return tuple(out)


def decode_attention(
    q_bnh: jax.Array,
    k_bksh,
    v_bksh,
    mask_bs: jax.Array,
    own_kv: tuple[jax.Array, jax.Array] | None = None,
    key_scales=(),
    value_scales=(),
) -> jax.Array:
    """softmax(q k^T / sqrt(H) masked) v for one query per row, against the cache.

    The same math as `research.model.dot_product_attention` (query head n uses kv head
    n // G; float32 logits and softmax; a masked key gets a large negative logit).

    Args:
      q_bnh: [B, N, H] queries, compute dtype.
      k_bksh, v_bksh: [B, K, S, H] cache, or a sequence of segments [B, K, S_i, H] that
        together make S positions; compute dtype, or int8 with scales.
      mask_bs: [B, S] bool, True where the cached key may be attended to (at least one per
        row unless own_kv is given).
      own_kv: ([B, K, H], [B, K, H]) the query token's own key and value, attended to after
        the cache, when they are not in it yet (see `decode_step`); compute dtype.
      key_scales, value_scales: for an int8 cache, its [B, K, S, 1] float32 scales (or
        segments, as the cache); empty for a float cache.

    Returns:
      [B, N, H] in the dtype of q.
    """

    def segments(x):
        return tuple(x) if isinstance(x, (list, tuple)) else (x,)

    keys, values = segments(k_bksh), segments(v_bksh)
    key_scales, value_scales = segments(key_scales), segments(value_scales)
    b, n, h = q_bnh.shape
    k = keys[0].shape[1]
    q_bkgh = (q_bnh * jnp.asarray(h**-0.5, q_bnh.dtype)).reshape(b, k, n // k, h)
    f32 = jnp.float32

    def logits(k_bksh, scale_bks1=None):
        if scale_bks1 is not None:
            return kv_quant.logits(q_bkgh, k_bksh, scale_bks1)
        if k == n:  # No group axis: XLA:CPU handles a size-1 axis in these dots poorly.
            logits_bks = jnp.einsum(
                "bkh,bksh->bks", q_bkgh[:, :, 0], k_bksh, preferred_element_type=f32
            )
            return logits_bks[:, :, None]
        return jnp.einsum("bkgh,bksh->bkgs", q_bkgh, k_bksh, preferred_element_type=f32)

    quantized = bool(key_scales)
    scales = key_scales if quantized else (None,) * len(keys)
    logits_bkgs = jnp.concatenate(
        [logits(*pair) for pair in zip(keys, scales, strict=True)], axis=-1
    )
    logits_bkgs = jnp.where(mask_bs[:, None, None], logits_bkgs, _MASK_VALUE)
    if own_kv is not None:
        own_bkg = jnp.einsum("bkgh,bkh->bkg", q_bkgh, own_kv[0], preferred_element_type=f32)
        logits_bkgs = jnp.concatenate([logits_bkgs, own_bkg[..., None]], axis=-1)
    probs_bkgs = jax.nn.softmax(logits_bkgs, axis=-1)
    if not quantized:
        probs_bkgs = probs_bkgs.astype(values[0].dtype)
    y_bkgh, start = 0, 0
    for i, v_seg in enumerate(values):
        size = v_seg.shape[2]
        p_bkgs = probs_bkgs[..., start : start + size]
        if quantized:
            y_bkgh = y_bkgh + kv_quant.weighted_values(p_bkgs, v_seg, value_scales[i])
        elif k == n:
            y_bkgh = y_bkgh + jnp.einsum("bks,bksh->bkh", p_bkgs[:, :, 0], v_seg)[:, :, None]
        else:
            y_bkgh = y_bkgh + jnp.einsum("bkgs,bksh->bkgh", p_bkgs, v_seg)
        start += size
    if own_kv is not None:
        y_bkgh = y_bkgh + probs_bkgs[..., start:] * own_kv[1][:, :, None]
    return y_bkgh.reshape(b, n, h).astype(q_bnh.dtype)


def decode_step(
    model: Decoder,
    tokens_r: jax.Array,
    positions_r: jax.Array,
    writes_r: jax.Array,
    cache: KVCache,
    *,
    num_keys: int = 0,
) -> tuple[jax.Array, KVCache]:
    """One new token for each of the first R rows, at its own position.

    Each layer's attention reads, for rows 0..R-1, the segments that start below
    `num_keys` (those cache positions before the row's position count) plus the token's own
    key and value, given apart; the new key and value are written afterwards, through a
    value that depends on the attention's output (`_after`). That dependency lets XLA order
    the write after the read and update every layer's cache in place (without it XLA:CPU
    copied every layer's cache two to four times a step).

    Args:
      model: a Decoder (merged inside jit).
      tokens_r: [R] int token ids, R <= B.
      positions_r: [R] int32 positions, each <= num_keys (the keys before it are read).
      writes_r: [R] bool: whether the row's key and value are stored (False for rows that
        are not decoding: their cache rows may hold a prompt being prefilled).
      cache: KVCache with B slots.
      num_keys: L, positions read (static; rounded up to a segment end); 0 = all.

    Returns:
      ([R, V] float32 logits, the updated cache).
    """
    r = tokens_r.shape[0]
    b, s = cache.num_slots, cache.max_len
    bounds = cache.bounds
    used = sum(1 for start, _ in bounds if start < (num_keys or s))
    read_keys = bounds[used - 1][1]
    positions_r1 = positions_r[:, None]
    earlier_rl = jnp.arange(read_keys)[None, :] < positions_r1
    # Rows that store nothing write out of range: the scatter drops them.
    write_at_r = jnp.where(writes_r, positions_r, s)
    rows_r = jnp.arange(r)
    x_rtd = model.embed(tokens_r[:, None], positions_r1)
    use_kernel = use_attention_kernel(cache, x_rtd.dtype)

    def rows(segment):
        return segment if r == b else segment[:r]

    new = {"keys": [], "values": [], "key_scales": [], "value_scales": []}
    layers = zip(model.layers, *(getattr(cache, name) for name in new), strict=True)
    for block, k_segments, v_segments, k_scales, v_scales in layers:
        attention = block.attention
        normed_rtd = block.attention_norm(x_rtd)
        q_r1nh, k_r1kh, v_r1kh = attention.project_qkv(normed_rtd, positions_r1)
        if cache.quantized:
            # The token attends to its own key and value as the cache will hold them, so
            # decode and prompt attention (which writes before it reads) see the same keys.
            new_kv = (*kv_quant.quantize(k_r1kh[:, 0]), *kv_quant.quantize(v_r1kh[:, 0]))
            own_kv = (
                kv_quant.dequantize(*new_kv[:2], q_r1nh.dtype),
                kv_quant.dequantize(*new_kv[2:], q_r1nh.dtype),
            )
        else:
            own_kv = (
                k_r1kh[:, 0].astype(k_segments[0].dtype),
                v_r1kh[:, 0].astype(v_segments[0].dtype),
            )
            new_kv = own_kv
        if use_kernel:
            y_rnh = kernel_decode_attention(
                q_r1nh[:, 0], k_segments[:used], v_segments[:used], bounds, positions_r, own_kv
            )
        else:
            y_rnh = decode_attention(
                q_r1nh[:, 0],
                [rows(x) for x in k_segments[:used]],
                [rows(x) for x in v_segments[:used]],
                earlier_rl,
                own_kv,
                [rows(x) for x in k_scales[:used]],
                [rows(x) for x in v_scales[:used]],
            )
        where = bounds, rows_r, write_at_r
        if cache.quantized:
            k_rkh, k_scale_rk1, v_rkh, v_scale_rk1 = _after(y_rnh, new_kv)
            k_scales = _write(k_scales, *where, k_scale_rk1)
            v_scales = _write(v_scales, *where, v_scale_rk1)
        else:
            k_rkh, v_rkh = _after(y_rnh, new_kv)
        k_segments = _write(k_segments, *where, k_rkh)
        v_segments = _write(v_segments, *where, v_rkh)
        for name, layer in zip(new, (k_segments, v_segments, k_scales, v_scales), strict=True):
            new[name].append(layer)
        x_rtd = _mlp(block, x_rtd + attention.project_out(y_rnh[:, None]))
    logits_rv = model.unembed(x_rtd)[:, 0].astype(jnp.float32)
    return logits_rv, KVCache(**{name: tuple(value) for name, value in new.items()})


def use_attention_kernel(cache: KVCache, dtype) -> bool:
    """Whether decode steps attend through the C++ kernel (attention_kernel.py): a float32
    cache and activations, the kernel built, and no mesh of several devices (the kernel
    sees whole arrays; XLA's einsums keep sharded heads local)."""
    if cache.quantized or cache.keys[0][0].dtype != jnp.float32 or dtype != jnp.float32:
        return False
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh.size > 1:
        return False
    from research.serving.core import attention_kernel

    return attention_kernel.available()


def kernel_decode_attention(q_bnh, k_segments, v_segments, bounds, positions_b, own_kv):
    """`decode_attention` for a float32 cache with the kernel: row b attends to its
    positions before positions_b[b] (in segments starting at bounds[i][0], [C >= B, K, S_i,
    H] each: no row slice is copied) and to its own key and value (own_kv, [B, K, H] each).
    Each segment's softmax statistics come from the kernel on CPU (plain JAX elsewhere,
    `attention_kernel.reference_stats`), merged here as in FlashAttention. [B, N, H]."""
    from research.serving.core import attention_kernel

    b, n, h = q_bnh.shape
    k = k_segments[0].shape[1]
    q_bkgh = (q_bnh * jnp.asarray(h**-0.5, q_bnh.dtype)).reshape(b, k, n // k, h)
    own_bkg = jnp.einsum("bkgh,bkh->bkg", q_bkgh, own_kv[0], preferred_element_type=jnp.float32)
    stats = []
    for k_seg, v_seg, (start, end) in zip(k_segments, v_segments, bounds, strict=False):
        lengths_b = jnp.clip(positions_b - start, 0, end - start).astype(jnp.int32)
        stats.append(
            jax.lax.platform_dependent(
                q_bkgh,
                k_seg,
                v_seg,
                lengths_b,
                cpu=attention_kernel.segment_stats,
                default=attention_kernel.reference_stats,
            )
        )
    max_bkg = functools.reduce(jnp.maximum, [m for m, _, _ in stats], own_bkg)
    own_weight_bkg = jnp.exp(own_bkg - max_bkg)
    total_bkg = own_weight_bkg
    acc_bkgh = own_weight_bkg[..., None] * own_kv[1][:, :, None]
    for m_bkg, sum_bkg, seg_acc_bkgh in stats:
        scale_bkg = jnp.exp(m_bkg - max_bkg)
        total_bkg = total_bkg + scale_bkg * sum_bkg
        acc_bkgh = acc_bkgh + scale_bkg[..., None] * seg_acc_bkgh
    return (acc_bkgh / total_bkg[..., None]).reshape(b, n, h).astype(q_bnh.dtype)


def _after(y_bnh: jax.Array, arrays: tuple) -> tuple:
    """[B, K, ...] `arrays`, unchanged in value but computed from `y_bnh`: XLA runs their users
    (the cache writes) after the attention that made y.

    Adds an exact zero made from one element of y per (row, kv head), finite or not: local
    to every shard when heads are split over a mesh. An optimization_barrier did not order
    the cache writes; this data dependency does.
    """
    b, k = arrays[0].shape[:2]
    first_bk1 = y_bnh.reshape(b, k, -1)[:, :, :1]  # Query head n belongs to kv head n // G.
    zero_bk1 = jnp.where(jnp.isfinite(first_bk1), first_bk1 * 0, 0)
    return tuple(a + zero_bk1.astype(a.dtype) for a in arrays)


def blockwise_attention(
    q_btnh: jax.Array,
    k_bksh,
    v_bksh,
    positions_bt: jax.Array,
    rows_b: jax.Array | None = None,
    key_scales=(),
    value_scales=(),
    *,
    block: int = KEY_BLOCK,
) -> jax.Array:
    """Causal attention of T queries per row over the cache, one key block at a time.

    Query t of row b attends to keys 0..positions_bt[b, t] of cache row rows_b[b]. The loop
    runs over key blocks up to the largest position only, with an online softmax (running
    max and sum, as in FlashAttention, Dao et al. 2022), so memory is [B, N, T, block] and
    work follows the filled part of the cache.

    Args:
      q_btnh: [B, T, N, H] queries, compute dtype.
      k_bksh, v_bksh: [C, K, S, H] cache, or its segments [C, K, S_i, H] (already holding
        the queries' own keys); compute dtype, or int8 with scales.
      positions_bt: [B, T] int32 position of each query (keys at or before it are seen).
      rows_b: [B] int32 cache row of each query row, in [0, C); default arange(B).
      key_scales, value_scales: for an int8 cache, its [C, K, S, 1] float32 scales (or
        segments, as the cache); empty for a float cache. Each block is converted to the
        compute dtype as it is read; the scales multiply the logits and the probabilities.
      block: keys per loop step (at most each segment's length).

    Returns:
      [B, T, N, H] in the dtype of q. Logits and softmax statistics are float32.
    """

    def segments(x):
        return tuple(x) if isinstance(x, (list, tuple)) else (x,)

    keys, values = segments(k_bksh), segments(v_bksh)
    key_scales, value_scales = segments(key_scales), segments(value_scales)
    quantized = bool(key_scales)
    if not quantized:
        key_scales = value_scales = (None,) * len(keys)
    b, t, n, h = q_btnh.shape
    k = keys[0].shape[1]
    g = n // k
    rows_b = jnp.arange(b) if rows_b is None else rows_b
    q_bkgth = (q_btnh * jnp.asarray(h**-0.5, q_btnh.dtype)).reshape(b, t, k, g, h)
    q_bkgth = q_bkgth.transpose(0, 2, 3, 1, 4)
    last = jnp.max(positions_bt)
    f32 = jnp.float32
    carry = (
        jnp.full((b, k, g, t), _MASK_VALUE, f32),
        jnp.zeros((b, k, g, t), f32),
        jnp.zeros((b, k, g, t, h), f32),
    )
    offset = 0
    for k_seg, v_seg, ks_seg, vs_seg in zip(keys, values, key_scales, value_scales, strict=True):
        size = k_seg.shape[2]
        seg_block = min(block, size)

        def read(cache_cksh, start, seg_block=seg_block):  # [B, K, block, H] from start.
            def one(row):
                shape = (1, k, seg_block, cache_cksh.shape[3])
                return jax.lax.dynamic_slice(cache_cksh, (row, 0, start, 0), shape)[0]

            return jax.vmap(one)(rows_b)

        def step(i, carry, k_seg=k_seg, v_seg=v_seg, ks_seg=ks_seg, vs_seg=vs_seg, size=size,
                 seg_block=seg_block, offset=offset, read=read):  # fmt: skip
            max_bkgt, sum_bkgt, out_bkgth = carry
            # The last block may be shifted back to fit; keys before i * block are done.
            start = jnp.minimum(i * seg_block, size - seg_block)
            k_bkch, v_bkch = read(k_seg, start), read(v_seg, start)
            if quantized:  # int8 -> compute dtype: exact (|q| <= 127), one block at a time.
                k_bkch, v_bkch = k_bkch.astype(q_btnh.dtype), v_bkch.astype(q_btnh.dtype)
            logits_bkgtc = jnp.einsum(
                "bkgth,bkch->bkgtc", q_bkgth, k_bkch, preferred_element_type=f32
            )
            if quantized:
                logits_bkgtc = logits_bkgtc * read(ks_seg, start)[:, :, None, None, :, 0]
            index_c = offset + start + jnp.arange(seg_block)
            visible_btc = (index_c[None, None] <= positions_bt[:, :, None]) & (
                index_c >= offset + i * seg_block
            )[None, None]
            logits_bkgtc = jnp.where(visible_btc[:, None, None], logits_bkgtc, _MASK_VALUE)
            new_max_bkgt = jnp.maximum(max_bkgt, jnp.max(logits_bkgtc, axis=-1))
            probs_bkgtc = jnp.exp(logits_bkgtc - new_max_bkgt[..., None])
            scale_bkgt = jnp.exp(max_bkgt - new_max_bkgt)
            sum_bkgt = sum_bkgt * scale_bkgt + jnp.sum(probs_bkgtc, axis=-1)
            if quantized:  # The value scales weight the probabilities (the sum keeps p).
                probs_bkgtc = probs_bkgtc * read(vs_seg, start)[:, :, None, None, :, 0]
            update_bkgth = jnp.einsum(
                "bkgtc,bkch->bkgth",
                probs_bkgtc.astype(v_bkch.dtype),
                v_bkch,
                preferred_element_type=f32,
            )
            return new_max_bkgt, sum_bkgt, out_bkgth * scale_bkgt[..., None] + update_bkgth

        # The segment's blocks that hold keys up to the last position (none past it).
        count = jnp.clip((last - offset) // seg_block + 1, 0, -(-size // seg_block))
        carry = jax.lax.fori_loop(0, count, step, carry)
        offset += size
    _, sum_bkgt, out_bkgth = carry
    y_bkgth = (out_bkgth / sum_bkgt[..., None]).astype(q_btnh.dtype)
    return y_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


def extend(
    model: Decoder,
    tokens_rt: jax.Array,
    start_r: jax.Array,
    cache: KVCache,
    slots_r: jax.Array | None = None,
) -> tuple[jax.Array, KVCache]:
    """T more prompt tokens for each of R cache rows, at positions start..start+T-1.

    What prefill, chunked prefill and the prefix cache need: the first `start` positions of
    each row hold the prompt's keys and values already (none, an earlier chunk, or blocks
    copied from the prefix cache); this writes the next T tokens' keys and values after them
    and attends to everything up to each token's own position. Only those positions of the
    cache are touched. Positions past the cache (padding of a last chunk) and rows whose
    slot is out of range (padding rows) are dropped, never written.

    Args:
      model: a Decoder (merged inside jit).
      tokens_rt: [R, T] int token ids (padding after the real tokens is harmless).
      start_r: [R] int32 position of each row's first new token.
      cache: KVCache with B slots.
      slots_r: [R] int32 cache row (slot) of each token row; default arange(R). A slot >= B
        marks a padding row.

    Returns:
      ([R, T, D] final hidden states, before `Decoder.unembed`; the updated cache).
    """
    r, t = tokens_rt.shape
    b, s = cache.num_slots, cache.max_len
    bounds = cache.bounds
    slots_r = jnp.arange(r, dtype=jnp.int32) if slots_r is None else slots_r
    valid_r = slots_r < b
    positions_rt = start_r[:, None] + jnp.arange(t, dtype=jnp.int32)[None]
    clipped_rt = jnp.minimum(positions_rt, s - 1)
    # A padding row attends to key 0 of slot 0 only, so it never lengthens the key loop.
    attend_rt = jnp.where(valid_r[:, None], clipped_rt, 0)
    read_r = jnp.where(valid_r, slots_r, 0)
    write_slot_rt = jnp.broadcast_to(jnp.where(valid_r, slots_r, b)[:, None], (r, t))
    x_rtd = model.embed(tokens_rt, clipped_rt)
    new = {"keys": [], "values": [], "key_scales": [], "value_scales": []}
    layers = zip(model.layers, *(getattr(cache, name) for name in new), strict=True)
    for block, k_segments, v_segments, k_scales, v_scales in layers:
        attention = block.attention
        q_rtnh, k_rtkh, v_rtkh = attention.project_qkv(block.attention_norm(x_rtd), positions_rt)
        # cache[slot, :, position] = new[r, t]: the advanced indices come first, [R, T, K, H].
        where = bounds, write_slot_rt, positions_rt
        k_segments, k_scales = _write_kv(k_segments, k_scales, *where, k_rtkh)
        v_segments, v_scales = _write_kv(v_segments, v_scales, *where, v_rtkh)
        for name, layer in zip(new, (k_segments, v_segments, k_scales, v_scales), strict=True):
            new[name].append(layer)
        y_rtnh = blockwise_attention(
            q_rtnh, k_segments, v_segments, attend_rt, read_r, k_scales, v_scales
        )
        x_rtd = _mlp(block, x_rtd + attention.project_out(y_rtnh))
    return x_rtd, KVCache(**{name: tuple(value) for name, value in new.items()})
