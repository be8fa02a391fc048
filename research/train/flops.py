"""Peak FLOP/s for MFU: known accelerator peaks, or a matmul measured in-process on CPU."""

import time

import jax
import jax.numpy as jnp

# Dense bf16 peaks per chip (vendor figures), used when the device kind matches.
_KNOWN_PEAKS = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,
    "TPU v5e": 197e12,
    "TPU v5p": 459e12,
    "TPU v6 lite": 918e12,
    "TPU v6e": 918e12,
    "NVIDIA H100": 989e12,
    "NVIDIA H200": 989e12,
    "NVIDIA A100": 312e12,
}


def measure_matmul_peak(size: int = 2048, repeats: int = 3, dtype=jnp.float32) -> float:
    """Best FLOP/s of a jitted [size, size] @ [size, size] matmul on the first device."""
    device = jax.local_devices()[0]
    a = jax.device_put(jnp.ones((size, size), dtype), device)
    matmul = jax.jit(lambda x: x @ x)
    matmul(a).block_until_ready()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a).block_until_ready()
        times.append(time.perf_counter() - start)
    return 2 * size**3 / min(times)


def peak_flops_per_device(configured: float = 0.0) -> float:
    """The configured value, else the device kind's known peak, else a measured matmul peak."""
    if configured > 0:
        return configured
    kind = jax.devices()[0].device_kind
    for name, peak in _KNOWN_PEAKS.items():
        if kind.startswith(name):
            return peak
    return measure_matmul_peak()
