"""Hugging Face interchange: config.json + *.safetensors <-> (ModelConfig, Cirrus parameters).

Families (all one `Decoder`, chosen by config values):
  llama    LlamaForCausalLM    RoPE, RMSNorm, SwiGLU, grouped-query attention
  mistral  MistralForCausalLM  Llama weights; a sliding window caps max_seq_len (see below)
  qwen2    Qwen2ForCausalLM    Llama plus biases on q, k, v
  gpt2     GPT2LMHeadModel     learned positions, LayerNorm, GELU-tanh, biases everywhere

Layouts (HF name -> Cirrus path, per layer i; HF Linear weights are [out, in]):
  model.embed_tokens.weight [V, D]            embedding.embedding [V, D]
  model.layers.i.self_attn.q_proj.weight      layers[i].attention.q_proj.kernel [D, N, H]
    [N*H, D] (k_proj, v_proj: [K*H, D])         (k_proj, v_proj: [D, K, H])
  model.layers.i.self_attn.o_proj.weight      layers[i].attention.o_proj.kernel [N, H, D]
  model.layers.i.mlp.{gate,up,down}_proj      layers[i].mlp.{gate,up,down}_proj.kernel (= W^T)
  model.layers.i.input_layernorm.weight       layers[i].attention_norm.scale
  model.layers.i.post_attention_layernorm     layers[i].mlp_norm.scale
  model.norm.weight, lm_head.weight [V, D]    final_norm.scale, lm_head.kernel [D, V]
GPT-2 uses Conv1D, whose weights are [in, out] already, and one fused c_attn [D, 3 N H] that
splits into q, k, v. HF and Cirrus both rotate (x[i], x[i + H/2]) pairs in RoPE, so q and k
need no permutation. A bias that HF leaves out but the Cirrus config has (Llama with
attention_bias but no mlp_bias imports as use_bias=True) is zero: the forward is unchanged.

Mistral's sliding-window attention is not modelled: a model with a window W imports with
max_seq_len = min(max_position_embeddings, W), where full causal attention is the same thing.
"""

import json
import math
import os
import re
import shutil
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from research.checkpoint.hf_config import (
    FAMILIES,
    config_from_hf,
    config_to_hf,
    export_family,
    family_of,
)
from research.checkpoint.param_arrays import from_flat, to_flat
from research.errors import UserError
from research.model import ModelConfig

__all__ = [
    "FAMILIES",
    "TOKENIZER_FILES",
    "SafetensorsTensors",
    "config_from_hf",
    "config_to_hf",
    "copy_tokenizer_files",
    "export_family",
    "family_of",
    "load_hf",
    "params_from_hf",
    "params_to_hf",
    "read_config",
    "save_hf",
]

_PREFIX = {"llama": "model.", "mistral": "model.", "qwen2": "model.", "gpt2": "transformer."}
# Tensors a checkpoint may hold that are not parameters: rotary caches, GPT-2's causal masks.
_IGNORED = re.compile(r"(^|\.)(rotary_emb\.inv_freq|attn\.bias|attn\.masked_bias)$")
# Tokenizer files copied verbatim between a Hugging Face directory and a run's tokenizer/.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
)
_CONFIG_FILE = "config.json"
_INDEX_FILE = "model.safetensors.index.json"
_SINGLE_FILE = "model.safetensors"


# --- parameter layouts ---------------------------------------------------------------------------


class _Tensor:
    """One HF tensor: its name and shape, the Cirrus paths it fills, and both conversions."""

    def __init__(self, name, shape, paths, to_cirrus, to_hf):
        self.name, self.shape, self.paths = name, tuple(shape), tuple(paths)
        self.to_cirrus, self.to_hf = to_cirrus, to_hf


def _same(name, path, shape) -> _Tensor:
    return _Tensor(name, shape, [path], lambda w: (w,), lambda x: x)


def _linear(name, path, in_shape, out_shape) -> _Tensor:
    """A torch Linear weight [prod(out), prod(in)] <-> a Cirrus kernel [*in, *out]."""
    size_in, size_out = math.prod(in_shape), math.prod(out_shape)
    return _Tensor(
        name,
        (size_out, size_in),
        [path],
        lambda w: (w.T.reshape(*in_shape, *out_shape),),
        lambda k: k.reshape(size_in, size_out).T,
    )


