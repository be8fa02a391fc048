"""Pruning: whole layers, MLP channels and kv-head groups (a smaller dense model), or single
weights (sparsity masks).

Structured (the result is an ordinary, smaller ModelConfig: it loads, trains and decodes
faster with no special kernels):
  - depth: layers scored by how much they change the residual stream on calibration text,
    the Block Influence of ShortGPT (Men et al. 2024), 1 - cos(block input, block output)
    averaged over tokens; the least influential go;
  - width (Minitron, Muralidharan et al. 2024): MLP channels scored by the mean square of
    their activation (the input of down_proj), kv-head groups by the mean square of their
    heads' attention output (the input of o_proj); each layer keeps its top mlp_dim channels
    and top num_kv_heads groups (with their query heads).

Unstructured (masks; the model keeps its shape): magnitude |W| per matrix, or Wanda (Sun et
al. 2023) |W_kn| * ||X_k|| compared within each output, at a sparsity, or 2:4 (two of every
four consecutive inputs kept per output). Masks stay applied while healing: the train step
projects gradients and weights through them (research/train/objective.with_masks). They save
no time on CPU (or anywhere without sparse kernels): the zeros are still multiplied.
"""

import contextlib
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


@contextlib.contextmanager
def _recording(model, scores: dict):
    """Makes every Block of `model` add (sum over tokens of 1 - cos(in, out), tokens) to
    scores[i] while active (traced: the jitted function returns them)."""
    from research.model import Block

    index = {id(layer): i for i, layer in enumerate(model.layers)}
    original = Block.__call__

    def call(self, x_btd, *args, **kwargs):
        y_btd = original(self, x_btd, *args, **kwargs)
        i = index.get(id(self))
        if i is not None:
            x, y = x_btd.astype(jnp.float32), y_btd.astype(jnp.float32)
            cos = jnp.sum(x * y, -1) / (jnp.linalg.norm(x, axis=-1) * jnp.linalg.norm(y, axis=-1))
            scores[i] = (jnp.sum(1.0 - cos), cos.size)
        return y_btd

    Block.__call__ = call
    try:
        yield
    finally:
        Block.__call__ = original


def layer_importance(graphdef, params, batches) -> np.ndarray:
    """[num_layers] Block Influence of each layer over `batches` ([B, T] token arrays)."""

    def forward(params, tokens):
        model = nnx.merge(graphdef, params)
        scores = {}
        with _recording(model, scores):
            model(tokens)
        return [scores[i][0] for i in range(len(scores))], [
            scores[i][1] for i in range(len(scores))
        ]

    totals, count = 0.0, 0
    compiled = jax.jit(forward)
    for tokens in batches:
        sums, sizes = compiled(params, jnp.asarray(tokens))
        totals = totals + np.asarray(jax.device_get(sums), np.float64)
        count += int(sizes[0])
    return totals / count


def drop_layers(model_config, params, keep: list[int]):
    """(config with len(keep) layers, pure dict params of those layers, in order)."""
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    if not keep or len(set(keep)) != len(keep):
        raise ValueError(f"keep={keep} must name distinct layers.")
    out = {key: value for key, value in pure.items() if key != "layers"}
    out["layers"] = {new: pure["layers"][old] for new, old in enumerate(sorted(keep))}
    return model_config.replace(num_layers=len(keep)), out


def least_important(importance: np.ndarray, drop: int, *, keep_first_last: bool = True) -> list:
    """The layers to keep after dropping the `drop` lowest-scored ones (the first and the last
    layer are kept: removing them costs far more than their score says, ShortGPT Sec. 4)."""
    candidates = list(range(len(importance)))
    if keep_first_last and len(candidates) > 2:
        candidates = candidates[1:-1]
    order = sorted(candidates, key=lambda i: importance[i])
    dropped = set(order[:drop])
    return [i for i in range(len(importance)) if i not in dropped]


# --- width: MLP channels and kv-head groups ----------------------------------------------------


def activation_energy(graphdef, params, batches) -> dict:
    """{Dense kernel path: mean square of each input feature over the batches' tokens}."""
    from research.compression.gptq import collect_hessians

    diagonals = collect_hessians(graphdef, params, batches, log=lambda _: None, diagonal=True)
    return {path: np.asarray(h) / 2.0 for path, h in diagonals.items()}


def width_importance(model_config, energy: dict) -> tuple[np.ndarray, np.ndarray]:
    """([layers, mlp_dim] MLP channel scores, [layers, num_kv_heads] kv-group scores)."""
    mlp, groups = [], []
    kv = model_config.num_kv_heads
    for i in range(model_config.num_layers):
        down = "down_proj" if model_config.mlp_activation == "swiglu" else "proj"
        mlp.append(energy[("layers", i, "mlp", down, "kernel")])
        heads = energy[("layers", i, "attention", "o_proj", "kernel")]  # [N * H]
        groups.append(heads.reshape(kv, -1).sum(-1))
    return np.stack(mlp), np.stack(groups)


