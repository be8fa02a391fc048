"""LoRA adapters (Hu et al. 2021) on the model's Dense layers, and their PEFT interchange.

A Dense whose dotted path ("layers.3.attention.q_proj") matches `ModelConfig.lora_targets`
gets A [*in, r] and B [r, *out] (nnx.LoRAParam) and computes y = x W + (alpha / r) dropout(x) A B
(research/model/dense.py). The base weight W stays as it is, float or quantized (QLoRA); the
trainer trains only the adapters (research/train/step.py). For serving, `merge` folds them into
float kernels, W + (alpha / r) A B, so the sampler runs the plain model.

PEFT layout (`save_peft` / `load_peft`): adapter_config.json + adapter_model.safetensors with
`base_model.model.<HF module>.lora_A.weight` [r, in] and `lora_B.weight` [out, r], the HF
module names of research/checkpoint/hf.py's layout.
"""

import hashlib
import json
import math
import os
import re

import jax
import numpy as np
from flax import nnx

from research.errors import UserError

ADAPTER_KEYS = ("lora_a", "lora_b")
PEFT_CONFIG = "adapter_config.json"
PEFT_WEIGHTS = "adapter_model.safetensors"


def matches(path: str, targets) -> bool:
    """PEFT's target_modules rule: a module name (the path equals it or ends in ".name") or a
    regular expression full-matched against the dotted path."""
    for target in targets:
        if path == target or path.endswith("." + target):
            return True
        try:
            if re.fullmatch(target, path):
                return True
        except re.error as error:
            raise UserError(
                f"model.lora_targets has {target!r}, not a valid regex: {error}"
            ) from None
    return False


def attach(model, config, rngs: nnx.Rngs) -> int:
    """Adds adapters to every matching Dense of `model` (a Decoder); returns how many.

    A UserError if none matches (a typo in lora_targets must not train nothing)."""
    from research.model.dense import Dense

    found = [
        (".".join(str(key) for key in path), node)
        for path, node in nnx.iter_graph(model)
        if isinstance(node, Dense)
    ]
    chosen = [(name, dense) for name, dense in found if matches(name, config.lora_targets)]
    if not chosen:
        names = sorted({name.split(".")[-1] for name, _ in found})
        raise UserError(
            f"model.lora_targets={list(config.lora_targets)} matches no layer; the model's "
            f"Dense layers are named {names} (e.g. 'layers.0.attention.q_proj')."
        )
    for index, (_, dense) in enumerate(chosen):
        dense.add_lora(config.lora_rank, config.lora_alpha, config.lora_dropout, index, rngs=rngs)
    return len(chosen)


def is_adapter(path) -> bool:
    """Whether a parameter path (keys, as param_path gives) is a LoRA leaf."""
    return bool(path) and path[-1] in ADAPTER_KEYS


def set_dropout_key(model, key) -> None:
    """Gives every adapter of a merged model this step's dropout key (None: no dropout)."""
    from research.model.dense import Dense

    for _, node in nnx.iter_graph(model):
        if isinstance(node, Dense) and node.lora_a is not None:
            node.lora_key = key


def _pure(params) -> dict:
    return params.to_pure_dict() if hasattr(params, "to_pure_dict") else params


def adapters(params) -> dict:
    """{Dense path (tuple of keys): (A [*in, r], B [r, *out])} as NumPy arrays."""
    found = {}

    def walk(node, path):
        if "lora_a" in node:
            found[path] = (np.asarray(node["lora_a"]), np.asarray(node["lora_b"]))
        for key, value in node.items():
            if isinstance(value, dict):
                walk(value, (*path, key))

    walk(_pure(params), ())
    return found


def delta(config, a, b) -> np.ndarray:
    """(alpha / r) A B with A's input axes and B's output axes: the kernel's [*in, *out]."""
    rank = a.shape[-1]
    product = a.reshape(-1, rank) @ b.reshape(rank, -1)
    return (config.lora_alpha / rank * product).reshape(*a.shape[:-1], *b.shape[1:])


def merge(model_config, params):
    """(config, params) with the adapters folded into float kernels: (lora_rank 0 config, pure
    dict). A quantized base is dequantized first (the merged kernel is float32; quantize it
    again with launch.compress if wanted)."""
    if model_config.lora_rank == 0:
        return model_config, _pure(params)
    found = adapters(params)
    base = _strip(_pure(params))
    config = model_config.replace(lora_rank=0)
    if config.quant != "none":
        from research.compression.quantize import dequantize_params

        config, base = dequantize_params(config, base)
    for path, (a, b) in found.items():
        node = _at(base, path)
        node["kernel"] = (
            np.asarray(node["kernel"], np.float32) + delta(model_config, a, b)
        ).astype(np.float32)
    return config, base