def _conv1d(name, path, in_shape, out_shape) -> _Tensor:
    """A GPT-2 Conv1D weight [prod(in), prod(out)] <-> a Cirrus kernel [*in, *out]."""
    size_in, size_out = math.prod(in_shape), math.prod(out_shape)
    return _Tensor(
        name,
        (size_in, size_out),
        [path],
        lambda w: (w.reshape(*in_shape, *out_shape),),
        lambda k: k.reshape(size_in, size_out),
    )


def _bias(name, path, out_shape) -> _Tensor:
    size = math.prod(out_shape)
    return _Tensor(
        name, (size,), [path], lambda b: (b.reshape(out_shape),), lambda b: b.reshape(-1)
    )


def _fused_qkv(name, paths, d_model, num_heads, head_dim, is_bias) -> _Tensor:
    """GPT-2's c_attn: [D, 3 N H] (bias [3 N H]) <-> q, k, v kernels [D, N, H] (biases [N, H])."""
    width = num_heads * head_dim
    if is_bias:
        return _Tensor(
            name,
            (3 * width,),
            paths,
            lambda b: tuple(x.reshape(num_heads, head_dim) for x in np.split(b, 3)),
            lambda *xs: np.concatenate([x.reshape(-1) for x in xs]),
        )
    return _Tensor(
        name,
        (d_model, 3 * width),
        paths,
        lambda w: tuple(x.reshape(d_model, num_heads, head_dim) for x in np.split(w, 3, axis=1)),
        lambda *xs: np.concatenate([x.reshape(d_model, width) for x in xs], axis=1),
    )


def _layout(c: ModelConfig, family: str, *, attention_bias: bool, mlp_bias: bool) -> list:
    """Every HF tensor of `family` for config `c`, with its Cirrus paths and conversions."""
    if family == "gpt2":
        return _gpt2_layout(c)
    d, n, k, h, f = c.d_model, c.num_heads, c.num_kv_heads, c.resolved_head_dim, c.mlp_dim
    tensors = [_same("model.embed_tokens.weight", ("embedding", "embedding"), (c.vocab_size, d))]
    for i in range(c.num_layers):
        hf, ours = f"model.layers.{i}.", ("layers", i)
        attention, mlp = ours + ("attention",), ours + ("mlp",)
        heads = {"q_proj": (n, h), "k_proj": (k, h), "v_proj": (k, h)}
        for proj, out_shape in heads.items():
            name = f"{hf}self_attn.{proj}"
            tensors.append(_linear(f"{name}.weight", attention + (proj, "kernel"), (d,), out_shape))
            if attention_bias or family == "qwen2":
                tensors.append(_bias(f"{name}.bias", attention + (proj, "bias"), out_shape))
        o_name, o_path = f"{hf}self_attn.o_proj", attention + ("o_proj",)
        tensors.append(_linear(f"{o_name}.weight", o_path + ("kernel",), (n, h), (d,)))
        if attention_bias:
            tensors.append(_bias(f"{o_name}.bias", o_path + ("bias",), (d,)))
        for proj, in_dim, out_dim in (("gate_proj", d, f), ("up_proj", d, f), ("down_proj", f, d)):
            name = f"{hf}mlp.{proj}"
            tensors.append(_linear(f"{name}.weight", mlp + (proj, "kernel"), (in_dim,), (out_dim,)))
            if mlp_bias:
                tensors.append(_bias(f"{name}.bias", mlp + (proj, "bias"), (out_dim,)))
        tensors.append(
            _same(f"{hf}input_layernorm.weight", ours + ("attention_norm", "scale"), (d,))
        )
        tensors.append(
            _same(f"{hf}post_attention_layernorm.weight", ours + ("mlp_norm", "scale"), (d,))
        )
    tensors.append(_same("model.norm.weight", ("final_norm", "scale"), (d,)))
    if not c.tie_embeddings:
        tensors.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d,), (c.vocab_size,)))
    return tensors


