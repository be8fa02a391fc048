"""Token embedding, and the tied LM head that reuses it."""

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.parameter import param


class Embedding(nnx.Module):
    """A [V, D] float32 table, logical ("vocab", "embed").

    Args:
      vocab_size: V.
      dim: D.
      init: initializer of the table.
      dtype: compute dtype of the looked-up vectors and of the `attend` matmul.
    """

    def __init__(
        self, vocab_size: int, dim: int, *, init: nnx.Initializer, dtype=jnp.float32, rngs: nnx.Rngs
    ):
        self.dtype = dtype
        self.embedding = param(init, (vocab_size, dim), ("vocab", "embed"), rngs=rngs)

    def __call__(self, tokens_bt: jax.Array) -> jax.Array:
        """tokens: [B, T] int in [0, V) -> [B, T, D] compute dtype."""
        # Gather, then cast: casting the whole [V, D] table first would touch all of it.
        return jnp.take(self.embedding[...], tokens_bt, axis=0, mode="clip").astype(self.dtype)

    def attend(self, x_btd: jax.Array) -> jax.Array:
        """Logits against the table (tied LM head): x [B, T, D] compute dtype -> [B, T, V] f32."""
        table_vd = self.embedding[...].astype(self.dtype)
        return jnp.einsum("btd,vd->btv", x_btd, table_vd, preferred_element_type=jnp.float32)
