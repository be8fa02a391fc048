"""Grouped-query self-attention (Ainslie et al. 2023): multi-head if K == N, multi-query if K == 1.

The core `dot_product_attention` is a pure function of q, k, v and a boolean mask, so a KV cache
calls `Attention.project_qkv` on the new tokens, appends k and v to its cache, and calls the
same core and `Attention.project_out`.
"""

import functools

import flax
import jax
import jax.numpy as jnp
from flax import nnx

from research.model.dense import Dense
from research.model.positional import RopeScaling, apply_rope

# Finite, so a fully masked row gives a uniform softmax instead of NaN.
_MASK_VALUE = -1e30
# Causal self-attention runs in query blocks of at least this many rows, at most
# _MAX_QUERY_BLOCKS of them: each block skips the keys after it, and each block's [T_b, S]
# logits stay cache-sized on CPU (ref_small fwd+bwd attention: 37 ms -> 17 ms per layer).
_QUERY_BLOCK = 64
_MAX_QUERY_BLOCKS = 8
# Given Segments (long sequences), blocks have exactly this many rows: memory is T x block.
_SEGMENT_QUERY_BLOCK = 256


@flax.struct.dataclass
class Segments:
    """The causal, same-document mask of packed rows, given by their segment ids [B, T]
    instead of as a [B, T, T] array: `causal_attention` builds each query block's part when
    it needs it, so a long sequence never holds a T x T mask (Decoder uses it past
    `LONG_SEQUENCE` tokens)."""

    ids_bt: jax.Array

    def block(self, start: int, end: int) -> jax.Array:
        """[B, end - start, end] bool: queries start..end-1 against keys 0..end-1."""
        return make_attention_mask(
            self.ids_bt[:, start:end],
            self.ids_bt[:, :end],
            q_index_bt=jnp.arange(start, end)[None],
            kv_index_bs=jnp.arange(end)[None],
        )


def make_attention_mask(
    q_segment_ids_bt: jax.Array,
    kv_segment_ids_bs: jax.Array | None = None,
    *,
    q_index_bt: jax.Array | None = None,
    kv_index_bs: jax.Array | None = None,
) -> jax.Array:
    """Causal and same-document mask for packed sequences.

    Query t sees key s iff s is not after t and both are in the same segment. Segment id 0 is
    padding: a padding token sees only itself (never a NaN row) and no token sees padding.

    Args:
      q_segment_ids_bt: [B, T] int, 0 = padding, documents numbered from 1.
      kv_segment_ids_bs: [B, S] int; default q_segment_ids_bt (self-attention, S = T).
      q_index_bt: [B, T] int sequence index of each query (for causality; not the RoPE
        position, which restarts per document); default arange(T).
      kv_index_bs: [B, S] int sequence index of each key; default arange(S).

    Returns:
      [B, T, S] bool, True where attention is allowed.
    """
    if kv_segment_ids_bs is None:
        kv_segment_ids_bs = q_segment_ids_bt
    t, s = q_segment_ids_bt.shape[1], kv_segment_ids_bs.shape[1]
    q_index_bt = jnp.arange(t)[None] if q_index_bt is None else q_index_bt
    kv_index_bs = jnp.arange(s)[None] if kv_index_bs is None else kv_index_bs
    q_index_bts, kv_index_bts = q_index_bt[:, :, None], kv_index_bs[:, None, :]
    q_segment_bts = q_segment_ids_bt[:, :, None]
    same_document_bts = (q_segment_bts == kv_segment_ids_bs[:, None, :]) & (q_segment_bts != 0)
    return (kv_index_bts <= q_index_bts) & (same_document_bts | (kv_index_bts == q_index_bts))


