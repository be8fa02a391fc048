"""The C++ quantized matmul (qmatmul.cc) behind jax.ffi, and its pure-JAX reference.

`make kernels` builds research/compression/_build/libcirrus_qmatmul.so (every make target
that runs Python depends on it). Without it, `available()` is False (with one warning) and
quantized models dequantize before XLA's dot: correct, but slower than float32 on CPU.
The kernel runs on CPU only; quantize.qdot picks it or the reference per platform.
"""

import ctypes
import functools
import logging
import os

import jax
import jax.numpy as jnp

from research.compression import quantize as qz

LIBRARY = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_build", "libcirrus_qmatmul.so")
TARGET = "cirrus_qmatmul"
ISAS = {"scalar": 0, "avx2": 2, "avx512": 512}  # The kernel's code paths, by its numbers.


@functools.cache
def _library():
    if not os.path.exists(LIBRARY):
        logging.warning(
            "%s is missing: quantized models will dequantize before each matmul (slow on "
            "CPU); build the kernel with `make kernels`.",
            LIBRARY,
        )
        return None
    library = ctypes.cdll.LoadLibrary(LIBRARY)
    jax.ffi.register_ffi_target(TARGET, jax.ffi.pycapsule(library.CirrusQMatmul), platform="cpu")
    return library


def available() -> bool:
    return _library() is not None


def isa() -> str:
    """The code path in use: "avx512", "avx2" or "scalar" (the best this CPU has, unless
    CIRRUS_QMATMUL_ISA or use_isa chose another); "none" without the library."""
    library = _library()
    if library is None:
        return "none"
    return {number: name for name, number in ISAS.items()}[library.cirrus_qmatmul_isa()]


def use_isa(name: str) -> bool:
    """Switches later calls to the path `name` (tests); False if this CPU lacks it."""
    return _library().cirrus_qmatmul_set_isa(ISAS[name]) == ISAS[name]


def qmatmul(x_mk, q, scale, *, bits: int, group: int):
    """x [M, K] f32, q [K / L, N, 4] and scale [K / group, N] (quantize.py's form) -> [M, N]
    f32. CPU only."""
    if _library() is None:
        raise RuntimeError(f"{LIBRARY} is missing; build it with `make kernels`.")
    m, n = x_mk.shape[0], scale.shape[-1]
    call = jax.ffi.ffi_call(TARGET, jax.ShapeDtypeStruct((m, n), jnp.float32))
    return call(
        x_mk.astype(jnp.float32), q, scale.astype(jnp.float32), bits=int(bits), group=int(group)
    )


def qmatmul_reference(x_mk, q, scale, *, bits: int, group: int):
    """What qmatmul computes, in jax.numpy: dequantize to f32, then a full-precision dot."""
    w_kn = qz.dequantize(jnp.asarray(q), jnp.asarray(scale), qz.QuantSpec(bits, group))
    return jnp.dot(x_mk.astype(jnp.float32), w_kn, precision=jax.lax.Precision.HIGHEST)
