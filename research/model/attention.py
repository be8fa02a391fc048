"""Grouped-query self-attention (Ainslie et al. 2023): multi-head if K == N, multi-query if K == 1.

The core `dot_product_attention` is a pure function of q, k, v and a boolean mask, so a KV cache
calls `Attention.project_qkv` on the new tokens, appends k and v to its cache, and calls the
same core and `Attention.project_out`.
"""

import functools

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.dense import Dense
from research.model.positional import apply_rope

# Finite, so a fully masked row gives a uniform softmax instead of NaN.
_MASK_VALUE = -1e30
# Causal self-attention runs in query blocks of at least this many rows, at most
# _MAX_QUERY_BLOCKS of them: each block skips the keys after it, and each block's [T_b, S]
# logits stay cache-sized on CPU (ref_small fwd+bwd attention: 37 ms -> 17 ms per layer).
_QUERY_BLOCK = 64
_MAX_QUERY_BLOCKS = 8


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
    t, s = q_btnh.shape[1], k_bskh.shape[1]
    return _grouped_attention(q_btnh, k_bskh, v_bskh, mask_bts, ((0, t, s),))


def causal_attention(
    q_btnh: jax.Array, k_btkh: jax.Array, v_btkh: jax.Array, mask_btt: jax.Array
) -> jax.Array:
    """`dot_product_attention` for self-attention under a causal mask, computed blockwise.

    Query block [i, j) cannot see keys at j or later, so they are left out (up to ~45% of
    the work); the result equals `dot_product_attention` up to float rounding.

    Args:
      q_btnh: [B, T, N, H]; k_btkh, v_btkh: [B, T, K, H]; all compute dtype.
      mask_btt: [B, T, T] bool and causal (False wherever key index > query index), e.g.
        from `make_attention_mask` with default indices.

    Returns:
      [B, T, N, H] in the dtype of v.
    """
    t = q_btnh.shape[1]
    size = max(_QUERY_BLOCK, -(-t // _MAX_QUERY_BLOCKS))
    blocks = tuple(
        (start, min(start + size, t), min(start + size, t)) for start in range(0, t, size)
    )
    return _grouped_attention(q_btnh, k_btkh, v_btkh, mask_btt, blocks)


def _grouped_attention(q_btnh, k_bskh, v_bskh, mask_bts, blocks):
    """Moves heads in front ([B, K, G, T, H], [B, K, S, H]) once, then `_attention`."""
    b, t, n, h = q_btnh.shape
    k = k_bskh.shape[2]
    q_btnh = q_btnh * jnp.asarray(h**-0.5, q_btnh.dtype)
    q_bkgth = q_btnh.reshape(b, t, k, n // k, h).transpose(0, 2, 3, 1, 4)
    k_bksh, v_bksh = k_bskh.transpose(0, 2, 1, 3), v_bskh.transpose(0, 2, 1, 3)
    out_bkgth = _attention(q_bkgth, k_bksh, v_bksh, mask_bts, blocks)
    return out_bkgth.transpose(0, 3, 1, 2, 4).reshape(b, t, n, h)


# Blockwise softmax attention with a hand-written backward pass (as in FlashAttention, Dao et
# al. 2022): the softmax gradient uses rowsum(dout * out) instead of rowsum(dprobs * probs) and
# masked entries need no select (their probabilities are exactly 0). `blocks` holds static
# (query start, query end, key end) triples; heads are leading axes so every einsum is a plain
# batched matmul. On CPU this took ref_small's attention from 37 ms to ~15 ms per layer.
@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def _attention(q_bkgth, k_bksh, v_bksh, mask_bts, blocks):
    return _attention_forward(q_bkgth, k_bksh, v_bksh, mask_bts, blocks)[0]


def _attention_forward(q_bkgth, k_bksh, v_bksh, mask_bts, blocks):
    outputs, probs = [], []
    for start, end, kv_end in blocks:
        logits_bkgts = jnp.einsum(
            "bkgth,bksh->bkgts",
            q_bkgth[:, :, :, start:end],
            k_bksh[:, :, :kv_end],
            preferred_element_type=jnp.float32,
        )
        mask = mask_bts[:, None, None, start:end, :kv_end]
        probs_bkgts = jax.nn.softmax(jnp.where(mask, logits_bkgts, _MASK_VALUE), axis=-1)
        outputs.append(
            jnp.einsum("bkgts,bksh->bkgth", probs_bkgts.astype(v_bksh.dtype), v_bksh[:, :, :kv_end])
        )
        probs.append(probs_bkgts)
    out_bkgth = jnp.concatenate(outputs, axis=3) if len(outputs) > 1 else outputs[0]
    return out_bkgth, (q_bkgth, k_bksh, v_bksh, out_bkgth, tuple(probs))


def _attention_backward(blocks, residuals, grad_out_bkgth):
    q_bkgth, k_bksh, v_bksh, out_bkgth, probs = residuals
    f32 = jnp.float32
    row_dot_bkgt = jnp.einsum(
        "bkgth,bkgth->bkgt", grad_out_bkgth, out_bkgth, preferred_element_type=f32
    )
    grad_q_blocks = []
    grad_k_bksh = jnp.zeros(k_bksh.shape, f32)
    grad_v_bksh = jnp.zeros(v_bksh.shape, f32)
    for (start, end, kv_end), probs_bkgts in zip(blocks, probs, strict=True):
        grad_out = grad_out_bkgth[:, :, :, start:end]
        k_block, v_block = k_bksh[:, :, :kv_end], v_bksh[:, :, :kv_end]
        grad_v = jnp.einsum(
            "bkgts,bkgth->bksh",
            probs_bkgts.astype(v_bksh.dtype),
            grad_out,
            preferred_element_type=f32,
        )
        grad_probs = jnp.einsum("bkgth,bksh->bkgts", grad_out, v_block, preferred_element_type=f32)
        grad_logits = probs_bkgts * (grad_probs - row_dot_bkgt[..., start:end, None])
        grad_logits = grad_logits.astype(q_bkgth.dtype)
        grad_q_blocks.append(jnp.einsum("bkgts,bksh->bkgth", grad_logits, k_block))
        grad_k = jnp.einsum(
            "bkgts,bkgth->bksh",
            grad_logits,
            q_bkgth[:, :, :, start:end],
            preferred_element_type=f32,
        )
        grad_k_bksh = grad_k_bksh.at[:, :, :kv_end].add(grad_k)
        grad_v_bksh = grad_v_bksh.at[:, :, :kv_end].add(grad_v)
    grad_q = jnp.concatenate(grad_q_blocks, axis=3) if len(blocks) > 1 else grad_q_blocks[0]
    return grad_q, grad_k_bksh.astype(k_bksh.dtype), grad_v_bksh.astype(v_bksh.dtype), None


_attention.defvjp(_attention_forward, _attention_backward)


class Attention(nnx.Module):
    """Self-attention with separate q, k, v, o projections.

    Kernels: q_proj [D, N, H] ("embed", "heads", "head_dim"); k_proj, v_proj [D, K, H]
    ("embed", "kv_heads", "head_dim"); o_proj [N, H, D] ("heads", "head_dim", "embed").

    Args:
      dim: D. num_heads: N. num_kv_heads: K. head_dim: H.
      rope_theta: RoPE base applied to q and k; None for no rotary embedding (learned positions).
      use_bias: biases on q, k, v and o (GPT-2).
      qkv_bias: biases on q, k, v only (Qwen2).
      kernel_init: initializer of the q, k, v kernels.
      out_init: initializer of the o kernel (a residual projection).
      dtype: compute dtype.
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
        rngs: nnx.Rngs,
    ):
        self.rope_theta = rope_theta
        into = dict(
            in_axes=("embed",),
            use_bias=use_bias or qkv_bias,
            kernel_init=kernel_init,
            dtype=dtype,
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
            q_btnh = apply_rope(q_btnh, positions_bt, theta=self.rope_theta)
            k_btkh = apply_rope(k_btkh, positions_bt, theta=self.rope_theta)
        return q_btnh, k_btkh, v_btkh

    def project_out(self, y_btnh: jax.Array) -> jax.Array:
        """[B, T, N, H] -> [B, T, D], compute dtype."""
        return self.o_proj(y_btnh)

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array) -> jax.Array:
        """Self-attention: x [B, T, D] compute dtype, positions [B, T] int -> [B, T, D].

        mask_bts: [B, T, T] bool and causal (`make_attention_mask`).
        """
        q_btnh, k_btkh, v_btkh = self.project_qkv(x_btd, positions_bt)
        return self.project_out(causal_attention(q_btnh, k_btkh, v_btkh, mask_bts))