def dot_product_attention(
    q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array
) -> jax.Array:
    """softmax(q k^T / sqrt(H) masked) v with grouped heads, without repeating k and v.

    Query head n uses kv head n // G (the HF / Llama convention for grouped-query attention).
    Works for any mask (a KV cache passes S > T); see `causal_attention` for self-attention.

    Args:
      q_btnh: [B, T, N, H] queries, compute dtype.
      k_bskh: [B, S, K, H] keys, compute dtype; N % K == 0.
      v_bskh: [B, S, K, H] values, compute dtype.
      mask_bts: [B, T, S] bool, True where query t may attend to key s; every row needs one.

    Returns:
      [B, T, N, H] in the dtype of v. Logits and softmax are float32.
    """
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btnh = q_btnh * jnp.asarray(h**-0.5, q_btnh.dtype)
    if k == n:
        # No group axis: XLA:CPU handles a size-1 axis in these dots poorly (~35% slower).
        return _attention(q_btnh, k_bskh, v_bskh, mask_bts, False)
    q_btkgh = q_btnh.reshape(b, t, k, n // k, h)
    return _attention(q_btkgh, k_bskh, v_bskh, mask_bts, True).reshape(b, t, n, h)


def attention_with_weights(
    q_btnh: jax.Array, k_bskh: jax.Array, v_bskh: jax.Array, mask_bts: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """`dot_product_attention` in one piece (no query blocks, plain autodiff), also returning
    its softmax weights, which the fused paths never keep: for inspection.

    Args and output as `dot_product_attention`; the second result is [B, N, T, S] float32
    weights, query heads expanded (head n reads kv head n // G), every row summing to one.
    """
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btnh = q_btnh * jnp.asarray(h**-0.5, q_btnh.dtype)
    grouped = k != n
    q = q_btnh.reshape(b, t, k, n // k, h) if grouped else q_btnh
    out, (*_, probs) = _attention_forward(q, k_bskh, v_bskh, mask_bts, grouped)
    if grouped:  # [B, K, T, G, S] -> [B, K, G, T, S] -> [B, N, T, S] (n = k G + g).
        probs = probs.transpose(0, 1, 3, 2, 4).reshape(b, n, t, -1)
    return out.reshape(b, t, n, h), probs


def causal_attention(
    q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, mask_btt: jax.Array
) -> jax.Array:
    """`dot_product_attention` for self-attention under a causal mask, computed blockwise.

    Query block [i, j) cannot see keys at j or later, so they are left out (up to ~45% of
    the work); the result equals `dot_product_attention` up to float rounding.

    Args:
      q_btnh: [B, T, N, H]; k_btkh, v_btkh: [B, T, K, H]; all compute dtype.
      mask_btt: [B, T, T] bool and causal (False wherever key index > query index), e.g.
        from `make_attention_mask` with default indices; or Segments (blocks of
        _SEGMENT_QUERY_BLOCK queries, each mask built from the segment ids).

    Returns:
      [B, T, N, H] in the dtype of v.
    """
    t = q_btnh.shape[1]
    if isinstance(mask_btt, Segments):
        block = _SEGMENT_QUERY_BLOCK
    else:
        block = max(_QUERY_BLOCK, -(-t // _MAX_QUERY_BLOCKS))
    outputs = []
    for start in range(0, t, block):
        end = min(start + block, t)
        if isinstance(mask_btt, Segments):
            mask_block = mask_btt.block(start, end)
        else:
            mask_block = mask_btt[:, start:end, :end]
        outputs.append(
            dot_product_attention(
                q_btnh[:, start:end], k_btkh[:, :end], v_btkh[:, :end], mask_block
            )
        )
    return outputs[0] if len(outputs) == 1 else jnp.concatenate(outputs, axis=1)


def _equations(grouped: bool) -> tuple[str, str, str]:
    """Einsum specs of (queries, logits, logit rows); keys and values are always "bskh"."""
    if grouped:  # [B, K, T, G, S] logits: t before g measured faster than g before t on CPU.
        return "btkgh", "bktgs", "bktg"
    return "btkh", "bkts", "bkt"


def _expand_mask(mask_bts: jax.Array, grouped: bool) -> jax.Array:
    return mask_bts[:, None, :, None] if grouped else mask_bts[:, None]


# A hand-written backward pass (as in FlashAttention, Dao et al. 2022): the softmax gradient
# uses rowsum(dout * out) instead of rowsum(dprobs * probs), and masked entries need no select
# since their probabilities are exactly 0. Fewer passes over the [T, S] arrays than autodiff.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q, k, v, mask_bts, grouped):
    return _attention_forward(q, k, v, mask_bts, grouped)[0]


def _attention_forward(q, k, v, mask_bts, grouped):
    q_spec, logits_spec, _ = _equations(grouped)
    logits = jnp.einsum(f"{q_spec},bskh->{logits_spec}", q, k, preferred_element_type=jnp.float32)
    logits = jnp.where(_expand_mask(mask_bts, grouped), logits, _MASK_VALUE)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum(f"{logits_spec},bskh->{q_spec}", probs.astype(v.dtype), v)
    return out, (q, k, v, out, probs)


def _attention_backward(grouped, residuals, grad_out):
    q, k, v, out, probs = residuals
    q_spec, logits_spec, rows_spec = _equations(grouped)
    grad_v = jnp.einsum(f"{logits_spec},{q_spec}->bskh", probs.astype(v.dtype), grad_out)
    grad_probs = jnp.einsum(
        f"{q_spec},bskh->{logits_spec}", grad_out, v, preferred_element_type=jnp.float32
    )
    row_dot = jnp.einsum(
        f"{q_spec},{q_spec}->{rows_spec}", grad_out, out, preferred_element_type=jnp.float32
    )
    grad_logits = (probs * (grad_probs - row_dot[..., None])).astype(q.dtype)
    grad_q = jnp.einsum(f"{logits_spec},bskh->{q_spec}", grad_logits, k)
    grad_k = jnp.einsum(f"{logits_spec},{q_spec}->bskh", grad_logits, q)
    return grad_q, grad_k, grad_v, None


_attention.defvjp(_attention_forward, _attention_backward)


class Attention(nnx.Module):
    """Self-attention with separate q, k, v, o projections.

    Kernels: q_proj [D, N, H] ("embed", "heads", "head_dim"); k_proj, v_proj [D, K, H]
    ("embed", "kv_heads", "head_dim"); o_proj [N, H, D] ("heads", "head_dim", "embed").

    Args:
      dim: D. num_heads: N. num_kv_heads: K. head_dim: H.
      rope_theta: RoPE base applied to q and k; None for no rotary embedding (learned positions).
      rope_scaling: Llama 3.1 RoPE frequency scaling, or None.
      use_bias: biases on q, k, v and o (GPT-2).
      qkv_bias: biases on q, k, v only (Qwen2).
      kernel_init: initializer of the q, k, v kernels.
      out_init: initializer of the o kernel (a residual projection).
      dtype: compute dtype.

    `capture_weights` (off unless an inspector sets it on a merged model): compute with
    `attention_with_weights` and sow the [B, N, T, T] softmax weights as
    `nnx.Intermediate` "weights" (read them with `nnx.capture`). Off, nothing is stored.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        num_kv_heads: int,
        head_dim: int,
        *,
        rope_theta: float | None,
        use_bias: bool,
        qkv_bias: bool,
        kernel_init: nnx.Initializer,
        out_init: nnx.Initializer,
        dtype=jnp.float32,
        rope_scaling: RopeScaling | None = None,
        quant: str = "none",
        quant_group: int = 32,
        rngs: nnx.Rngs,
    ):
        self.rope_theta = rope_theta
        self.rope_scaling = rope_scaling
        self.capture_weights = False
        into = dict(
            in_axes=("embed",),
            use_bias=use_bias or qkv_bias,
            kernel_init=kernel_init,
            dtype=dtype,
            quant=quant,
            quant_group=quant_group,
            rngs=rngs,
        )
        self.q_proj = Dense((dim,), (num_heads, head_dim), out_axes=("heads", "head_dim"), **into)
        kv_axes = ("kv_heads", "head_dim")
        self.k_proj = Dense((dim,), (num_kv_heads, head_dim), out_axes=kv_axes, **into)
        self.v_proj = Dense((dim,), (num_kv_heads, head_dim), out_axes=kv_axes, **into)
        self.o_proj = Dense(
            (num_heads, head_dim),
            (dim,),
            in_axes=("heads", "head_dim"),
            out_axes=("embed",),
            use_bias=use_bias,
            kernel_init=out_init,
            dtype=dtype,
            quant=quant,
            quant_group=quant_group,
            rngs=rngs,
        )

    def project_qkv(
        self, x_btd: jax.Array, positions_bt: jax.Array
    ) -> tuple[jax.Array, jax.Array, jax.Array]:
        """x: [B, T, D], positions: [B, T] int -> q [B, T, N, H], k [B, T, K, H], v [B, T, K, H].

        RoPE (if any) is already applied to q and k; all in the compute dtype.
        """
        q_btnh, k_btkh, v_btkh = self.q_proj(x_btd), self.k_proj(x_btd), self.v_proj(x_btd)
        if self.rope_theta is not None:
            rope = dict(theta=self.rope_theta, scaling=self.rope_scaling)
            q_btnh = apply_rope(q_btnh, positions_bt, **rope)
            k_btkh = apply_rope(k_btkh, positions_bt, **rope)
        return q_btnh, k_btkh, v_btkh

    def project_out(self, y_btnh: jax.Array) -> jax.Array:
        """[B, T, N, H] -> [B, T, D], compute dtype."""
        return self.o_proj(y_btnh)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array) -> jax.Array:
        """Self-attention: x [B, T, D] compute dtype, positions [B, T] int -> [B, T, D].

        mask_bts: [B, T, T] bool and causal (`make_attention_mask`).
        """
        q_btnh, k_btkh, v_btkh = self.project_qkv(x_btd, positions_bt)
        if self.capture_weights:
            if isinstance(mask_bts, Segments):
                mask_bts = mask_bts.block(0, x_btd.shape[1])
            y_btnh, weights_bntt = attention_with_weights(q_btnh, k_btkh, v_btkh, mask_bts)
            self.sow(nnx.Intermediate, "weights", weights_bntt)
            return self.project_out(y_btnh)
        return self.project_out(causal_attention(q_btnh, k_btkh, v_btkh, mask_bts))
