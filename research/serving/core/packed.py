"""Dense kernels packed in column panels for decode on CPU, and their matmul (packed_matmul.cc
behind jax.ffi).

A Dense kernel [*in, *out] is viewed as [K, N] and stored as [N / 32, K, 32]: panel b holds
columns 32b .. 32b + 31 for every k, one contiguous run of memory. The Sampler packs its
parameters once at load (`pack_params`) when it runs float32 on one CPU device with the
library built; the same bytes as before, no second copy. A tied LM head's [V, D] embedding
table is packed as the head kernel [D, V], [V / 32, D, 32]: SmolLM2's 49,152 x 576 head at
16 rows took 12.3 ms through XLA's dot, 5.8 ms packed, and a lookup gathers row v from panel
v // 32. Dense layers (and Embedding) then see a kernel whose shape is not the natural one and
call `dot`: the C++ kernel on CPU, for a decode step's few rows and a prefill chunk's many
alike (as fast as XLA's dot on the unpacked kernel at 128 rows; XLA's einsum over the panels
was 1.7x slower there), XLA's einsum elsewhere.

`make kernels` builds research/serving/core/_build/libcirrus_packed.so; without it, on a
CPU without AVX-512 (or with CIRRUS_PACKED=0) nothing is packed.
"""

import math
import os

import jax
import jax.numpy as jnp
from flax import nnx

from research import ffi

HERE = os.path.dirname(os.path.abspath(__file__))
LIBRARY = os.path.join(HERE, "_build", "libcirrus_packed.so")
TARGET = "cirrus_packed_matmul"
PANEL = 32  # Columns per panel (packed_matmul.cc's kPanel).


KERNEL = ffi.Kernel(
    LIBRARY,
    {TARGET: "CirrusPackedMatmul"},
    "decode steps use XLA's dot on unpacked weights (slower with several rows)",
    "cirrus_packed_isa",
    off_variable="CIRRUS_PACKED",
)
available, isa = KERNEL.available, KERNEL.isa


def pack(kernel_kn: jax.Array) -> jax.Array:
    """[K, N] -> [N / PANEL, K, PANEL] (N a multiple of PANEL)."""
    k, n = kernel_kn.shape
    return jnp.transpose(kernel_kn.reshape(k, n // PANEL, PANEL), (1, 0, 2))


def unpack(packed_bkp: jax.Array) -> jax.Array:
    """[N / PANEL, K, PANEL] -> [K, N]."""
    b, k, p = packed_bkp.shape
    return jnp.transpose(packed_bkp, (1, 0, 2)).reshape(k, b * p)


def reference(x_mk, packed_bkp):
    """x [M, K] @ the packed [K, N] with XLA's dot -> [M, N] float32."""
    y_mbp = jnp.einsum("mk,bkp->mbp", x_mk, packed_bkp, preferred_element_type=jnp.float32)
    return y_mbp.reshape(x_mk.shape[0], -1)


def _kernel_call(x_mk, packed_bkp):
    out = jax.ShapeDtypeStruct((x_mk.shape[0], packed_bkp.shape[0] * PANEL), jnp.float32)
    return jax.ffi.ffi_call(TARGET, out)(x_mk, packed_bkp)


def dot(x_mk, packed_bkp):
    """x [M, K] float32 @ the packed kernel -> [M, N] float32: the C++ kernel on CPU on one
    device, XLA's einsum otherwise."""
    mesh = jax.sharding.get_abstract_mesh()
    if not available() or (not mesh.empty and mesh.size > 1):
        return reference(x_mk, packed_bkp)
    return jax.lax.platform_dependent(
        x_mk.astype(jnp.float32), packed_bkp, cpu=_kernel_call, default=reference
    )


def is_packed(dense) -> bool:
    """Whether a Dense layer's float kernel is in the packed form."""
    kernel = getattr(dense, "kernel", None)
    natural = (*dense.in_features, *dense.out_features)
    return kernel is not None and tuple(kernel.shape) != natural


def _packable(dense) -> bool:
    if dense.quant is not None or dense.lora_a is not None:  # Quantized: no float kernel.
        return False
    if dense.kernel.dtype != jnp.float32 or is_packed(dense):
        return False
    k, n = math.prod(dense.in_features), math.prod(dense.out_features)
    # A packed shape that happens to equal the natural one could not be told apart.
    return n % PANEL == 0 and (n // PANEL, k, PANEL) != (*dense.in_features, *dense.out_features)


def should_pack(model_config, mesh) -> bool:
    """Pack for decode: float32 compute, the CPU backend, one device, the library built with
    its AVX-512 loop usable on this CPU. The portable loop is there for correctness only: with
    16-128 rows it ran 2-3.5x slower than XLA's dot on the unpacked kernels (30-layer SmolLM2
    dot chain at 16 rows 80-130 ms vs 39-42; AVX-512 26-29), so a CPU without AVX-512 keeps
    XLA's."""
    if model_config.dtype != "float32" or jax.default_backend() != "cpu":
        return False
    if mesh is not None and mesh.size > 1:
        return False
    return available() and isa() == "avx512"


def _packable_head(decoder) -> bool:
    """A tied LM head: the float32 [V, D] embedding table, V a multiple of PANEL."""
    if decoder.lm_head is not None or decoder.embedding.quant is not None:
        return False
    table = decoder.embedding.embedding[...]
    return table.ndim == 2 and table.dtype == jnp.float32 and table.shape[0] % PANEL == 0


def pack_params(graphdef, params):
    """(graphdef, params) of a model with every packable Dense kernel packed ([K, N] viewed,
    then [N / PANEL, K, PANEL]), and a tied head's [V, D] table packed as the kernel [D, V]
    ([V / PANEL, D, PANEL]); kernels already packed, quantized or with LoRA stay."""
    from research.model.dense import Dense
    from research.model.transformer import Decoder

    model = nnx.merge(graphdef, params)
    for _, module in nnx.iter_graph(model):
        if isinstance(module, Dense) and _packable(module):
            k = math.prod(module.in_features)
            kernel = module.kernel[...]
            module.kernel.value = pack(kernel.reshape(k, -1))
        elif isinstance(module, Decoder) and _packable_head(module):
            table = module.embedding.embedding
            table.value = pack(table[...].T)
    return nnx.split(model, nnx.Param)
