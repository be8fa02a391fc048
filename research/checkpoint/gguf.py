"""GGUF import (llama.cpp's format): weights dequantized to float32, tokenizer from metadata.

A GGUF file holds llama.cpp tensor names, quantized blocks (Q4_0, Q4_1, Q8_0, K-quants, ...)
and its hyperparameters and tokenizer as metadata. `load_gguf` turns the metadata into a
Hugging Face config dict and each tensor into its Hugging Face name and layout, so that the
Hugging Face importer (research/checkpoint/hf.py) builds the Cirrus parameters:

  - dequantize with the `gguf` package (`gguf.quants.dequantize`): float32 [out, in];
  - llama arch: undo llama.cpp's row permutation of attn_q / attn_k (its converter reorders
    each head's rows from the rotate-half RoPE layout to interleaved pairs);
  - gpt2 arch: transpose attn_qkv / attn_output / ffn_up / ffn_down back to Conv1D [in, out].

Architectures: llama (also Mistral and SmolLM files), qwen2, gpt2. Tokenizers: the BPE
"gpt2" kind (byte-level vocabulary + merges), rebuilt as a Hugging Face tokenizer.json with
the pre-tokenizer that `tokenizer.ggml.pre` names.
"""

import os
import re
from collections.abc import Callable, Iterator, Mapping

import numpy as np

from research.checkpoint import hf
from research.data import Tokenizer
from research.errors import UserError

_FAMILY = {"llama": "llama", "qwen2": "qwen2", "gpt2": "gpt2"}

_LLAMA_GLOBAL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}
_LLAMA_LAYER = {
    "attn_norm.weight": "input_layernorm.weight",
    "ffn_norm.weight": "post_attention_layernorm.weight",
    **{
        f"attn_{g}.{kind}": f"self_attn.{h}_proj.{kind}"
        for g, h in (("q", "q"), ("k", "k"), ("v", "v"), ("output", "o"))
        for kind in ("weight", "bias")
    },
    **{
        f"ffn_{name}.{kind}": f"mlp.{name}_proj.{kind}"
        for name in ("gate", "up", "down")
        for kind in ("weight", "bias")
    },
}
_GPT2_GLOBAL = {
    "token_embd.weight": "transformer.wte.weight",
    "position_embd.weight": "transformer.wpe.weight",
    "output_norm.weight": "transformer.ln_f.weight",
    "output_norm.bias": "transformer.ln_f.bias",
    "output.weight": "lm_head.weight",
}
_GPT2_LAYER = {
    "attn_norm.weight": "ln_1.weight",
    "attn_norm.bias": "ln_1.bias",
    "attn_qkv.weight": "attn.c_attn.weight",
    "attn_qkv.bias": "attn.c_attn.bias",
    "attn_output.weight": "attn.c_proj.weight",
    "attn_output.bias": "attn.c_proj.bias",
    "ffn_norm.weight": "ln_2.weight",
    "ffn_norm.bias": "ln_2.bias",
    "ffn_up.weight": "mlp.c_fc.weight",
    "ffn_up.bias": "mlp.c_fc.bias",
    "ffn_down.weight": "mlp.c_proj.weight",
    "ffn_down.bias": "mlp.c_proj.bias",
}
# llama.cpp stores these GPT-2 Conv1D weights transposed, as [out, in].
_GPT2_TRANSPOSED = ("attn_qkv.weight", "attn_output.weight", "ffn_up.weight", "ffn_down.weight")
_LAYER_NAME = re.compile(r"^blk\.(\d+)\.(.+)$")

# Pre-tokenizer regexes of `tokenizer.ggml.pre` values (as in llama.cpp's llama-vocab.cpp).
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT2_PRE = ("gpt2", "default", "gpt-2", "")
_DIGITS_THEN_GPT2_PRE = ("smollm", "starcoder", "refact")
_LLAMA3_PRE = ("llama3", "llama-v3", "llama-bpe", "smaug-bpe")
_QWEN2_PRE = ("qwen2", "deepseek-r1-qwen")
_CONTROL, _USER_DEFINED = 3, 4  # tokenizer.ggml.token_type values


