"""Loading Cirrus's C++ kernels (shared libraries built by `make kernels`) for jax.ffi."""

import ctypes
import functools
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


class Kernel:
    """One kernel library, loaded (its targets registered) on first use.

    Args:
      path, targets, missing: as `load_library`.
      isa_symbol: its exported `int symbol()`: 512 where it runs its AVX-512 loop, else 0.
      off_variable: an environment variable that turns it off when "0" (None: always on).
    """

    def __init__(self, path, targets, missing, isa_symbol, off_variable=None):
        self.path, self.targets, self.missing = path, targets, missing
        self.isa_symbol, self.off_variable = isa_symbol, off_variable

    @functools.cached_property
    def library(self):
        """The loaded library, or None when it is not built or is turned off."""
        if self.off_variable and os.environ.get(self.off_variable, "1") == "0":
            return None
        return load_library(self.path, self.targets, self.missing)

    def available(self) -> bool:
        """The library is built and not turned off."""
        return self.library is not None

    def isa(self) -> str:
        """The instruction set the kernel chose on this CPU: "avx512" or "portable" (a loop
        the compiler vectorizes as it can), "none" when it is not available."""
        if self.library is None:
            return "none"
        return "avx512" if getattr(self.library, self.isa_symbol)() == 512 else "portable"
