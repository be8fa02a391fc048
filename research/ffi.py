"""Loading Cirrus's C++ kernels (shared libraries built by `make kernels`) for jax.ffi."""

import ctypes
import logging
import os


def load_library(path: str, targets: dict[str, str], missing: str):
    """The library at `path` with each FFI target registered for the CPU ({target name:
    exported handler symbol}), or None (with one warning saying `missing`) when it is not
    built."""
    import jax

    if not os.path.exists(path):
        logging.warning("%s is missing: %s; build the kernels with `make kernels`.", path, missing)
        return None
    library = ctypes.cdll.LoadLibrary(path)
    for target, symbol in targets.items():
        jax.ffi.register_ffi_target(
            target, jax.ffi.pycapsule(getattr(library, symbol)), platform="cpu"
        )
    return library


def isa_of(library, symbol: str) -> str:
    """The instruction set a loaded kernel chose on this CPU ("avx512" or "portable", from
    its exported `int symbol()`: 512 or 0), or "none" when it is not built."""
    if library is None:
        return "none"
    return "avx512" if getattr(library, symbol)() == 512 else "portable"
