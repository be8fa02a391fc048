"""The tiny models of tests/model/helpers.py with random weights, and their full forward."""

import functools

import jax
import numpy as np
from flax import nnx

from research.model import Decoder, ModelConfig
from tests.model.helpers import FAMILIES, GPT2, LLAMA  # noqa: F401 - re-exported.


def random_split(config: ModelConfig, seed: int = 0, scale: float = 0.5):
    """(graphdef, params) of a Decoder with N(0, scale^2) parameters (peaky, distinct logits).

    Built with eval_shape and NumPy noise: no initializer compiles.
    """
    model = nnx.eval_shape(lambda: Decoder(config, rngs=nnx.Rngs(0)))
    graphdef, params = nnx.split(model, nnx.Param)
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda x: rng.normal(0.0, scale, x.shape).astype(np.float32), params)
    return graphdef, jax.tree.map(jax.numpy.asarray, params)


@functools.partial(jax.jit, static_argnums=0)
def _forward(graphdef, params, tokens_bt):
    return nnx.merge(graphdef, params)(tokens_bt)


def full_logits(graphdef, params, tokens_bt):
    """The Decoder's own forward over [B, T] tokens: [B, T, V] float32, as NumPy.

    Padded on the right to a multiple of 16 (causal: earlier logits are unchanged), so
    tests compile once for many lengths.
    """
    tokens_bt = np.asarray(tokens_bt)
    t = tokens_bt.shape[1]
    padded = np.pad(tokens_bt, ((0, 0), (0, -t % 16)))
    return np.asarray(_forward(graphdef, params, padded))[:, :t]


def cpu_has(*flags: str) -> bool:
    """Whether this CPU reports every x86 feature flag named (Linux's /proc/cpuinfo; False
    where there is none, e.g. on Arm)."""
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            line = next((x for x in cpuinfo if x.startswith("flags")), "")
    except OSError:
        return False
    return set(flags) <= set(line.partition(":")[2].split())


def run_isa_check(code: str, isa_variable: str, portable: bool, want: str) -> None:
    """Runs `code` (which prints "isa <name>" last) in a fresh CPU process, with the kernel's
    portable loop forced through `isa_variable` ("scalar") if `portable`, else the loop it
    picks for this CPU; the choice is made once per process, so each needs its own. Asserts
    it succeeded and ran the loop `want`."""
    import os
    import subprocess
    import sys

    env = {**os.environ, "JAX_PLATFORMS": "cpu", "XLA_FLAGS": ""}
    env[isa_variable] = "scalar" if portable else ""
    result = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"isa {want}" in result.stdout, result.stdout[-2000:]
