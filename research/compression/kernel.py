"""The C++ quantized matmul (qmatmul.cc) behind jax.ffi, and its pure-JAX reference.

`make kernels` builds research/compression/_build/libcirrus_qmatmul.so (every make target
that runs Python depends on it). Without it, `available()` is False (with one warning) and
quantized models dequantize before XLA's dot: correct, but slower than float32 on CPU.
"""

import os

import jax
import jax.numpy as jnp

from research import ffi

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build", "libcirrus_qmatmul.so")
TARGET = "cirrus_qmatmul"
TARGET_ASYM = "cirrus_qmatmul_asym"  # int4_asym: float16 scale and min per group.


KERNEL = ffi.Kernel(
    LIBRARY,
    {TARGET: "CirrusQMatmul", TARGET_ASYM: "CirrusQMatmulAsym"},
    "quantized models will dequantize before each matmul (slow on CPU)",
    "cirrus_qmatmul_isa",
)
available, isa = KERNEL.available, KERNEL.isa


def qmatmul(x_mk, q, scale, minimum=None, *, bits: int, group: int):
    """x [M, K] f32 -> [M, N] f32 against the quantized [K, N] matrix (quantize.py's form):
    q [K / L, N, 4], scale [K / group, N] (float32), or for int4_asym (minimum given) scale
    and minimum [K / group, N] float16."""
    if not available():
        raise RuntimeError(f"{LIBRARY} is missing; build it with `make kernels`.")
    m, n = x_mk.shape[0], scale.shape[-1]
    out = jax.ShapeDtypeStruct((m, n), jnp.float32)
    x_mk = x_mk.astype(jnp.float32)
    if minimum is None:
        call = jax.ffi.ffi_call(TARGET, out)
        return call(x_mk, q, scale.astype(jnp.float32), bits=int(bits), group=int(group))
    if bits != 4:
        raise ValueError(f"a min per group is an int4 form; got bits={bits}.")
    call = jax.ffi.ffi_call(TARGET_ASYM, out)
    return call(x_mk, q, scale.astype(jnp.float16), minimum.astype(jnp.float16), group=int(group))
