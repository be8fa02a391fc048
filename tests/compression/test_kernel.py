"""The C++ quantized matmul against NumPy, on odd shapes, for every instruction-set path."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from research.compression import kernel
from research.compression import quantize as qz

# No skip without the library: `make test` builds it, and a quantized model without it runs
# the slow dequantize path, which these tests exist to rule out.

# (M, K, N): one row and several, K of one word row and many, N not a multiple of 16.
SHAPES = [(1, 8, 1), (1, 64, 7), (3, 136, 65), (5, 576, 192), (17, 64, 577), (2, 1536, 33)]
# (bits, group, asym): int8 per channel and grouped, int4, int4_asym (float16 scale and min).
FORMS = [(8, None, False), (8, 8, False), (4, 8, False), (4, 32, False), (4, 8, True),
         (4, 32, True)]  # fmt: skip


def _weights(rng, k, n):
    """Normal weights off centre (asym's min matters), a constant column (scale 0) and one
    of range ~1e-4 (a float16 scale below 2^-14: subnormal, widened by both paths)."""
    w = rng.normal(0.3, 1.0, size=(k, n)).astype(np.float32)
    w[:, 0] = -0.75
    if n > 1:
        w[:, 1] *= 1e-4
    return w


def check_all_shapes(seed: int = 0) -> float:
    """Largest error of the kernel relative to float64 NumPy over SHAPES x FORMS."""
    rng = np.random.default_rng(seed)
    worst = 0.0
    for bits, group, asym in FORMS:
        for m, k, n in SHAPES:
            if bits == 4 and k % group:
                continue
            spec = qz.QuantSpec(bits, group or k, asym)
            q, scale, minimum = qz.quantize(_weights(rng, k, n), spec)
            x = rng.normal(size=(m, k)).astype(np.float32)
            w_kn = qz.dequantize(q, scale, spec, minimum).astype(np.float64)
            expected = x.astype(np.float64) @ w_kn
            fn = jax.jit(lambda *args, s=spec: kernel.qmatmul(*args, bits=s.bits, group=s.group))
            got = np.asarray(fn(x, q, scale) if minimum is None else fn(x, q, scale, minimum))
            assert got.shape == (m, n)
            # Per column, relative to the column's scale (the 1e-4 column must be right too).
            error = np.abs(got - expected).max(axis=0) / (np.abs(x) @ np.abs(w_kn)).max(axis=0)
            worst = max(worst, float(np.nan_to_num(error).max()))
    return worst


def test_kernel_matches_numpy_on_odd_shapes():
    assert kernel.available(), f"{kernel.LIBRARY} is missing: run `make kernels`"
    assert check_all_shapes() < 1e-5


@pytest.mark.parametrize("isa", ["scalar"])
def test_portable_path_matches_numpy(isa):
    """The path CPUs without AVX-512 take (forced: the choice is made once per process)."""
    code = (
        "from tests.compression.test_kernel import check_all_shapes; "
        "from research.compression import kernel; "
        "assert kernel.isa() == 'portable', kernel.isa(); print(check_all_shapes(1))"
    )
    env = {**os.environ, "CIRRUS_QMATMUL_ISA": isa, "JAX_PLATFORMS": "cpu"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-2000:]
    assert float(out.stdout.strip().splitlines()[-1]) < 1e-5


def test_stored_layout_round_trips():
    rng = np.random.default_rng(2)
    for bits, low, high, signed in [(8, -127, 128, True), (4, -8, 8, True), (4, 0, 16, False)]:
        q = rng.integers(low, high, size=(16, 5))
        stored = qz.pack(q, bits, signed=signed)
        assert stored.shape == (16 * bits // 32, 5, 4)
        np.testing.assert_array_equal(qz.unpack(stored, bits, signed=signed), q)
        back = qz.unpack(jnp.asarray(stored), bits, signed=signed)
        np.testing.assert_array_equal(np.asarray(back), q)
    # int8: byte j of word (w, n) is row 4w + j; int4: nibble j (bits 4j) is row 8w + j.
    q8 = np.arange(8 * 3).reshape(8, 3) - 12
    assert qz.pack(q8, 8)[1, 2, 3] == q8[7, 2]
    q4 = rng.integers(-8, 8, size=(8, 2))
    word = int.from_bytes(qz.pack(q4, 4)[0, 1].tobytes(), "little")
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == list(q4[:, 1] + 8)
    # int4_asym: the nibble is q itself.
    word = int.from_bytes(qz.pack(q4 + 8, 4, signed=False)[0, 1].tobytes(), "little")
    assert [(word >> (4 * j)) & 0xF for j in range(8)] == list(q4[:, 1] + 8)


@pytest.mark.parametrize(
    ("spec", "target"),
    [(qz.QuantSpec(8, 576), "cirrus_qmatmul"), (qz.QuantSpec(4, 32, True), "cirrus_qmatmul_asym")],
)
def test_compiled_decode_matmul_reads_the_weight_in_place(spec, target):
    """No f32 copy of the weight in the compiled program (XLA's convert-then-dot makes one)."""
    k, n = 576, 1536
    w = np.random.default_rng(3).normal(size=(k, n)).astype(np.float32)
    q, scale, minimum = qz.quantize(w, spec)
    fn = jax.jit(lambda x, q, s, m: qz.qdot(x, q, s, spec, m))
    compiled = fn.lower(jnp.ones((1, k)), q, scale, minimum).compile()
    assert f'{target}"' in compiled.as_text()
    # Not even a copy of the stored weight (int8: k * n bytes, int4: k * n / 2).
    assert compiled.memory_analysis().temp_size_in_bytes < q.nbytes
    x = np.random.default_rng(4).normal(size=(1, k)).astype(np.float32)
    expected = x @ qz.dequantize(q, scale, spec, minimum)
    got = np.asarray(fn(x, q, scale, minimum))
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)
