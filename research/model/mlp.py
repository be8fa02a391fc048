"""Feed-forward blocks: SwiGLU (Llama) and GELU-tanh (GPT-2)."""

import jax
import jax.numpy as jnp
from flax import nnx

from research.model.dense import Dense


def _into_mlp(dim, mlp_dim, kernel_init, **common) -> Dense:
    """[D] -> [F], logical ("embed", "mlp")."""
    return Dense(
        (dim,), (mlp_dim,), in_axes=("embed",), out_axes=("mlp",), kernel_init=kernel_init, **common
    )


def _out_of_mlp(dim, mlp_dim, out_init, **common) -> Dense:
    """[F] -> [D], logical ("mlp", "embed"): a residual projection."""
    return Dense(
        (mlp_dim,), (dim,), in_axes=("mlp",), out_axes=("embed",), kernel_init=out_init, **common
    )


class SwiGLU(nnx.Module):
    """down(silu(gate(x)) * up(x)) (Shazeer 2020, "GLU Variants Improve Transformer").

    Args:
      dim: D. mlp_dim: F.
      use_bias: biases on all three projections.
      kernel_init: initializer of gate and up [D, F], logical ("embed", "mlp").
      out_init: initializer of down [F, D], logical ("mlp", "embed") (a residual projection).
      dtype: compute dtype.
    """

    def __init__(
        self,
        dim: int,
        mlp_dim: int,
        *,
        use_bias: bool,
        kernel_init: nnx.Initializer,
        out_init: nnx.Initializer,
        dtype=jnp.float32,
        quant: str = "none",
        quant_group: int = 32,
        rngs: nnx.Rngs,
    ):
        common = dict(
            use_bias=use_bias, dtype=dtype, quant=quant, quant_group=quant_group, rngs=rngs
        )
        self.gate_proj = _into_mlp(dim, mlp_dim, kernel_init, **common)
        self.up_proj = _into_mlp(dim, mlp_dim, kernel_init, **common)
        self.down_proj = _out_of_mlp(dim, mlp_dim, out_init, **common)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        """x: [B, T, D] compute dtype -> [B, T, D] compute dtype."""
        hidden_btf = jax.nn.silu(self.gate_proj(x_btd)) * self.up_proj(x_btd)
        return self.down_proj(hidden_btf)


class GeluMLP(nnx.Module):
    """proj(gelu_tanh(fc(x))) (GPT-2; the tanh approximation of Hendrycks & Gimpel 2016).

    Args:
      dim: D. mlp_dim: F.
      use_bias: biases on both projections.
      kernel_init: initializer of fc [D, F], logical ("embed", "mlp").
      out_init: initializer of proj [F, D], logical ("mlp", "embed") (a residual projection).
      dtype: compute dtype.
    """

    def __init__(
        self,
        dim: int,
        mlp_dim: int,
        *,
        use_bias: bool,
        kernel_init: nnx.Initializer,
        out_init: nnx.Initializer,
        dtype=jnp.float32,
        quant: str = "none",
        quant_group: int = 32,
        rngs: nnx.Rngs,
    ):
        common = dict(
            use_bias=use_bias, dtype=dtype, quant=quant, quant_group=quant_group, rngs=rngs
        )
        self.fc = _into_mlp(dim, mlp_dim, kernel_init, **common)
        self.proj = _out_of_mlp(dim, mlp_dim, out_init, **common)

    def __call__(self, x_btd: jax.Array) -> jax.Array:
        """x: [B, T, D] compute dtype -> [B, T, D] compute dtype."""
        return self.proj(jax.nn.gelu(self.fc(x_btd), approximate=True))