def _reader(path: str):
    import gguf

    if not os.path.isfile(path):
        raise UserError(f"{path!r} does not exist; give a GGUF file (.gguf).")
    try:
        return gguf.GGUFReader(path)
    except Exception as error:  # Not a GGUF file, truncated, unknown version.
        raise UserError(f"{path} is not a readable GGUF file ({error}).") from None


def _metadata(reader, key: str, default=None):
    field = reader.get_field(key)
    return default if field is None else field.contents()


class GGUFTensors(Mapping):
    """The tensors of a GGUF file under their Hugging Face names and layouts, dequantized to
    float32 one at a time when read."""

    def __init__(self, reader, architecture: str):
        self.architecture = architecture
        self._num_heads = _metadata(reader, f"{architecture}.attention.head_count")
        self._num_kv_heads = _metadata(
            reader, f"{architecture}.attention.head_count_kv", self._num_heads
        )
        self._tensors = {}  # HF name -> (GGUF name, ReaderTensor)
        for tensor in reader.tensors:
            self._tensors[self.hf_name(tensor.name)] = (tensor.name, tensor)
        self._gguf_names = {hf_name: gguf_name for hf_name, (gguf_name, _) in self._tensors.items()}

    def _tables(self):
        if self.architecture == "gpt2":
            return _GPT2_GLOBAL, _GPT2_LAYER, "transformer.h."
        return _LLAMA_GLOBAL, _LLAMA_LAYER, "model.layers."

    def hf_name(self, gguf_name: str) -> str:
        """The Hugging Face name of a GGUF tensor (unknown names stay as they are)."""
        global_names, layer_names, prefix = self._tables()
        if gguf_name in global_names:
            return global_names[gguf_name]
        match = _LAYER_NAME.match(gguf_name)
        if match and match.group(2) in layer_names:
            return f"{prefix}{match.group(1)}.{layer_names[match.group(2)]}"
        return gguf_name

    def gguf_name(self, hf_name: str) -> str:
        """The GGUF name of a Hugging Face tensor name (for messages)."""
        if hf_name in self._gguf_names:
            return self._gguf_names[hf_name]
        global_names, layer_names, prefix = self._tables()
        for gguf_name, name in global_names.items():
            if name == hf_name:
                return gguf_name
        match = re.match(rf"^{re.escape(prefix)}(\d+)\.(.+)$", hf_name)
        if match:
            for gguf_name, name in layer_names.items():
                if name == match.group(2):
                    return f"blk.{match.group(1)}.{gguf_name}"
        return hf_name

    def __iter__(self) -> Iterator[str]:
        return iter(self._tensors)

    def __len__(self) -> int:
        return len(self._tensors)

    def __getitem__(self, hf_name: str) -> np.ndarray:
        import gguf

        gguf_name, tensor = self._tensors[hf_name]
        array = gguf.quants.dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        array = array.reshape([int(n) for n in reversed(tensor.shape)])  # numpy order
        suffix = _LAYER_NAME.match(gguf_name).group(2) if _LAYER_NAME.match(gguf_name) else ""
        if self.architecture == "llama" and suffix.startswith(("attn_q.", "attn_k.")):
            heads = self._num_heads if suffix.startswith("attn_q.") else self._num_kv_heads
            array = _unpermute(array, heads)
        if self.architecture == "gpt2" and suffix in _GPT2_TRANSPOSED:
            array = array.T
        return np.ascontiguousarray(array)