def adapter_tree(params) -> dict:
    """The adapter leaves alone, as a nested pure dict of the same arrays (or abstract
    shapes): what a LoRA run's adapter-only checkpoint holds."""

    def keep(node: dict) -> dict:
        out = {}
        for key, value in node.items():
            if isinstance(value, dict):
                if inner := keep(value):
                    out[key] = inner
            elif key in ADAPTER_KEYS:
                out[key] = value
        return out

    return keep(_pure(params))


def with_adapters(params, adapter_values: dict):
    """A copy of `params` (nnx.State or pure dict) with the leaves of `adapter_values` (a
    partial tree: adapter_tree's layout, or a base model's leaves over a fresh model) in place
    of its own; adapter leaves may also be added to a base without them."""

    def put(node: dict, values: dict) -> dict:
        out = dict(node)
        for key, value in values.items():
            if key not in node and key not in ADAPTER_KEYS:
                raise UserError(
                    f"the saved LoRA adapters have {key!r}, which the model lacks: they were "
                    "trained on another model shape or lora_targets."
                )
            out[key] = put(node[key], value) if isinstance(value, dict) else value
        return out

    merged = put(_pure(params), adapter_values)
    if isinstance(params, dict):
        return merged
    state = jax.tree.map(lambda x: x, params)  # A copy of the State's structure.
    state.replace_by_pure_dict(merged)
    return state


