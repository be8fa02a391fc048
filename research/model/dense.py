"""A dense projection that contracts the trailing axes of x with the leading axes of a kernel."""

import math

import jax
import jax.numpy as jnp
from flax import nnx

from research.compression.quantize import QuantSpec, qdot
from research.model.parameter import param


class Dense(nnx.Module):
    """y[..., out] = sum over in of x[..., in] * kernel[in, out] (+ bias[out]).

    Multi-axis inputs and outputs ([D] -> [N, H], [N, H] -> [D]) keep heads as their own axis,
    so every layer is one dot_general with no transposes and each kernel axis has its own
    logical name for sharding.

    Args:
      in_features: sizes of the contracted trailing axes of x, e.g. (D,) or (N, H).
      out_features: sizes of the output axes, e.g. (F,) or (N, H).
      in_axes, out_axes: logical axis names of those kernel axes.
      use_bias: add a float32 bias of shape out_features (initialized to zero).
      kernel_init: initializer of the float32 kernel [*in_features, *out_features].
      dtype: compute dtype; the kernel and bias are cast to it at use.
      out_dtype: dtype of the result (the matmul accumulates into it); default `dtype`.
        The LM head uses float32 so that bfloat16 compute still gives float32 logits.
      quant: "none" (a float32 `kernel`), or "int8" / "int4" / "int4_asym": `kernel_q` and
        `scale` (and, for int4_asym, `min`) in the form research/compression/quantize.py
        defines (inference only).
      quant_group: k per int4 scale.
    """

    def __init__(
        self,
        in_features: tuple[int, ...],
        out_features: tuple[int, ...],
        *,
        in_axes: tuple[str | None, ...],
        out_axes: tuple[str | None, ...],
        use_bias: bool,
        kernel_init: nnx.Initializer,
        dtype=jnp.float32,
        out_dtype=None,
        quant: str = "none",
        quant_group: int = 32,
        rngs: nnx.Rngs,
    ):
        self.num_in = len(in_features)
        self.dtype = dtype
        self.out_dtype = dtype if out_dtype is None else out_dtype
        self.quant = None
        if quant == "none":
            self.kernel = param(
                kernel_init, (*in_features, *out_features), (*in_axes, *out_axes), rngs=rngs
            )
        else:
            spec = QuantSpec.of(quant, quant_group, math.prod(in_features))
            self.quant = spec
            # Stored k-interleaved, [K / L, *out, 4] (research/compression/quantize.py).
            self.kernel_q = param(
                nnx.initializers.zeros,
                (math.prod(in_features) // spec.per_word, *out_features, 4),
                (None, *out_axes, None),
                rngs=rngs,
                dtype=spec.dtype,
            )
            groups = (math.prod(in_features) // spec.group, *out_features)
            self.scale = param(
                nnx.initializers.ones, groups, (None, *out_axes), rngs=rngs, dtype=spec.scale_dtype
            )
            # int4_asym: Q4_1's min per group, float16 as the scale.
            self.min = (
                param(
                    nnx.initializers.zeros, groups, (None, *out_axes), rngs=rngs, dtype=jnp.float16
                )
                if spec.asym
                else None
            )
        self.bias = (
            param(nnx.initializers.zeros, out_features, out_axes, rngs=rngs) if use_bias else None
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        """x: [..., *in_features] compute dtype -> [..., *out_features] in out_dtype."""
        if self.quant is not None:
            lead = x.shape[: x.ndim - self.num_in]
            x_mk = x.reshape(math.prod(lead), -1)
            minimum = None if self.min is None else self.min[...]
            y_mn = qdot(x_mk, self.kernel_q[...], self.scale[...], self.quant, minimum)
            y = y_mn.reshape(*lead, *self.scale.shape[1:]).astype(self.out_dtype)
            if self.bias is not None:
                y = y + self.bias[...].astype(self.out_dtype)
            return y
        kernel = self.kernel[...].astype(self.dtype)
        contract_x = tuple(range(x.ndim - self.num_in, x.ndim))
        contract_kernel = tuple(range(self.num_in))
        y = jax.lax.dot_general(
            x,
            kernel,
            ((contract_x, contract_kernel), ((), ())),
            preferred_element_type=self.out_dtype,
        )
        if self.bias is not None:
            y = y + self.bias[...].astype(self.out_dtype)
        return y