def prune_width(model_config, params, mlp_scores, group_scores, *, mlp_dim: int, num_kv_heads: int):
    """(smaller config, pure dict params): each layer keeps its `mlp_dim` best MLP channels and
    `num_kv_heads` best kv groups (with their num_heads / num_kv_heads query heads each)."""
    cfg = model_config
    if not 0 < mlp_dim <= cfg.mlp_dim or not 0 < num_kv_heads <= cfg.num_kv_heads:
        raise ValueError(
            f"mlp_dim={mlp_dim} must be in [1, {cfg.mlp_dim}] and num_kv_heads={num_kv_heads} "
            f"in [1, {cfg.num_kv_heads}]."
        )
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    per_group = cfg.num_heads // cfg.num_kv_heads
    out = {key: value for key, value in pure.items() if key != "layers"}
    out["layers"] = {}
    for i, layer in pure["layers"].items():
        channels = np.sort(np.argsort(-np.asarray(mlp_scores[i]), kind="stable")[:mlp_dim])
        kept = np.sort(np.argsort(-np.asarray(group_scores[i]), kind="stable")[:num_kv_heads])
        heads = (kept[:, None] * per_group + np.arange(per_group)).reshape(-1)
        layer = jax.tree.map(np.asarray, layer)  # A new dict tree of host arrays.
        mlp = layer["mlp"]
        for name, module in mlp.items():
            into = name in ("gate_proj", "up_proj", "fc")
            module["kernel"] = np.take(module["kernel"], channels, axis=1 if into else 0)
            if "bias" in module and into:
                module["bias"] = np.take(module["bias"], channels, axis=0)
        attention = layer["attention"]
        for name, index in (("q_proj", heads), ("k_proj", kept), ("v_proj", kept)):
            attention[name]["kernel"] = np.take(attention[name]["kernel"], index, axis=1)
            if "bias" in attention[name]:
                attention[name]["bias"] = np.take(attention[name]["bias"], index, axis=0)
        attention["o_proj"]["kernel"] = np.take(attention["o_proj"]["kernel"], heads, axis=0)
        out["layers"][i] = layer
    config = cfg.replace(
        mlp_dim=mlp_dim,
        num_kv_heads=num_kv_heads,
        num_heads=num_kv_heads * per_group,
        head_dim=cfg.resolved_head_dim,  # d_model // num_heads would change with num_heads.
    )
    return config, out


# --- unstructured and 2:4 masks ----------------------------------------------------------------


def prunable_kernels(model_config, params) -> dict:
    """{path: number of leading input axes} of the Dense kernels sparsity applies to: every
    projection inside the layers (not the embedding or the head, as Wanda / SparseGPT)."""
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    kernels = {}
    for i, layer in pure["layers"].items():
        for group in ("attention", "mlp"):
            for name, module in layer[group].items():
                if isinstance(module, dict) and "kernel" in module:
                    kernels[("layers", i, group, name, "kernel")] = 2 if name == "o_proj" else 1
    return kernels


def sparsity_masks(
    model_config, params, sparsity: float, *, pattern: str = "unstructured", energy=None
) -> dict:
    """{kernel path: float32 0/1 mask}. Scores are |W| (magnitude) or, with `energy` from
    activation_energy, |W_kn| * sqrt(mean x_k^2) (Wanda). "unstructured": magnitude keeps the
    largest (1 - sparsity) of each matrix, Wanda of each output's inputs; "2:4": the two best
    of every four consecutive inputs of each output (sparsity is then 0.5)."""
    if pattern not in ("unstructured", "2:4"):
        raise ValueError(f"pattern={pattern!r} is not 'unstructured' or '2:4'.")
    if pattern == "unstructured" and not 0 < sparsity < 1:
        raise ValueError(f"sparsity={sparsity} must be in (0, 1).")
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    masks = {}
    for path, num_in in prunable_kernels(model_config, pure).items():
        node = pure
        for key in path:
            node = node[key]
        kernel = np.asarray(node, np.float32)
        k = math.prod(kernel.shape[:num_in])
        score = np.abs(kernel.reshape(k, -1))
        if energy is not None:
            score = score * np.sqrt(np.asarray(energy[path], np.float32))[:, None]
        masks[path] = _mask(score, sparsity, pattern, per_output=energy is not None).reshape(
            kernel.shape
        )
    return masks


def _mask(score_kn: np.ndarray, sparsity: float, pattern: str, per_output: bool) -> np.ndarray:
    k, n = score_kn.shape
    if pattern == "2:4":
        if k % 4:
            raise ValueError(f"2:4 sparsity needs inputs divisible by 4, got {k}.")
        blocks = score_kn.reshape(k // 4, 4, n)
        rank = np.argsort(np.argsort(-blocks, axis=1, kind="stable"), axis=1, kind="stable")
        return (rank < 2).astype(np.float32).reshape(k, n)
    drop = int(round(sparsity * (k if per_output else k * n)))
    if per_output:  # Each output (column) drops its `drop` lowest-scored inputs.
        order = np.argsort(score_kn, axis=0, kind="stable")
        mask = np.ones((k, n), np.float32)
        np.put_along_axis(mask, order[:drop], 0.0, axis=0)
        return mask
    flat = np.ones(k * n, np.float32)
    flat[np.argsort(score_kn.reshape(-1), kind="stable")[:drop]] = 0.0
    return flat.reshape(k, n)


def apply_sparsity(params, masks: dict) -> dict:
    """Pure dict params with every masked kernel multiplied by its mask."""
    from research.train.objective import apply_masks

    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    return apply_masks(jax.tree.map(np.asarray, pure), masks)


def sparsity_of(params, masks: dict) -> float:
    """Fraction of the masked kernels' weights that are exactly zero."""
    pure = params.to_pure_dict() if hasattr(params, "to_pure_dict") else params
    zeros = total = 0
    for path in masks:
        node = pure
        for key in path:
            node = node[key]
        zeros += int(np.sum(np.asarray(node) == 0))
        total += np.size(node)
    return zeros / max(total, 1)
