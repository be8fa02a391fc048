"""Weight quantization: the quantized form Dense and Embedding read, and how a model gets it.

A quantized [K, N] matrix (inputs K, output channels N) stands for
  w[k, n] = q[k, n] * scale[k // group, n]                      (symmetric: int8, int4)
  w[k, n] = q[k, n] * scale[k // group, n] + min[k // group, n]  (asymmetric: int4_asym)
- int8: q in [-127, 127], one float32 scale per output channel (group = K, scale [1, N];
  quant_group 0) or per `group` consecutive k of each column (as llama.cpp's Q8_0 blocks);
- int4: q in [-8, 7], one float32 scale per `group` (32 / 64 / 128) consecutive k of each
  column, as llama.cpp's Q4_0 blocks (the largest-magnitude value of a group maps to -8, so
  all 16 levels are used);
- int4_asym: q in [0, 15], a float16 scale and a float16 min per group, as llama.cpp's Q4_1
  blocks (min = the group's minimum, scale = (max - min) / 15): a grid that fits a group's
  range even when it is not centred on zero, for the same 5 bits per weight at group 32
  (4 + 2 x 16 / 32) as int4 with a float32 scale.
q is stored k-interleaved: each 32-bit word holds L consecutive k of one column (L = 4 int8
values, or 8 int4 nibbles, nibble j at bits 4j: value + 8 for int4, q itself for
int4_asym), words ordered [K / L, N]; the array is [K / L, N, 4] bytes. A block of L rows is
then one contiguous run of memory, which the kernel streams at full bandwidth (a row-major
[K, N] int8 matrix read in column strips ran at 9 GB/s from DRAM, this at 40+). Dense keeps
its output axes' logical names (a quantized model shards over outputs as the float one
does); its input axes become one K. A tied embedding is stored as its [D, V] transpose: the
LM head is then the same matmul, and a token lookup gathers one column.

`qdot` is the one matmul over that form: on CPU, small row counts (decode) go through the
C++ kernel (research/compression/kernel.py), which dequantizes in registers (int4_asym: the
min term is min[g, n] times the sum of x over group g, summed once per row); elsewhere, and
for prefill, the weight is dequantized and XLA's dot runs (a weight-sized temporary, paid once
per many rows).
"""

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np

from research.errors import UserError

MODES = ("none", "int8", "int4", "int4_asym")
INT4_MODES = ("int4", "int4_asym")
INT4_GROUPS = (32, 64, 128)
# Rows of x up to which the CPU kernel beats dequantize-then-dot: it widens weights to f32 and
# runs f32 FMAs, so past a few rows it is compute-bound (bench/qmatmul.py, M = 16).
KERNEL_MAX_ROWS = 8


@dataclasses.dataclass(frozen=True)
class QuantSpec:
    """How a [K, N] matrix is stored: bits 8 (per channel) or 4 (per group of k), and whether
    each group also has a min (asym: int4_asym)."""

    bits: int
    group: int  # Consecutive k sharing one scale; K for int8.
    asym: bool = False  # q in [0, 15] with float16 scale and min, else symmetric.

    @classmethod
    def of(cls, mode: str, group: int, k: int) -> "QuantSpec":
        if mode == "int8":
            if k % 4:
                raise UserError(f"int8 needs input sizes divisible by 4; a matrix has {k}.")
            if group <= 0 or group >= k:  # Per output channel.
                return cls(8, k)
            if k % group or group % 4:
                raise UserError(
                    f"model.quant_group={group} (int8) must be 0 (per channel) or a multiple of "
                    f"4 that divides the input size {k} of every quantized matrix."
                )
            return cls(8, group)
        if k % group or group % 8:
            raise UserError(
                f"model.quant_group={group} must be a multiple of 8 that divides the input size "
                f"{k} of every quantized matrix; of {INT4_GROUPS}, SmolLM2 (d_model 576) takes "
                "32 or 64."
            )
        return cls(4, group, asym=mode == "int4_asym")

    @property
    def per_word(self) -> int:
        """k per 32-bit word: L."""
        return 32 // self.bits

    @property
    def dtype(self):
        return jnp.int8 if self.bits == 8 else jnp.uint8

    @property
    def scale_dtype(self):
        """float16 for int4_asym (scale and min: Q4_1's 5 bits per weight), else float32."""
        return jnp.float16 if self.asym else jnp.float32


