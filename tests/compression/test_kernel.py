"""The C++ quantized matmul against NumPy and its jax.numpy reference, on odd shapes, for
every instruction-set path this CPU has."""

import ctypes
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.compression import kernel
from research.compression import quantize as qz

pytestmark = pytest.mark.skipif(not kernel.available(), reason="kernel not built (make kernels)")

# (M, K, N): one row and many (17 > a block of 4 rows), K of one word row and many, N not a
# multiple of any block width, and a head-like N that splits over threads.
SHAPES = [(1, 8, 1), (2, 24, 7), (3, 136, 63), (5, 64, 65), (17, 64, 577), (5, 576, 192)]
SHAPES += [(2, 1536, 33), (1, 576, 1536), (4, 128, 5000)]
# (bits, group): None = one scale per column (group = K).
FORMS = [(8, None), (8, 8), (4, 8), (4, 32), (4, None)]
qmatmul = jax.jit(kernel.qmatmul, static_argnames=("bits", "group"))
reference = jax.jit(kernel.qmatmul_reference, static_argnames=("bits", "group"))


def _cases(seed: int = 0):
    """(x, q, scale, bits, group, float64 NumPy product) over SHAPES x FORMS."""
    rng = np.random.default_rng(seed)
    for bits, group in FORMS:
        for m, k, n in SHAPES:
            spec = qz.QuantSpec(bits, group or k)
            if k % spec.group:
                continue
            # Every int level and a scale per group (quantize_int8 makes one per column only).
            low, high = (-127, 128) if bits == 8 else (-8, 8)
            q = qz.pack(rng.integers(low, high, size=(k, n)), bits)
            scale = rng.uniform(0.5, 2.0, size=(k // spec.group, n)).astype(np.float32)
            x = rng.normal(size=(m, k)).astype(np.float32)
            expected = x.astype(np.float64) @ qz.dequantize(q, scale, spec).astype(np.float64)
            yield x, q, scale, spec.bits, spec.group, expected


def _relative_error(got, expected) -> float:
    return float(np.abs(np.asarray(got) - expected).max() / np.abs(expected).max())


@pytest.fixture(params=list(kernel.ISAS))
def isa(request):
    """Each path in turn (in this process: the choice is read at every call)."""
    chosen = kernel.isa()
    if not kernel.use_isa(request.param):
        pytest.skip(f"this CPU lacks {request.param}")
    yield request.param
    kernel.use_isa(chosen)


def test_kernel_matches_numpy_and_reference_on_odd_shapes(isa):
    assert kernel.isa() == isa
    for x, q, scale, bits, group, expected in _cases():
        got = qmatmul(x, q, scale, bits=bits, group=group)
        assert got.shape == expected.shape and got.dtype == jnp.float32
        assert _relative_error(got, expected) < 1e-5, (isa, bits, group, x.shape, scale.shape)
        oracle = reference(x, q, scale, bits=bits, group=group)
        assert _relative_error(oracle, expected) < 1e-5


def test_isa_is_chosen_by_cpu_or_environment():
    """CIRRUS_QMATMUL_ISA forces a path the CPU has; without it, the best one."""
    best = [name for name in ("avx512", "avx2") if kernel.use_isa(name)] or ["scalar"]
    kernel.use_isa(best[0])
    code = "import ctypes, sys; print(ctypes.CDLL(sys.argv[1]).cirrus_qmatmul_isa())"
    for forced, expected in [("", best[0]), ("scalar", "scalar"), ("bogus", best[0])]:
        env = {**os.environ, "CIRRUS_QMATMUL_ISA": forced}
        out = subprocess.run(
            [sys.executable, "-c", code, kernel.LIBRARY], env=env, capture_output=True, text=True
        )
        assert out.returncode == 0, out.stderr
        assert int(out.stdout) == kernel.ISAS[expected], forced
    assert ctypes.CDLL(kernel.LIBRARY).cirrus_qmatmul_isa() == kernel.ISAS[best[0]]


def test_stored_layout_round_trips():
    rng = np.random.default_rng(2)
    for bits, low, high in [(8, -127, 128), (4, -8, 8)]:
        q = rng.integers(low, high, size=(16, 5))
        stored = qz.pack(q, bits)
        assert stored.shape == (16 * bits // 32, 5, 4)
        np.testing.assert_array_equal(qz.unpack(stored, bits), q)
        np.testing.assert_array_equal(np.asarray(qz.unpack(jnp.asarray(stored), bits)), q)
    # int8: byte j of word (w, n) is row 4w + j; int4: nibble j (bits 4j) is row 8w + j.
    q8 = np.arange(8 * 3).reshape(8, 3) - 12
    assert qz.pack(q8, 8)[1, 2, 3] == q8[7, 2]
    q4 = rng.integers(-8, 8, size=(8, 2))
    word = int.from_bytes(qz.pack(q4, 4)[0, 1].tobytes(), "little")
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == list(q4[:, 1] + 8)


def test_compiled_decode_matmul_reads_the_int8_weight_in_place():
    """No f32 copy of the weight in the compiled program (XLA's convert-then-dot makes one)."""
    k, n = 576, 1536
    spec = qz.QuantSpec(8, k)
    q, scale = qz.quantize(np.random.default_rng(3).normal(size=(k, n)).astype(np.float32), spec)
    fn = jax.jit(lambda x, q, s: qz.qdot(x, q, s, spec))
    compiled = fn.lower(jnp.ones((1, k)), q, scale).compile()
    assert "cirrus_qmatmul" in compiled.as_text()
    assert compiled.memory_analysis().temp_size_in_bytes < k * n  # Not even an int8 copy.
    x = np.random.default_rng(4).normal(size=(1, k)).astype(np.float32)
    expected = x @ qz.dequantize(q, scale, spec)
    np.testing.assert_allclose(np.asarray(fn(x, q, scale)), expected, rtol=1e-4, atol=1e-4)
