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
        self.in_features, self.out_features = tuple(in_features), tuple(out_features)
        self.in_axes, self.out_axes = tuple(in_axes), tuple(out_axes)
        self.lora_a = self.lora_b = nnx.data(None)
        self.lora_scale, self.lora_dropout, self.lora_index = 0.0, 0.0, 0
        self.lora_key = None  # Set per train step (research/model/lora.py) to drop out.

    def add_lora(self, rank: int, alpha: float, dropout: float, index: int, *, rngs: nnx.Rngs):
        """Adds a LoRA adapter: y += (alpha / rank) * dropout(x) A B, with A [*in, r] drawn as
        PEFT's (Kaiming-uniform, bound 1 / sqrt(fan_in)) and B [r, *out] zero, so the model is
        unchanged until B trains. Both are nnx.LoRAParam (float32), the trainer's only
        trainable leaves. `index` makes each adapter's dropout mask its own."""
        in_shape, out_shape = self.in_features, self.out_features
        bound = 1 / math.sqrt(math.prod(in_shape))
        uniform = nnx.initializers.uniform(2 * bound)  # [0, 2 bound), shifted below.

        def init_a(key, shape, dtype):
            return uniform(key, shape, dtype) - bound

        lora = dict(rngs=rngs, kind=nnx.LoRAParam)
        self.lora_a = param(init_a, (*in_shape, rank), (*self.in_axes, None), **lora)
        self.lora_b = param(
            nnx.initializers.zeros, (rank, *out_shape), (None, *self.out_axes), **lora
        )
        self.lora_scale, self.lora_dropout, self.lora_index = alpha / rank, dropout, index

    def _lora(self, x: jax.Array) -> jax.Array:
        """The adapter's term, [..., *out] in out_dtype."""
        if self.lora_dropout and self.lora_key is not None:
            key = jax.random.fold_in(self.lora_key, self.lora_index)
            keep = jax.random.bernoulli(key, 1 - self.lora_dropout, x.shape)
            x = jnp.where(keep, x / (1 - self.lora_dropout), 0).astype(x.dtype)
        contract = tuple(range(x.ndim - self.num_in, x.ndim))
        h = jax.lax.dot_general(
            x,
            self.lora_a[...].astype(self.dtype),
            ((contract, tuple(range(self.num_in))), ((), ())),
        )
        y = jax.lax.dot_general(
            h, self.lora_b[...].astype(self.dtype), (((h.ndim - 1,), (0,)), ((), ()))
        )
        return (self.lora_scale * y).astype(self.out_dtype)

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
            return y if self.lora_a is None else y + self._lora(x)
        kernel = self.kernel[...].astype(self.dtype)
        if kernel.shape != (*self.in_features, *self.out_features):
            # Packed in column panels by the Sampler for decode (research/serving/core/packed.py).
            from research.serving.core import packed

            lead = x.shape[: x.ndim - self.num_in]
            y_mn = packed.dot(x.reshape(math.prod(lead), -1), kernel)
            y = y_mn.reshape(*lead, *self.out_features).astype(self.out_dtype)
            if self.bias is not None:
                y = y + self.bias[...].astype(self.out_dtype)
            return y
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
        return y if self.lora_a is None else y + self._lora(x)