def _gpt2_layout(c: ModelConfig) -> list:
    d, n, h, f = c.d_model, c.num_heads, c.resolved_head_dim, c.mlp_dim
    tensors = [
        _same("transformer.wte.weight", ("embedding", "embedding"), (c.vocab_size, d)),
        _same("transformer.wpe.weight", ("position_embedding", "embedding"), (c.max_seq_len, d)),
    ]
    for i in range(c.num_layers):
        hf, ours = f"transformer.h.{i}.", ("layers", i)
        attention, mlp = ours + ("attention",), ours + ("mlp",)
        qkv = [attention + (proj,) for proj in ("q_proj", "k_proj", "v_proj")]
        tensors += [
            _same(f"{hf}ln_1.weight", ours + ("attention_norm", "scale"), (d,)),
            _same(f"{hf}ln_1.bias", ours + ("attention_norm", "bias"), (d,)),
            _fused_qkv(f"{hf}attn.c_attn.weight", [p + ("kernel",) for p in qkv], d, n, h, False),
            _fused_qkv(f"{hf}attn.c_attn.bias", [p + ("bias",) for p in qkv], d, n, h, True),
            _conv1d(f"{hf}attn.c_proj.weight", attention + ("o_proj", "kernel"), (n, h), (d,)),
            _same(f"{hf}attn.c_proj.bias", attention + ("o_proj", "bias"), (d,)),
            _same(f"{hf}ln_2.weight", ours + ("mlp_norm", "scale"), (d,)),
            _same(f"{hf}ln_2.bias", ours + ("mlp_norm", "bias"), (d,)),
            _conv1d(f"{hf}mlp.c_fc.weight", mlp + ("fc", "kernel"), (d,), (f,)),
            _same(f"{hf}mlp.c_fc.bias", mlp + ("fc", "bias"), (f,)),
            _conv1d(f"{hf}mlp.c_proj.weight", mlp + ("proj", "kernel"), (f,), (d,)),
            _same(f"{hf}mlp.c_proj.bias", mlp + ("proj", "bias"), (d,)),
        ]
    tensors += [
        _same("transformer.ln_f.weight", ("final_norm", "scale"), (d,)),
        _same("transformer.ln_f.bias", ("final_norm", "bias"), (d,)),
    ]
    if not c.tie_embeddings:
        tensors.append(_linear("lm_head.weight", ("lm_head", "kernel"), (d,), (c.vocab_size,)))
    return tensors


# --- import --------------------------------------------------------------------------------------


def params_from_hf(
    model_config: ModelConfig,
    family: str,
    tensors: Mapping[str, np.ndarray],
    *,
    hf_config: dict | None = None,
    source_name: Callable[[str], str] = lambda name: name,
    where: str = "the checkpoint",
):
    """Cirrus parameters (an nnx.State of float32 numpy arrays) from HF-named tensors.

    Args:
      model_config, family: from `config_from_hf`.
      tensors: HF name -> array ([out, in] Linear weights), read lazily one at a time; names
        with or without the base-model prefix ("model.", "transformer.").
      hf_config: the config.json dict (its attention_bias / mlp_bias say which biases exist).
      source_name: how to show an HF name in errors (GGUF passes its own tensor names).
      where: the file or directory named in errors.

    Raises UserError listing the missing and unexpected tensors, or a tensor's wrong shape.
    """
    hf_config = hf_config or {}
    layout = _layout(
        model_config,
        family,
        attention_bias=bool(hf_config.get("attention_bias", False)),
        mlp_bias=bool(hf_config.get("mlp_bias", False)),
    )
    names = _canonical_names(tensors, family)
    expected = {tensor.name for tensor in layout}
    found = {name for name in names if not _IGNORED.search(name)}
    if model_config.tie_embeddings:
        found.discard("lm_head.weight")  # Some tied checkpoints store the shared matrix twice.
    _check_names(expected, found, source_name, where, family)
    flat = {}
    for tensor in layout:
        array = np.asarray(tensors[names[tensor.name]], dtype=np.float32)
        if array.shape != tensor.shape:
            raise UserError(
                f"{where}: tensor {source_name(tensor.name)} has shape {list(array.shape)}, "
                f"expected {list(tensor.shape)} from the config (d_model={model_config.d_model}, "
                f"heads={model_config.num_heads}/{model_config.num_kv_heads}, "
                f"mlp_dim={model_config.mlp_dim}, vocab_size={model_config.vocab_size})."
            )
        for path, value in zip(tensor.paths, tensor.to_cirrus(array), strict=True):
            flat[path] = np.ascontiguousarray(value)
    return from_flat(model_config, flat, missing_bias_is_zero=True)