def check_mode(mode: str, group: int) -> None:
    if mode not in MODES:
        raise UserError(f"model.quant={mode!r} is not one of {MODES}.")
    if group < 0:
        raise UserError(f"model.quant_group={group} must be >= 0 (0: per output channel).")
    if mode in INT4_MODES and (group <= 0 or group % 8):
        raise UserError(f"model.quant_group={group} must be a positive multiple of 8 (32, 64).")


# --- Storage (NumPy or jnp) ------------------------------------------------------------------


def pack(q_kn, bits: int, *, signed: bool = True):
    """int values [K, N] -> the stored [K / L, N, 4] bytes (int8 for 8 bits, uint8 for 4).

    4 bits: a nibble holds value + 8 (signed, q in [-8, 7]) or the value (q in [0, 15])."""
    q = np.asarray(q_kn)
    k, n = q.shape
    per_word = 32 // bits
    words = q.reshape(k // per_word, per_word, n).transpose(0, 2, 1)  # [K / L, N, L]
    if bits == 8:
        return np.ascontiguousarray(words.astype(np.int8))
    u = (words.astype(np.int16) + (8 if signed else 0)).astype(np.uint8)
    return np.ascontiguousarray(u[..., 0::2] | (u[..., 1::2] << 4))


def unpack(stored, bits: int, *, signed: bool = True):
    """The stored [K / L, N, 4] bytes -> int8 values [K, N] (NumPy or jnp, as given)."""
    xp = jnp if isinstance(stored, jax.Array) else np
    kw, n, _ = stored.shape
    if bits == 8:
        words = stored
    else:
        offset = 8 if signed else 0
        low = (stored & 0xF).astype(xp.int8) - offset
        high = (stored >> 4).astype(xp.int8) - offset
        words = xp.stack([low, high], axis=-1).reshape(kw, n, 8)
    return words.transpose(0, 2, 1).reshape(kw * words.shape[-1], n).astype(xp.int8)


def quantize_int8(w_kn: np.ndarray, group: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric round-to-nearest, one scale per output channel (group None) or per `group`
    consecutive k of each column: (stored int8 [K / 4, N, 4], scale [K / group, N])."""
    w = np.asarray(w_kn, np.float32)
    k, n = w.shape
    group = group or k
    scale = np.abs(w.reshape(k // group, group, n)).max(axis=1) / 127.0
    full = np.repeat(np.where(scale > 0, scale, 1.0), group, axis=0)
    q = np.clip(np.rint(w / full), -127, 127).astype(np.int8)
    return pack(q, 8), scale.astype(np.float32)


def int4_scales(w_kn: np.ndarray, group: int) -> np.ndarray:
    """Q4_0's scale per group: the signed value of largest magnitude over -8, [K / group, N]."""
    k, n = w_kn.shape
    w = np.asarray(w_kn, np.float32).reshape(k // group, group, n)
    idx = np.abs(w).argmax(axis=1)
    extreme = np.take_along_axis(w, idx[:, None, :], axis=1)[:, 0, :]
    return (extreme / -8.0).astype(np.float32)


def quantize_int4(
    w_kn: np.ndarray, group: int, scale: np.ndarray | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Round-to-nearest in groups of `group` k: (stored [K / 8, N, 4] uint8, scale [K / g, N])."""
    k, n = w_kn.shape
    if scale is None:
        scale = int4_scales(w_kn, group)
    full = np.repeat(scale, group, axis=0)
    safe = np.where(full != 0, full, 1.0)
    q = np.clip(np.rint(np.asarray(w_kn, np.float32) / safe), -8, 7)
    return pack(q, 4), scale


def int4_asym_grid(w_kn: np.ndarray, group: int, exact: bool = False):
    """Q4_1's grid per group: (scale = (max - min) / 15, min), [K / group, N] each, float16
    (the stored values) or, with exact, the float32 values llama.cpp rounds against.

    float16 keeps int4_asym at Q4_1's size; a weight past its range (65504) is a UserError."""
    k, n = w_kn.shape
    w = np.asarray(w_kn, np.float32).reshape(k // group, group, n)
    low, high = w.min(axis=1), w.max(axis=1)
    with np.errstate(over="ignore"):
        scale, minimum = ((high - low) / 15).astype(np.float16), low.astype(np.float16)
    if not (np.isfinite(scale).all() and np.isfinite(minimum).all()):
        raise UserError(
            f"int4_asym stores scale and min as float16, and a group spans "
            f"[{low.min():.3g}, {high.max():.3g}], past its range; use quant 'int4'."
        )
    return ((high - low) / 15, low) if exact else (scale, minimum)


def quantize_int4_asym(
    w_kn: np.ndarray, group: int, grid: tuple[np.ndarray, np.ndarray] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Round-to-nearest on Q4_1's grid: (stored [K / 8, N, 4] uint8, scale float16 [K / g, N],
    min float16 [K / g, N]).

    Without `grid`, q is llama.cpp's: rounded against the float32 scale and min, which are
    then stored as float16 (the gguf package's Q4_1, bit for bit). Rounding against the float16
    values instead gives a lower weight MSE but a 15% higher KL on SmolLM2 (tied head,
    bench/RESULTS.md), so Cirrus follows llama.cpp. With `grid` (GPTQ's, float16), q is
    rounded against the values the matrix will hold."""
    if grid is None:
        scale, minimum = int4_asym_grid(w_kn, group, exact=True)
    else:
        scale, minimum = grid
    full_scale = np.repeat(np.asarray(scale, np.float32), group, axis=0)
    full_min = np.repeat(np.asarray(minimum, np.float32), group, axis=0)
    inverse = np.where(full_scale != 0, 1 / np.where(full_scale != 0, full_scale, 1), 0)
    q = np.clip(np.floor((np.asarray(w_kn, np.float32) - full_min) * inverse + 0.5), 0, 15)
    return pack(q, 4, signed=False), scale.astype(np.float16), minimum.astype(np.float16)


def quantize(w_kn: np.ndarray, spec: QuantSpec):
    """Round-to-nearest in `spec`'s form: (stored q, scale, min), min None if symmetric."""
    if spec.bits == 8:
        return (*quantize_int8(w_kn, spec.group), None)
    if spec.asym:
        return quantize_int4_asym(w_kn, spec.group)
    return (*quantize_int4(w_kn, spec.group), None)


def dequantize(q, scale, spec: QuantSpec, minimum=None):
    """The float32 [K, N] matrix a stored (q, scale[, min]) stands for (NumPy or jnp)."""
    xp = jnp if isinstance(q, jax.Array) else np
    values = unpack(q, spec.bits, signed=not spec.asym)
    k = values.shape[0]
    grouped = values.reshape(k // spec.group, spec.group, -1).astype(xp.float32)
    w = grouped * scale[:, None, :].astype(xp.float32)
    if minimum is not None:
        w = w + minimum[:, None, :].astype(xp.float32)
    return w.reshape(k, -1)


# --- The matmul ------------------------------------------------------------------------------


def _dequantized_dot(x_mk, q, scale, minimum, spec: QuantSpec):
    w_kn = dequantize(q, scale, spec, minimum).astype(x_mk.dtype)
    return jnp.dot(x_mk, w_kn, preferred_element_type=jnp.float32)


def qdot(x_mk, q, scale, spec: QuantSpec, minimum=None):
    """x [M, K] -> [M, N] float32, against the stored matrix (q [K / L, *out, 4], scale and
    min [G, *out] are viewed as [K / L, N, 4] and [G, N]; min only for int4_asym)."""
    n = math.prod(scale.shape[1:])
    q2, s2 = q.reshape(-1, n, 4), scale.reshape(-1, n)
    m2 = None if minimum is None else minimum.reshape(-1, n)
    from research.compression import kernel  # Loads the C++ library on first use.

    if x_mk.shape[0] <= KERNEL_MAX_ROWS and kernel.available():
        return jax.lax.platform_dependent(
            x_mk.astype(jnp.float32),
            q2,
            s2,
            m2,
            cpu=lambda a, b, c, d: kernel.qmatmul(a, b, c, d, bits=spec.bits, group=spec.group),
            default=lambda a, b, c, d: _dequantized_dot(a, b, c, d, spec),
        )
    return _dequantized_dot(x_mk, q2, s2, m2, spec)


# --- Quantizing a model ----------------------------------------------------------------------


def quantize_params(model_config, params, mode: str, group: int = 32, overrides=None):
    """A float model's (config, params) -> (quantized config, quantized params).

    Every Dense kernel and the embedding table are quantized; norms, biases and learned
    positions stay float32. `overrides` (optional) maps a matrix's path (a tuple of keys, e.g.
    ("layers", 0, "mlp", "up_proj", "kernel")) to its (q, scale, min) in the [K, N] form (min
    None unless int4_asym), made by an error-compensating method (GPTQ) instead of
    round-to-nearest.
    params: an nnx.State or its pure dict; the result is a pure dict of NumPy arrays.
    """
    from flax import nnx

    from research.model import Decoder

    check_mode(mode, group)
    if mode == "none":
        raise UserError(f"compress.quant must be one of {MODES[1:]} to quantize.")
    if model_config.quant != "none":
        raise UserError(
            f"the model is already quantized ({model_config.quant}); quantize the float model."
        )
    qconfig = model_config.replace(quant=mode, quant_group=group)
    abstract = nnx.eval_shape(lambda: Decoder(qconfig, rngs=nnx.Rngs(0)))
    target = nnx.state(abstract, nnx.Param).to_pure_dict()
    source = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    overrides = overrides or {}

    def fill(src, dst, path):
        for key, value in src.items():
            here = (*path, key)
            if isinstance(value, dict):
                fill(value, dst[key], here)
            elif key == "kernel":  # A Dense [*in, *out] -> kernel_q [*in', *out], scale [G, *out].
                shape = dst["scale"].shape
                n = math.prod(shape[1:])
                w_kn = np.asarray(value).reshape(-1, n)
                spec = QuantSpec.of(mode, group, w_kn.shape[0])
                q, scale, minimum = overrides.get(here) or quantize(w_kn, spec)
                dst["kernel_q"] = q.reshape(dst["kernel_q"].shape)
                dst["scale"] = scale.reshape(shape)
                if minimum is not None:
                    dst["min"] = minimum.reshape(shape)
            elif key == "embedding" and "embedding_q" in dst:  # [V, D] -> [D, V].
                w_kn = np.asarray(value).T
                spec = QuantSpec.of(mode, group, w_kn.shape[0])
                q, scale, minimum = overrides.get(here) or quantize(w_kn, spec)
                dst["embedding_q"], dst["scale"] = q, scale
                if minimum is not None:
                    dst["min"] = minimum
            else:
                dst[key] = np.asarray(value)

    fill(source, target, ())
    return qconfig, target


def weight_bytes(params) -> int:
    """Bytes of every parameter array (quantized or not)."""
    leaves = jax.tree.leaves(params.to_pure_dict() if hasattr(params, "to_pure_dict") else params)
    return sum(math.prod(x.shape) * np.dtype(x.dtype).itemsize for x in leaves)


def dequantize_params(model_config, params):
    """The inverse of quantize_params: (float config, float32 pure dict) that the quantized
    model stands for (for training from it, or exporting it to transformers)."""
    if model_config.quant == "none":
        return model_config, params
    config = model_config.replace(quant="none")
    source = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params

    bits = 8 if model_config.quant == "int8" else 4
    asym = model_config.quant == "int4_asym"

    def matrix(q, scale, minimum):  # Stored (q, scale, min or None) -> float [K, N].
        k = q.shape[0] * 32 // bits
        n = math.prod(scale.shape[1:])
        spec = QuantSpec(bits, k // scale.shape[0], asym=asym)
        minimum = None if minimum is None else np.asarray(minimum).reshape(-1, n)
        return dequantize(q.reshape(q.shape[0], n, 4), scale.reshape(-1, n), spec, minimum)

    def walk(node, path):
        out = {}
        for key, value in node.items():
            if not isinstance(value, dict):
                out[key] = np.asarray(value)
            elif "kernel_q" in value:  # A Dense: back to [*in, *out].
                q, scale = np.asarray(value["kernel_q"]), np.asarray(value["scale"])
                w_kn = matrix(q, scale, value.get("min"))
                in_shape = in_shapes[(*path, key, "kernel")]
                stored = ("kernel_q", "scale", "min")
                rest = {k: np.asarray(v) for k, v in value.items() if k not in stored}
                out[key] = {**rest, "kernel": w_kn.reshape(*in_shape, *scale.shape[1:])}
            elif "embedding_q" in value:  # [D, V] -> [V, D].
                q, scale = np.asarray(value["embedding_q"]), np.asarray(value["scale"])
                out[key] = {"embedding": matrix(q, scale, value.get("min")).T}
            else:
                out[key] = walk(value, (*path, key))
        return out

    in_shapes = dense_input_shapes(config)
    return config, walk(source, ())


def dense_input_shapes(model_config) -> dict:
    """{kernel path: the Dense's input sizes} (e.g. o_proj: (heads, head_dim)), from shapes."""
    from flax import nnx

    from research.model import Decoder, Dense

    abstract = nnx.eval_shape(lambda: Decoder(model_config.replace(quant="none"), rngs=nnx.Rngs(0)))
    return {
        (*path, "kernel"): module.kernel.shape[: module.num_in]
        for path, module in nnx.iter_graph(abstract)
        if isinstance(module, Dense)
    }