def _unpermute(w: np.ndarray, num_heads: int) -> np.ndarray:
    """Inverse of llama.cpp's `permute` (convert_hf_to_gguf.py) on q/k rows [heads * H, ...].

    llama.cpp reorders each head's H rows from (first half, second half) to interleaved
    pairs: w.reshape(heads, 2, H / 2, ...).swapaxes(1, 2). Swapping back restores the
    rotate-half layout that HF and Cirrus use.
    """
    rows = w.shape[0]
    return (
        w.reshape(num_heads, rows // num_heads // 2, 2, *w.shape[1:])
        .swapaxes(1, 2)
        .reshape(w.shape)
    )


def hf_config_from_gguf(reader, path: str = "the GGUF file") -> dict:
    """A Hugging Face config.json dict from the file's `{arch}.*` metadata."""
    architecture = _metadata(reader, "general.architecture")
    if architecture not in _FAMILY:
        raise UserError(
            f"{path}: unsupported GGUF architecture {architecture!r}; expected one of "
            f"{sorted(_FAMILY)}."
        )
    names = {tensor.name for tensor in reader.tensors}
    shapes = {tensor.name: [int(n) for n in reversed(tensor.shape)] for tensor in reader.tensors}
    if "token_embd.weight" not in names:
        raise UserError(f"{path}: no token_embd.weight tensor; found {sorted(names)[:8]} ...")
    vocab_size = shapes["token_embd.weight"][0]

    def get(key, default=None, required=True):
        value = _metadata(reader, f"{architecture}.{key}", default)
        if value is None and required:
            raise UserError(f"{path}: metadata {architecture}.{key} is missing.")
        return value

    def integer(value):  # Some files store per-layer arrays of equal values.
        return int(value[0]) if isinstance(value, list) else int(value)

    num_heads = integer(get("attention.head_count"))
    d_model = int(get("embedding_length"))
    tied = "output.weight" not in names
    if architecture == "gpt2":
        return {
            "architectures": ["GPT2LMHeadModel"],
            "model_type": "gpt2",
            "vocab_size": vocab_size,
            "n_embd": d_model,
            "n_head": num_heads,
            "n_layer": int(get("block_count")),
            "n_inner": integer(get("feed_forward_length")),
            "n_positions": int(get("context_length")),
            "layer_norm_epsilon": float(get("attention.layer_norm_epsilon", 1e-5)),
            "activation_function": "gelu_new",
            "tie_word_embeddings": tied,
        }
    head_dim = int(get("attention.key_length", d_model // num_heads))
    rope_dim = int(get("rope.dimension_count", head_dim))
    if rope_dim != head_dim:
        raise UserError(
            f"{path}: RoPE on {rope_dim} of {head_dim} head dimensions (partial RoPE) is not "
            "supported."
        )
    scaling = get("rope.scaling.type", "none", required=False)
    if scaling not in ("none", None) or "rope_freqs.weight" in names:
        raise UserError(
            f"{path}: RoPE frequency scaling ({scaling if scaling != 'none' else 'rope_freqs'})"
            " is not supported; only unscaled RoPE imports."
        )
    family = _FAMILY[architecture]
    config = {
        "architectures": [f"{'Qwen2' if family == 'qwen2' else 'Llama'}ForCausalLM"],
        "model_type": family,
        "vocab_size": vocab_size,
        "hidden_size": d_model,
        "intermediate_size": integer(get("feed_forward_length")),
        "num_hidden_layers": int(get("block_count")),
        "num_attention_heads": num_heads,
        "num_key_value_heads": integer(get("attention.head_count_kv", num_heads)),
        "head_dim": head_dim,
        "rms_norm_eps": float(get("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(get("rope.freq_base", 10_000.0, required=False)),
        "max_position_embeddings": int(get("context_length", 2048, required=False)),
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
    }
    if family == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
        config["mlp_bias"] = "blk.0.ffn_up.bias" in names
    return config


def tokenizer_from_gguf(reader, path: str = "the GGUF file", log: Callable = print):
    """(Tokenizer, extra tokenizer_config.json entries) from the file's metadata, or
    (None, {}) with a logged reason when the tokenizer kind is not supported."""
    import tokenizers
    from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors

    kind = _metadata(reader, "tokenizer.ggml.model")
    if kind != "gpt2":
        log(
            f"warning: {path} has a {kind!r} tokenizer; only the byte-level BPE kind 'gpt2' "
            "is rebuilt, so no tokenizer is imported (give one with data.tokenizer_path)."
        )
        return None, {}
    pre = _metadata(reader, "tokenizer.ggml.pre", "default")
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    split_bytes = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    normalizer = None
    if pre in _GPT2_PRE:
        pre_tokenizer = byte_level
    elif pre in _DIGITS_THEN_GPT2_PRE:
        pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Digits(individual_digits=True), byte_level]
        )
    elif pre in _LLAMA3_PRE + _QWEN2_PRE:
        split = _LLAMA3_SPLIT if pre in _LLAMA3_PRE else _QWEN2_SPLIT
        pre_tokenizer = pre_tokenizers.Sequence(
            [pre_tokenizers.Split(Regex(split), behavior="isolated"), split_bytes]
        )
        normalizer = normalizers.NFC() if pre in _QWEN2_PRE else None
    else:
        known = _GPT2_PRE + _DIGITS_THEN_GPT2_PRE + _LLAMA3_PRE + _QWEN2_PRE
        log(
            f"warning: {path} names pre-tokenizer {pre!r}, not one of {known}; no tokenizer "
            "is imported (give one with data.tokenizer_path)."
        )
        return None, {}
    tokens = list(_metadata(reader, "tokenizer.ggml.tokens"))
    merges = [
        tuple(merge.split(" ", 1)) for merge in _metadata(reader, "tokenizer.ggml.merges", [])
    ]
    vocab = {}
    for index, token in enumerate(tokens):
        vocab.setdefault(token, index)
    model = tokenizers.models.BPE(vocab=vocab, merges=merges, ignore_merges=pre in _LLAMA3_PRE)
    tokenizer = tokenizers.Tokenizer(model)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.ByteLevel()
    token_types = list(_metadata(reader, "tokenizer.ggml.token_type", []))
    tokenizer.add_special_tokens(
        [
            AddedToken(token, special=True, normalized=False)
            for token, kind in zip(tokens, token_types, strict=False)
            if kind == _CONTROL
        ]
    )
    tokenizer.add_tokens(
        [
            AddedToken(token, special=False, normalized=False)
            for token, kind in zip(tokens, token_types, strict=False)
            if kind == _USER_DEFINED
        ]
    )

    def token(key):
        index = _metadata(reader, f"tokenizer.ggml.{key}")
        return tokens[index] if index is not None and 0 <= index < len(tokens) else None

    eos = token("eos_token_id")
    if eos is None:
        log(f"warning: {path} names no eos token; no tokenizer is imported.")
        return None, {}
    bos = token("bos_token_id") or eos
    add_bos = bool(_metadata(reader, "tokenizer.ggml.add_bos_token", False))
    if add_bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, vocab[bos])]
        )
    else:
        tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    extra = {"add_bos_token": add_bos}
    chat_template = _metadata(reader, "tokenizer.chat_template")
    if chat_template:
        extra["chat_template"] = chat_template
    return (
        Tokenizer(tokenizer, bos_token=bos, eos_token=eos, pad_token=token("padding_token_id")),
        extra,
    )


def load_gguf(path: str, log: Callable = print):
    """(model_config, params, family, hf_config, tokenizer, tokenizer_extra) of a GGUF file.

    params: an nnx.State of float32 numpy arrays (dequantized). tokenizer: a
    research.data.Tokenizer or None (see `tokenizer_from_gguf`); tokenizer_extra: entries
    for tokenizer_config.json (chat_template, add_bos_token).
    """
    reader = _reader(path)
    hf_config = hf_config_from_gguf(reader, path)
    model_config, family = hf.config_from_hf(hf_config, path)
    tensors = GGUFTensors(reader, _metadata(reader, "general.architecture"))
    params = hf.params_from_hf(
        model_config,
        family,
        tensors,
        hf_config=hf_config,
        source_name=tensors.gguf_name,
        where=path,
    )
    tokenizer, extra = tokenizer_from_gguf(reader, path, log)
    return model_config, params, family, hf_config, tokenizer, extra
