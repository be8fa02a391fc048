"""Test setup: 8 forced CPU devices so that tests build real meshes, XLA's fast compile
settings, and one compilation cache for the run."""

import os
import shutil
import tempfile

from tests.xla_flags import FAST_COMPILE, with_devices

# The suite is compile-bound (hundreds of small programs, most run a few times): LLVM at -O0
# cuts XLA:CPU's compile time by about 40%. XLA's own HLO passes (fusion, layout, sharding)
# all still run, so programs compute the same things; benchmarks, `make demo` and users
# compile at the default level.
if FAST_COMPILE not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + with_devices(8)).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One XLA compilation cache for the whole run: both xdist workers and every subprocess a test
# starts (launch.train, launch.serve, ...) inherit it, so the many runs of the same tiny model
# compile each program once. It starts empty (a fresh directory per run: nothing carries
# over between runs) and is removed at the end. launch.serve reads CIRRUS_COMPILATION_CACHE.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="cirrus-test-xla-")
    os.environ["CIRRUS_TEST_OWNS_XLA_CACHE"] = os.environ["JAX_COMPILATION_CACHE_DIR"]
os.environ.setdefault("CIRRUS_COMPILATION_CACHE", os.environ["JAX_COMPILATION_CACHE_DIR"])
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

# The longest test files run first: `make test` hands whole files to its xdist workers in
# collection order (--dist loadfile), so a long file collected late becomes the suite's tail.
LONGEST_FIRST = ("tests/launch/test_readme.py", "tests/serving/test_fidelity.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))  # A stable sort.


def pytest_unconfigure(config):
    owned = os.environ.get("CIRRUS_TEST_OWNS_XLA_CACHE")
    if owned and not hasattr(config, "workerinput"):  # The controller, after every worker.
        shutil.rmtree(owned, ignore_errors=True)
