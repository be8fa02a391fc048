"""XLA_FLAGS for the test processes: tests/conftest.py sets them for the suite, and a test
that starts a subprocess with another CPU device count passes `with_devices(n)`."""

FAST_COMPILE = "--xla_backend_optimization_level=0"


def with_devices(count: int) -> str:
    """The suite's XLA_FLAGS with `count` forced CPU devices."""
    return f"{FAST_COMPILE} --xla_force_host_platform_device_count={count}"
