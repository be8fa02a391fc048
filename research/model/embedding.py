"""Token embedding, and the tied LM head that reuses it."""

import jax
import jax.numpy as jnp
from flax import nnx

from research.compression.quantize import QuantSpec, dequantize, qdot
from research.model.parameter import param


class Embedding(nnx.Module):
    """A [V, D] float32 table, logical ("vocab", "embed").

    Args:
      vocab_size: V.
      dim: D.
      init: initializer of the table.
      dtype: compute dtype of the looked-up vectors and of the `attend` matmul.
      quant, quant_group: "int8" / "int4" / "int4_asym" store the table quantized and
        transposed, [D, V] (`embedding_q` [D / L, V, 4], `scale`, int4_asym's `min`;
        research/compression/quantize.py): `attend` is the quantized matmul and a lookup reads
        one column per token.

    A float32 table may be packed by the Sampler as the tied head's kernel [D, V] in column
    panels, [V / 32, D, 32] (research/serving/core/packed.py): lookups then gather row v from
    panel v // 32 and `attend` is the packed matmul.
    """

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        *,
        init: nnx.Initializer,
        dtype=jnp.float32,
        quant: str = "none",
        quant_group: int = 32,
        rngs: nnx.Rngs,
    ):
        self.dtype = dtype
        self.quant = None
        if quant == "none":
            self.embedding = param(init, (vocab_size, dim), ("vocab", "embed"), rngs=rngs)
            return
        self.quant = QuantSpec.of(quant, quant_group, dim)
        self.embedding_q = param(
            nnx.initializers.zeros,
            (dim // self.quant.per_word, vocab_size, 4),
            (None, "vocab", None),
            rngs=rngs,
            dtype=self.quant.dtype,
        )
        groups = (dim // self.quant.group, vocab_size)
        self.scale = param(
            nnx.initializers.ones, groups, (None, "vocab"), rngs=rngs, dtype=self.quant.scale_dtype
        )
        # int4_asym: Q4_1's min per group, float16 as the scale.
        self.min = (
            param(nnx.initializers.zeros, groups, (None, "vocab"), rngs=rngs, dtype=jnp.float16)
            if self.quant.asym
            else None
        )

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        """tokens: [B, T] int in [0, V) -> [B, T, D] compute dtype."""
        if self.quant is not None:
            flat = tokens_bt.reshape(-1)
            q_km = jnp.take(self.embedding_q[...], flat, axis=1, mode="clip")
            scale_gm = jnp.take(self.scale[...], flat, axis=1, mode="clip")
            min_gm = (
                None if self.min is None else jnp.take(self.min[...], flat, axis=1, mode="clip")
            )
            x_md = dequantize(q_km, scale_gm, self.quant, min_gm).T
            return x_md.reshape(*tokens_bt.shape, -1).astype(self.dtype)
        table = self.embedding[...]
        if table.ndim == 3:  # Packed for decode: row v is table[v // 32, :, v % 32].
            panel = table.shape[2]
            flat = jnp.clip(tokens_bt.reshape(-1), 0, table.shape[0] * panel - 1)
            x_md = table[flat // panel, :, flat % panel]
            return x_md.reshape(*tokens_bt.shape, -1).astype(self.dtype)
        # Gather, then cast: casting the whole [V, D] table first would touch all of it.
        return jnp.take(table, tokens_bt, axis=0, mode="clip").astype(self.dtype)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        """Logits against the table (tied LM head): x [B, T, D] compute dtype -> [B, T, V] f32."""
        if self.quant is not None:
            b, t, d = x_btd.shape
            minimum = None if self.min is None else self.min[...]
            logits = qdot(
                x_btd.reshape(b * t, d), self.embedding_q[...], self.scale[...], self.quant, minimum
            )
            return logits.reshape(b, t, -1)
        table = self.embedding[...]
        if table.ndim == 3:
            # Packed by the Sampler for decode as the head kernel [D, V] in column panels,
            # [V / 32, D, 32] (research/serving/core/packed.py): the same bytes, read at the
            # other dots' bandwidth and, with several rows, at twice XLA's rate.
            from research.serving.core import packed

            b, t, d = x_btd.shape
            return packed.dot(x_btd.reshape(b * t, d), table).reshape(b, t, -1)
        table_vd = table.astype(self.dtype)
        return jnp.einsum("btd,vd->btv", x_btd, table_vd, preferred_element_type=jnp.float32)
