"""GPTQ (Frantar et al. 2022): quantize a matrix one input row at a time, pushing each row's
rounding error onto the rows not yet quantized, weighted by the inverse Hessian of the layer's
inputs (H = 2 X^T X over calibration text).

Here a matrix is [K, N] (inputs by outputs; research/compression/quantize.py), so GPTQ's
"columns" are our rows k. Hessians are collected in one pass of the float model over the
calibration text (the non-sequential variant: every layer sees the float model's inputs),
which keeps it to a single forward per batch.

Groups (int4, grouped int8) take their grid from the group's current weights, i.e. after the
error of the rows before them was pushed onto them: a scale for symmetric forms, a scale and
min (Q4_1's rule, float16) for int4_asym. Rows are rounded against the stored grid, so the
error each row pushes on is that of the values the matrix will hold.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from research.compression.quantize import QuantSpec, int4_asym_grid, int4_scales, pack


def quantize_matrix(
    w_kn: np.ndarray, h_kk: np.ndarray, spec: QuantSpec, *, damp: float = 0.01, block: int = 128
):
    """GPTQ of one [K, N] matrix given its inputs' Hessian [K, K]: (q stored, scale, min), as
    quantize.quantize returns them (min None unless spec.asym)."""
    k_dim, n = w_kn.shape
    w = np.array(w_kn, np.float32)
    h = np.array(h_kk, np.float64)
    dead = np.diag(h) == 0  # Inputs never active: their weights do not matter.
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k_dim)
    # Upper Cholesky factor of H^-1: row k holds the error propagation onto rows after k.
    hinv = np.linalg.cholesky(np.linalg.inv(h)).T.astype(np.float32)

    qmax, qmin = (127, -127) if spec.bits == 8 else (15, 0) if spec.asym else (7, -8)
    group = spec.group
    per_channel = spec.bits == 8 and group == k_dim
    if per_channel:
        scales = (np.abs(w).max(axis=0, keepdims=True) / 127.0).astype(np.float32)
    else:
        scales = np.zeros((k_dim // group, n), np.float16 if spec.asym else np.float32)
    mins = np.zeros((k_dim // group, n), np.float16) if spec.asym else None
    exact = None  # int4_asym: the group's float32 (scale, min) that q rounds against.
    block = block if per_channel else max(block // group, 1) * group
    q = np.zeros((k_dim, n), np.int8)
    for b0 in range(0, k_dim, block):
        b1 = min(b0 + block, k_dim)
        errors = np.zeros((b1 - b0, n), np.float32)
        for k in range(b0, b1):
            if not per_channel and k % group == 0:  # The group's grid, from updated rows.
                rows = w[k : k + group]
                if spec.asym:
                    exact = [x[0] for x in int4_asym_grid(rows, group, exact=True)]
                    scales[k // group], mins[k // group] = exact[0], exact[1]  # float16
                elif spec.bits == 4:
                    scales[k // group] = int4_scales(rows, group)[0]
                else:
                    scales[k // group] = np.abs(rows).max(0) / 127
            scale = scales[k // group].astype(np.float32)
            low = mins[k // group].astype(np.float32) if spec.asym else 0.0
            if spec.asym:  # As llama.cpp's Q4_1 (quantize_int4_asym): q from float32 values.
                inverse = np.where(exact[0] != 0, 1 / np.where(exact[0] != 0, exact[0], 1), 0)
                q[k] = np.clip(np.floor((w[k] - exact[1]) * inverse + 0.5), qmin, qmax)
            else:
                safe = np.where(scale != 0, scale, 1.0)
                q[k] = np.clip(np.rint(w[k] / safe), qmin, qmax)
            err = (w[k] - (q[k] * scale + low)) / hinv[k, k]
            w[k + 1 : b1] -= np.outer(hinv[k, k + 1 : b1], err)
            errors[k - b0] = err
        w[b1:] -= hinv[b0:b1, b1:].T @ errors
    return pack(q, spec.bits, signed=not spec.asym), scales, mins


@contextlib.contextmanager
def _recording(model, sums: dict, diagonal: bool = False):
    """Makes every Dense of `model` add its inputs' (X^T X, rows) to sums[path] while active
    (traced: the values are the jitted function's outputs); `diagonal`: only diag(X^T X),
    each input feature's sum of squares."""
    from research.model import Dense

    paths = {
        id(module): (*path, "kernel")
        for path, module in nnx.iter_graph(model)
        if isinstance(module, Dense)
    }
    original = Dense.__call__

    def call(self, x):
        path = paths.get(id(self))
        if path is not None:
            x_mk = x.reshape(-1, math.prod(x.shape[x.ndim - self.num_in :])).astype(jnp.float32)
            if diagonal:
                xtx = jnp.sum(jnp.square(x_mk), axis=0)
            else:
                xtx = jnp.dot(x_mk.T, x_mk, precision=jax.lax.Precision.HIGHEST)
            total, rows = sums.get(path, (0.0, 0))
            sums[path] = (total + xtx, rows + x_mk.shape[0])
        return original(self, x)

    Dense.__call__ = call
    try:
        yield
    finally:
        Dense.__call__ = original


def collect_hessians(graphdef, params, batches, log=print, diagonal: bool = False) -> dict:
    """{kernel path: H = 2 X^T X / rows} over `batches` (an iterable of [B, T] token arrays),
    one jitted float forward per batch; `diagonal`: only diag(H) ([K] per kernel)."""
    rows = {}

    def forward(params, tokens):
        model = nnx.merge(graphdef, params)
        sums = {}
        with _recording(model, sums, diagonal):
            model(tokens)
        rows.update({path: count for path, (_, count) in sums.items()})
        return {path: total for path, (total, _) in sums.items()}

    forward = jax.jit(forward)
    hessians, counts = {}, {}
    for i, tokens in enumerate(batches):
        sums = jax.device_get(forward(params, jnp.asarray(tokens)))
        for path, xtx in sums.items():
            hessians[path] = hessians.get(path, 0.0) + np.asarray(xtx, np.float64)
            counts[path] = counts.get(path, 0) + rows[path]
        log(f"calibration batch {i + 1}: {np.size(tokens)} tokens")
    return {path: 2.0 * h / counts[path] for path, h in hessians.items()}


def gptq_overrides(model_config, params, hessians: dict, mode: str, group: int, log=print):
    """{path: (q, scale, min)} for every Dense kernel with a Hessian, for quantize_params."""
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    overrides = {}
    for path, h in hessians.items():
        node = pure
        for key in path[:-1]:
            node = node[key]
        kernel = np.asarray(node[path[-1]])
        k = h.shape[0]
        w_kn = kernel.reshape(k, -1)
        overrides[path] = quantize_matrix(w_kn, h, QuantSpec.of(mode, group, k))
    log(f"gptq: {len(overrides)} matrices")
    return overrides
