"""The decoder-only transformer: one `Decoder`, families chosen by `ModelConfig` values.

Dimension letters, used as name suffixes and einsum letters everywhere in research/:
  B batch, T query length, S key length, D model (d_model), F mlp (mlp_dim),
  N query heads, K key/value heads, G = N / K (query heads per kv head), H head dim,
  V vocab.
E.g. `q_btnh` is a [B, T, N, H] array and `mask_bts` a [B, T, S] boolean array.

Parameters are float32 and carry logical axis names ("embed", "mlp", "heads", "kv_heads",
"head_dim", "vocab"); research/sharding.py maps them onto the mesh. Activations are cast to
the compute dtype (`ModelConfig.dtype`) at use.
"""

from research.model.attention import (
    Attention,
    Segments,
    attention_with_weights,
    causal_attention,
    dot_product_attention,
    make_attention_mask,
)
from research.model.config import ModelConfig
from research.model.dense import Dense
from research.model.embedding import Embedding
from research.model.mlp import GeluMLP, SwiGLU
from research.model.norm import LayerNorm, RMSNorm
from research.model.positional import LearnedPositions, apply_rope
from research.model.transformer import Block, Decoder, count_params, flops_per_token

__all__ = [
    "Attention",
    "Block",
    "Decoder",
    "Dense",
    "Embedding",
    "GeluMLP",
    "LayerNorm",
    "LearnedPositions",
    "ModelConfig",
    "RMSNorm",
    "Segments",
    "SwiGLU",
    "apply_rope",
    "attention_with_weights",
    "causal_attention",
    "count_params",
    "dot_product_attention",
    "flops_per_token",
    "make_attention_mask",
]