def _canonical_names(tensors: Mapping, family: str) -> dict:
    """Full HF name -> the key in `tensors` (adds the base-model prefix where it is missing)."""
    prefix = _PREFIX[family]
    names = {}
    for key in tensors:
        full = key if key.startswith(prefix) or key == "lm_head.weight" else prefix + key
        names[full] = key
    return names


def _check_names(expected: set, found: set, source_name, where: str, family: str):
    missing, unexpected = sorted(expected - found), sorted(found - expected)
    if not missing and not unexpected:
        return

    def listing(names):
        shown = ", ".join(source_name(name) for name in _natural(names)[:8])
        return shown + (f", ... ({len(names)} in all)" if len(names) > 8 else "")

    lines = [f"{where} does not match a {family} model of its config:"]
    if missing:
        lines.append(f"  missing tensors: {listing(missing)}")
    if unexpected:
        lines.append(f"  unexpected tensors: {listing(unexpected)}")
    lines.append(f"  expected {len(expected)} tensors, found {len(found)}.")
    raise UserError("\n".join(lines))


def _natural(names) -> list:
    return sorted(
        names, key=lambda s: [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", s)]
    )


class SafetensorsTensors(Mapping):
    """The tensors of a directory's *.safetensors files (sharded with an index, or not),
    loaded lazily as numpy arrays (bfloat16 and float16 become float32)."""

    def __init__(self, directory: str):
        import safetensors

        self._safetensors = safetensors
        self.directory = directory
        index = os.path.join(directory, _INDEX_FILE)
        if os.path.isfile(index):
            with open(index, encoding="utf-8") as f:
                weight_map = json.load(f)["weight_map"]
            self._files = {
                name: _confined(directory, index, name, file) for name, file in weight_map.items()
            }
        else:
            files = sorted(
                os.path.join(directory, name)
                for name in os.listdir(directory)
                if name.endswith(".safetensors")
            )
            if not files:
                others = [n for n in os.listdir(directory) if n.endswith((".bin", ".pt", ".pth"))]
                hint = (
                    f" It has {others}: re-save it with `save_pretrained(dir, "
                    "safe_serialization=True)`."
                    if others
                    else ""
                )
                raise UserError(
                    f"{directory} has no *.safetensors weights (expected {_SINGLE_FILE} or "
                    f"{_INDEX_FILE} with its shards).{hint}"
                )
            self._files = {}
            for path in files:
                with safetensors.safe_open(path, framework="np") as f:
                    self._files.update(dict.fromkeys(f.keys(), path))

    def __iter__(self) -> Iterator[str]:
        return iter(self._files)

    def __len__(self) -> int:
        return len(self._files)

    def __getitem__(self, name: str) -> np.ndarray:
        path = self._files[name]
        if not os.path.isfile(path):
            raise UserError(f"{path}, named in {_INDEX_FILE} for {name}, does not exist.")
        with self._safetensors.safe_open(path, framework="np") as f:
            if f.get_slice(name).get_dtype() != "BF16":
                return f.get_tensor(name).astype(np.float32)
        # numpy has no bfloat16: read through JAX on the host, then widen.
        import jax

        with (
            jax.default_device(jax.devices("cpu")[0]),
            self._safetensors.safe_open(path, framework="flax") as f,
        ):
            return np.asarray(f.get_tensor(name), dtype=np.float32)


def _confined(directory: str, index: str, name: str, file) -> str:
    """The path of `index`'s weight_map entry `name: file`, refused (UserError) unless it lies
    inside `directory`: no absolute paths, no `..` and no symlinks out of it. The Hugging Face
    cache's exception: a snapshots/<revision>/ file may link into the repository's blobs/."""
    root = os.path.realpath(directory)
    roots = [root]
    if os.path.basename(os.path.dirname(root)) == "snapshots":  # hub/models--x/snapshots/<rev>
        roots.append(os.path.join(os.path.dirname(os.path.dirname(root)), "blobs"))
    if isinstance(file, str) and not os.path.isabs(file) and file:
        resolved = os.path.realpath(os.path.join(root, file))
        if any(os.path.commonpath([r, resolved]) == r for r in roots if resolved != r):
            return os.path.join(directory, file)
    raise UserError(
        f"{index}: the weight_map entry {name!r} -> {file!r} points outside the model directory "
        f"{directory}; each weight file must be a relative path inside it (no absolute path, "
        f"'..' or symlink out of it). Fix the index file or download the model again."
    )


def read_config(directory: str) -> dict:
    path = os.path.join(directory, _CONFIG_FILE)
    if not os.path.isfile(path):
        what = "does not exist" if not os.path.exists(directory) else f"has no {_CONFIG_FILE}"
        raise UserError(
            f"{directory} {what}: expected a Hugging Face model directory (config.json and "
            "*.safetensors, e.g. from `save_pretrained`)."
        )
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def load_hf(directory: str):
    """(model_config, params, family, hf_config) of a Hugging Face model directory.

    params: an nnx.State of float32 numpy arrays, in the layout `Decoder(model_config)` has.
    """
    hf_config = read_config(directory)
    model_config, family = config_from_hf(hf_config, os.path.join(directory, _CONFIG_FILE))
    params = params_from_hf(
        model_config, family, SafetensorsTensors(directory), hf_config=hf_config, where=directory
    )
    return model_config, params, family, hf_config


# --- export --------------------------------------------------------------------------------------


def params_to_hf(model_config: ModelConfig, family: str, params) -> dict[str, np.ndarray]:
    """HF name -> float32 numpy array for Cirrus `params` (nnx.State or its pure dict)."""
    flat = to_flat(params)
    biases = family in ("llama", "mistral") and model_config.use_bias
    tensors = {}
    for tensor in _layout(model_config, family, attention_bias=biases, mlp_bias=biases):
        if tensor.name.endswith(".bias") and not any(path in flat for path in tensor.paths):
            array = np.zeros(tensor.shape, np.float32)  # e.g. GPT-2 biases of a bias-free model
        else:
            array = tensor.to_hf(*(flat[path] for path in tensor.paths))
        tensors[tensor.name] = np.ascontiguousarray(array, dtype=np.float32)
    return tensors


def save_hf(
    directory: str,
    model_config: ModelConfig,
    params,
    *,
    tokenizer_dir: str | None = None,
    family: str | None = None,
    special_ids: dict | None = None,
    max_shard_bytes: int = 5 * 2**30,
) -> str:
    """Writes a directory that `transformers.AutoModelForCausalLM.from_pretrained` loads.

    config.json, model.safetensors (or model-0000i-of-0000n.safetensors shards plus
    model.safetensors.index.json past `max_shard_bytes`), float32, and the tokenizer files of
    `tokenizer_dir` copied as they are. `family` is a preference (e.g. "mistral" for a model
    that came from Mistral); the config decides. special_ids: bos/eos/pad_token_id for
    config.json. Returns the family written.
    """
    from safetensors.numpy import save_file

    family = export_family(model_config, family)
    tensors = params_to_hf(model_config, family, params)
    os.makedirs(directory, exist_ok=True)
    shards = _shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        save_file(tensors, os.path.join(directory, _SINGLE_FILE), metadata={"format": "pt"})
    else:
        weight_map = {}
        for index, names in enumerate(shards):
            file = f"model-{index + 1:05d}-of-{len(shards):05d}.safetensors"
            save_file(
                {name: tensors[name] for name in names},
                os.path.join(directory, file),
                metadata={"format": "pt"},
            )
            weight_map.update(dict.fromkeys(names, file))
        total = sum(array.nbytes for array in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        with open(os.path.join(directory, _INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=2)
    with open(os.path.join(directory, _CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config_to_hf(model_config, family, special_ids), f, indent=2)
    if tokenizer_dir:
        copy_tokenizer_files(tokenizer_dir, directory)
    return family


def _shards(tensors: dict, max_bytes: int) -> list[list[str]]:
    shards, size = [[]], 0
    for name, array in tensors.items():
        if shards[-1] and size + array.nbytes > max_bytes:
            shards.append([])
            size = 0
        shards[-1].append(name)
        size += array.nbytes
    return shards


def copy_tokenizer_files(source: str, destination: str) -> list[str]:
    """Copies the Hugging Face tokenizer files of `source` into `destination`; returns them."""
    os.makedirs(destination, exist_ok=True)
    copied = []
    for name in TOKENIZER_FILES:
        path = os.path.join(source, name)
        if os.path.isfile(path):
            shutil.copyfile(path, os.path.join(destination, name))
            copied.append(name)
    return copied
