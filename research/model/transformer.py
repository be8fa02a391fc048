"""The decoder: embeddings, a stack of pre-norm blocks, a final norm and the LM head.

GPT-2, Llama, Mistral and Qwen2 are `ModelConfig` values of this one class.
"""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.attention import Attention, Segments, make_attention_mask
from research.model.config import ModelConfig
from research.model.dense import Dense
from research.model.embedding import Embedding
from research.model.mlp import GeluMLP, SwiGLU
from research.model.norm import LayerNorm, RMSNorm
from research.model.positional import LearnedPositions, RopeScaling
from research.sharding import constrain

_ACTIVATION_AXES = ("batch", "seq", "act_embed")
# Past this many tokens the attention mask is built per query block (Segments): memory
# grows as T x block, not T x T (an 8k-token evaluation window).
LONG_SEQUENCE = 2048
_REMAT_POLICIES = {
    "full": None,  # save nothing: recompute the whole block in the backward pass
    # Save the projections' outputs (dots without batch dims), recompute the rest.
    "save_dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


class Block(nnx.Module):
    """Pre-norm residual block: x + attention(norm(x)), then x + mlp(norm(x)).

    The Decoder builds the four sublayers from the config; the block only wires them.

    Args:
      attention_norm, mlp_norm: RMSNorm or LayerNorm over D.
      attention: an Attention.
      mlp: a SwiGLU or GeluMLP.
    """

    def __init__(self, *, attention_norm, attention: Attention, mlp_norm, mlp):
        self.attention_norm = attention_norm
        self.attention = attention
        self.mlp_norm = mlp_norm
        self.mlp = mlp

    def __call__(self, x_btd: jax.Array, positions_bt: jax.Array, mask_bts: jax.Array):
        """x: [B, T, D] compute dtype, positions: [B, T] int, mask: [B, T, T] bool -> [B, T, D]."""
        x_btd = x_btd + self.attention(self.attention_norm(x_btd), positions_bt, mask_bts)
        x_btd = x_btd + self.mlp(self.mlp_norm(x_btd))
        return constrain(x_btd, _ACTIVATION_AXES)


def _initializer(kind: str, std: float) -> nnx.Initializer:
    if kind == "truncated_normal":
        return nnx.initializers.truncated_normal(stddev=std)
    return nnx.initializers.normal(stddev=std)


def _norm(config: ModelConfig, rngs: nnx.Rngs):
    norm = RMSNorm if config.norm == "rmsnorm" else LayerNorm
    return norm(config.d_model, eps=config.norm_eps, rngs=rngs)


def _rope_scaling(config: ModelConfig) -> RopeScaling | None:
    if not config.rope_scaling_factor:
        return None
    return RopeScaling(
        factor=config.rope_scaling_factor,
        low_freq_factor=config.rope_scaling_low_freq,
        high_freq_factor=config.rope_scaling_high_freq,
        original_max_len=config.rope_scaling_original_len,
    )


def _block(config: ModelConfig, rngs: nnx.Rngs) -> Block:
    dtype = jnp.dtype(config.dtype)
    kernel_init = _initializer(config.init, config.init_std)
    out_std = config.init_std
    if config.scale_residual_init:
        out_std /= math.sqrt(2 * config.num_layers)
    out_init = _initializer(config.init, out_std)
    attention = Attention(
        config.d_model,
        config.num_heads,
        config.num_kv_heads,
        config.resolved_head_dim,
        rope_theta=config.rope_theta if config.positions == "rope" else None,
        rope_scaling=_rope_scaling(config),
        use_bias=config.use_bias,
        qkv_bias=config.qkv_bias,
        kernel_init=kernel_init,
        out_init=out_init,
        dtype=dtype,
        quant=config.quant,
        quant_group=config.quant_group,
        rngs=rngs,
    )
    mlp = (SwiGLU if config.mlp_activation == "swiglu" else GeluMLP)(
        config.d_model,
        config.mlp_dim,
        use_bias=config.use_bias,
        kernel_init=kernel_init,
        out_init=out_init,
        dtype=dtype,
        quant=config.quant,
        quant_group=config.quant_group,
        rngs=rngs,
    )
    return Block(
        attention_norm=_norm(config, rngs),
        attention=attention,
        mlp_norm=_norm(config, rngs),
        mlp=mlp,
    )


class Decoder(nnx.Module):
    """A decoder-only transformer language model.

    Attributes: `embedding` (Embedding), `position_embedding` (LearnedPositions or None),
    `layers` (list of Block), `final_norm`, `lm_head` (Dense [D, V] or None when tied).

    A KV-cache sampler reuses the pieces: `embed`, then per block `attention_norm`,
    `attention.project_qkv` / `dot_product_attention` over its cache / `attention.project_out`,
    `mlp_norm` and `mlp` (each added to the residual), then `unembed`.

    `capture_residual` (off unless an inspector sets it on a merged model, see
    research/inspect/): `features` sows the residual stream as `nnx.Intermediate`
    "residual" (the embeddings, then each block's output: L + 1 [B, T, D] arrays) and passes
    the embeddings through `perturb("embeddings")`, so `nnx.capture` reads them and a
    gradient with respect to them. Remat is skipped while anything is captured. Off, nothing
    is stored.
    """

    def __init__(self, config: ModelConfig, *, rngs: nnx.Rngs):
        self.config = config
        self.capture_residual = False
        dtype = jnp.dtype(config.dtype)
        init = _initializer(config.init, config.init_std)
        quant = dict(quant=config.quant, quant_group=config.quant_group)
        self.embedding = Embedding(
            config.vocab_size, config.d_model, init=init, dtype=dtype, **quant, rngs=rngs
        )
        self.position_embedding = (
            LearnedPositions(config.max_seq_len, config.d_model, init=init, dtype=dtype, rngs=rngs)
            if config.positions == "learned"
            else None
        )
        self.layers = nnx.List([_block(config, rngs) for _ in range(config.num_layers)])
        self.final_norm = _norm(config, rngs)
        self.lm_head = (
            None
            if config.tie_embeddings
            else Dense(
                (config.d_model,),
                (config.vocab_size,),
                in_axes=("embed",),
                out_axes=("vocab",),
                use_bias=False,
                kernel_init=init,
                dtype=dtype,
                out_dtype=jnp.float32,
                **quant,
                rngs=rngs,
            )
        )
        if config.lora_rank:
            from research.model import lora

            lora.attach(self, config, rngs)

    def __call__(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
    ) -> jax.Array:
        """Next-token logits.

        Args:
          tokens_bt: [B, T] int token ids.
          positions_bt: [B, T] int positions (restarting at 0 per packed document); default
            arange(T) for every row.
          segment_ids_bt: [B, T] int document ids of packed rows, 0 = padding; default all ones
            (one document per row). Tokens attend only within their own document.

        Returns:
          [B, T, V] float32 logits.
        """
        x_btd = self.features(tokens_bt, positions_bt=positions_bt, segment_ids_bt=segment_ids_bt)
        return self.unembed(x_btd)

    def features(
        self,
        tokens_bt: jax.Array,
        *,
        positions_bt: jax.Array | None = None,
        segment_ids_bt: jax.Array | None = None,
    ) -> jax.Array:
        """The final hidden states, before `unembed`: [B, T, D] compute dtype (arguments as
        `__call__`). Scoring long windows unembeds them a chunk at a time."""
        b, t = tokens_bt.shape
        if segment_ids_bt is None:
            segment_ids_bt = jnp.ones((b, t), jnp.int32)
        if t > LONG_SEQUENCE:
            mask_bts = Segments(segment_ids_bt)
        else:
            mask_bts = make_attention_mask(segment_ids_bt)
        x_btd = self.embed(tokens_bt, positions_bt)
        if self.capture_residual:
            x_btd = self.perturb("embeddings", x_btd)
            self.sow(nnx.Intermediate, "residual", x_btd)
        if positions_bt is None:
            positions_bt = jnp.broadcast_to(jnp.arange(t, dtype=jnp.int32), (b, t))

        def run_block(block, x_btd, positions_bt, mask_bts):
            return block(x_btd, positions_bt, mask_bts)

        # nnx.remat would hide what is sown and perturbed inside it; inspection needs no remat.
        capturing = self.capture_residual or any(b.attention.capture_weights for b in self.layers)
        if self.config.remat != "none" and not capturing:
            run_block = nnx.remat(run_block, policy=_REMAT_POLICIES[self.config.remat])
        for block in self.layers:
            x_btd = run_block(block, x_btd, positions_bt, mask_bts)
            if self.capture_residual:
                self.sow(nnx.Intermediate, "residual", x_btd)
        return x_btd

    def embed(self, tokens_bt: jax.Array, positions_bt: jax.Array | None = None) -> jax.Array:
        """Token (+ learned position) embeddings: [B, T] ints -> [B, T, D] compute dtype.

        positions_bt: [B, T] int, or None for arange(T) (a slice of the table, no gather).
        """
        x_btd = self.embedding(tokens_bt)
        if self.position_embedding is not None:
            if positions_bt is None:
                x_btd = x_btd + self.position_embedding.prefix(tokens_bt.shape[1])
            else:
                x_btd = x_btd + self.position_embedding(positions_bt)
        return constrain(x_btd, _ACTIVATION_AXES)

    def unembed(self, x_btd: jax.Array) -> jax.Array:
        """Final norm and LM head (tied or not): [B, T, D] compute dtype -> [B, T, V] float32."""
        x_btd = self.final_norm(x_btd)
        if self.lm_head is None:
            logits_btv = self.embedding.attend(x_btd)
        else:
            logits_btv = self.lm_head(x_btd)
        return constrain(logits_btv, ("batch", "seq", "vocab"))


def count_params(config: ModelConfig) -> int:
    """Number of parameters of Decoder(config), from shapes only (nothing is allocated)."""
    abstract = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(nnx.state(abstract, nnx.Param)))


def flops_per_token(config: ModelConfig, seq_len: int) -> float:
    """Training FLOPs per token: 6 N + 12 L (N_heads H) T (nanoGPT / PaLM appendix B).

    N counts the parameters used in matmuls: all but the learned position table and, when the
    LM head is untied, the input embedding (a lookup). Attention (QK^T and AV, forward and
    backward) is counted over the full T x T square, no causal discount. For GPT-2-style
    configs N H = D and this is exactly refsmall.train_flops_per_token.
    """
    n = count_params(config)
    if config.positions == "learned":
        n -= config.max_seq_len * config.d_model
    if not config.tie_embeddings:
        n -= config.vocab_size * config.d_model
    attention_dim = config.num_heads * config.resolved_head_dim
    return float(6 * n + 12 * config.num_layers * attention_dim * seq_len)
