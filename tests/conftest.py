"""Test setup: 8 forced CPU devices so that tests build real meshes."""

import os

os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# The longest test files run first: `make test` hands whole files to its xdist workers in
# collection order (--dist loadfile), so a long file collected late becomes the suite's tail.
LONGEST_FIRST = ("tests/launch/test_readme.py", "tests/serving/test_fidelity.py")


def pytest_collection_modifyitems(config, items):
    items.sort(key=lambda item: not item.nodeid.startswith(LONGEST_FIRST))  # A stable sort.