def base_fingerprint(params) -> str:
    """A short hash of the frozen base weights (every leaf but the adapters): each leaf's path,
    shape and dtype, and 4,096 of its values evenly strided. An adapter-only checkpoint keeps
    it, so that the base read again later is known to be the one the adapters were trained
    on. Reads the arrays to the host (one process's view)."""
    digest = hashlib.sha256()
    leaves = jax.tree_util.tree_leaves_with_path(_strip(_pure(params)))
    for path, leaf in sorted(leaves, key=lambda item: jax.tree_util.keystr(item[0])):
        values = np.asarray(leaf)
        flat = values.reshape(-1)
        sample = np.ascontiguousarray(flat[:: max(1, flat.size // 4096)])
        digest.update(f"{jax.tree_util.keystr(path)}:{values.shape}:{values.dtype}".encode())
        digest.update(sample.tobytes())
    return digest.hexdigest()[:16]


def _strip(tree: dict) -> dict:
    """A copy of a pure dict without its adapter leaves."""
    return {
        key: _strip(value) if isinstance(value, dict) else value
        for key, value in tree.items()
        if key not in ADAPTER_KEYS
    }


def _at(tree, path):
    for key in path:
        tree = tree[key]
    return tree


# --- PEFT interchange ----------------------------------------------------------------------------


def _hf_names(model_config) -> dict:
    """Cirrus Dense path -> HF module name ("model.layers.0.self_attn.q_proj")."""
    from research.checkpoint.hf import _layout
    from research.checkpoint.hf_config import export_family

    family = export_family(model_config)
    names = {}
    for tensor in _layout(model_config, family, attention_bias=False, mlp_bias=False):
        path = tensor.paths[0]
        if len(tensor.paths) == 1 and path[-1] == "kernel" and tensor.name.endswith(".weight"):
            names[path[:-1]] = tensor.name[: -len(".weight")]
    return names


def save_peft(model_config, params, directory: str, base_model: str = "") -> list[str]:
    """Writes the adapters in HF PEFT's layout; returns the files written."""
    from safetensors.numpy import save_file

    found = adapters(params)
    if not found:
        raise UserError("the model has no LoRA adapters to export (model.lora_rank is 0).")
    names = _hf_names(model_config.replace(lora_rank=0))
    tensors, modules = {}, set()
    for path, (a, b) in found.items():
        if path not in names:
            raise UserError(f"no HF module name for the adapter at {'.'.join(map(str, path))}.")
        rank = a.shape[-1]
        prefix = f"base_model.model.{names[path]}"
        tensors[f"{prefix}.lora_A.weight"] = np.ascontiguousarray(a.reshape(-1, rank).T)
        tensors[f"{prefix}.lora_B.weight"] = np.ascontiguousarray(b.reshape(rank, -1).T)
        modules.add(names[path].split(".")[-1])
    os.makedirs(directory, exist_ok=True)
    save_file(
        {k: v.astype(np.float32) for k, v in tensors.items()}, os.path.join(directory, PEFT_WEIGHTS)
    )
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model or None,
        "r": model_config.lora_rank,
        "lora_alpha": model_config.lora_alpha,
        "lora_dropout": model_config.lora_dropout,
        "target_modules": sorted(modules),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
        "use_rslora": False,
        "use_dora": False,
    }
    with open(os.path.join(directory, PEFT_CONFIG), "w") as f:
        json.dump(config, f, indent=2)
    return [PEFT_CONFIG, PEFT_WEIGHTS]


def read_peft_config(directory: str) -> dict:
    """adapter_config.json, checked for what Cirrus can load (plain LoRA on Linear layers)."""
    path = os.path.join(directory, PEFT_CONFIG)
    try:
        with open(path) as f:
            config = json.load(f)
    except FileNotFoundError:
        raise UserError(
            f"{directory} has no {PEFT_CONFIG}: not a PEFT adapter directory."
        ) from None
    except json.JSONDecodeError as error:
        raise UserError(f"{path} is not valid JSON: {error}") from None
    unsupported = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "use_rslora": bool(config.get("use_rslora")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "rank_pattern": bool(config.get("rank_pattern")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "bias": config.get("bias", "none") != "none",
    }
    bad = [key for key, is_bad in unsupported.items() if is_bad]
    if bad:
        raise UserError(
            f"{path}: Cirrus loads plain LoRA adapters; unsupported settings {bad} "
            f"({ {key: config.get(key) for key in bad} })."
        )
    return config


def load_peft(model_config, params, directory: str):
    """(config with lora_*, pure dict with adapters) from a base model and a PEFT directory."""
    from safetensors.numpy import load_file

    peft = read_peft_config(directory)
    try:
        tensors = load_file(os.path.join(directory, PEFT_WEIGHTS))
    except FileNotFoundError:
        raise UserError(
            f"{directory} has no {PEFT_WEIGHTS} (Cirrus reads safetensors only)."
        ) from None
    except Exception as error:  # safetensors raises its own error types for a damaged file.
        raise UserError(
            f"{os.path.join(directory, PEFT_WEIGHTS)} cannot be read: {error}"
        ) from None
    targets = peft.get("target_modules") or []
    config = model_config.replace(
        lora_rank=int(peft["r"]),
        lora_alpha=float(peft.get("lora_alpha", 8)),
        lora_dropout=float(peft.get("lora_dropout", 0.0)),
        lora_targets=tuple([targets] if isinstance(targets, str) else targets),
    )
    tree = _strip(_pure(params))
    used = set()
    for path, name in _hf_names(model_config.replace(lora_rank=0)).items():
        key_a = f"base_model.model.{name}.lora_A.weight"
        if key_a not in tensors:
            continue
        a_hf, b_hf = tensors[key_a], tensors[f"base_model.model.{name}.lora_B.weight"]
        node = _at(tree, path)
        in_shape, out_shape = _dense_shapes(model_config, node, path)
        rank = config.lora_rank
        if a_hf.shape != (rank, math.prod(in_shape)) or b_hf.shape != (math.prod(out_shape), rank):
            raise UserError(
                f"{key_a}: shapes {a_hf.shape} / {b_hf.shape} do not fit the base model's "
                f"{name} ({math.prod(in_shape)} -> {math.prod(out_shape)}, r={rank})."
            )
        node["lora_a"] = a_hf.T.reshape(*in_shape, rank).astype(np.float32)
        node["lora_b"] = b_hf.T.reshape(rank, *out_shape).astype(np.float32)
        used.update({key_a, key_a.replace("lora_A", "lora_B")})
    unused = sorted(set(tensors) - used)
    if unused:
        raise UserError(f"{directory}: tensors with no matching layer, e.g. {unused[:3]}.")
    if not used:
        raise UserError(f"{directory}: no LoRA tensors found.")
    return config, tree


def _dense_shapes(model_config, node, path):
    """([*in], [*out]) of the Dense at `path`, from a float or quantized node."""
    from research.compression.quantize import dense_input_shapes

    in_shape = dense_input_shapes(model_config.replace(lora_rank=0)).get((*path, "kernel"))
    if "kernel" in node:
        kernel = np.asarray(node["kernel"])
        in_shape = in_shape or kernel.shape[:1]
        return tuple(in_shape), kernel.shape[len(in_shape) :]
    return tuple(in_shape), np.asarray(node["scale"]).shape[1:]


def trainable_count(params) -> tuple[int, int]:
    """(adapter parameters, all parameters) of a pure dict or nnx.State."""
    leaves = jax.tree_util.tree_leaves_with_path(_pure(params))
    total = sum(int(np.size(leaf)) for _, leaf in leaves)
    train = sum(
        int(np.size(leaf))
        for path, leaf in leaves
        if getattr(path[-1], "key", None) in ADAPTER_KEYS
    )
    return train, total
