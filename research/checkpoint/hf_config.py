"""Hugging Face config.json <-> ModelConfig for the Llama, Mistral, Qwen2 and GPT-2 families.

`config_from_hf` reads a config.json dict (transformers 4 `rope_scaling` or transformers 5
`rope_parameters`); `config_to_hf` writes one that `transformers.AutoConfig` reads back as the
same ModelConfig; `export_family` picks the family that represents a ModelConfig exactly.
Mistral's sliding window is not modelled: max_seq_len is capped at the window instead.
"""

from research.errors import UserError
from research.model import ModelConfig

FAMILIES = ("llama", "mistral", "qwen2", "gpt2")
_ARCHITECTURES = {
    "LlamaForCausalLM": "llama",
    "LlamaModel": "llama",
    "MistralForCausalLM": "mistral",
    "MistralModel": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "Qwen2Model": "qwen2",
    "GPT2LMHeadModel": "gpt2",
    "GPT2Model": "gpt2",
}
_EXPORT_ARCHITECTURE = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "gpt2": "GPT2LMHeadModel",
}
# GELU-tanh spellings in GPT-2 configs (gelu_fast is the same formula with rounded constants).
_GELU_TANH = ("gelu_new", "gelu_pytorch_tanh", "gelu_fast")


def family_of(hf_config: dict, where: str = "config.json") -> str:
    """ "llama" / "mistral" / "qwen2" / "gpt2" from `architectures` (or `model_type`)."""
    architectures = hf_config.get("architectures") or []
    for architecture in architectures:
        if architecture in _ARCHITECTURES:
            return _ARCHITECTURES[architecture]
    model_type = hf_config.get("model_type")
    if not architectures and model_type in FAMILIES:
        return model_type
    found = architectures or model_type
    raise UserError(
        f"unsupported architecture {found!r} in {where}: expected one of "
        f"{sorted(_ARCHITECTURES)} (model_type {', '.join(FAMILIES)})."
    )


def config_from_hf(hf_config: dict, where: str = "config.json") -> tuple[ModelConfig, str]:
    """The ModelConfig (float32) and family of a Hugging Face config.json dict."""
    family = family_of(hf_config, where)
    if family == "gpt2":
        return _gpt2_config(hf_config, where), family
    return _llama_config(hf_config, family, where), family


def _require(hf_config: dict, key: str, where: str):
    if key not in hf_config:
        raise UserError(f"{where} has no {key!r}, which a {hf_config.get('model_type')} needs.")
    return hf_config[key]


def _llama_config(hf: dict, family: str, where: str) -> ModelConfig:
    d_model = _require(hf, "hidden_size", where)
    num_heads = _require(hf, "num_attention_heads", where)
    head_dim = hf.get("head_dim") or d_model // num_heads
    activation = hf.get("hidden_act", "silu")
    if activation != "silu":
        raise UserError(f"{where}: hidden_act={activation!r}; only 'silu' (SwiGLU) is supported.")
    if hf.get("partial_rotary_factor", 1.0) != 1.0:
        raise UserError(f"{where}: partial_rotary_factor != 1 (partial RoPE) is not supported.")
    attention_bias = bool(hf.get("attention_bias", False))
    mlp_bias = bool(hf.get("mlp_bias", False))
    max_seq_len = hf.get("max_position_embeddings") or 2048
    window = _sliding_window(hf, family)
    if window:
        max_seq_len = min(max_seq_len, window)
    return ModelConfig(
        vocab_size=_require(hf, "vocab_size", where),
        d_model=d_model,
        num_layers=_require(hf, "num_hidden_layers", where),
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        mlp_dim=_require(hf, "intermediate_size", where),
        max_seq_len=max_seq_len,
        head_dim=0 if head_dim * num_heads == d_model else head_dim,
        positions="rope",
        **_rope(hf, where),
        norm="rmsnorm",
        norm_eps=float(hf.get("rms_norm_eps", 1e-6)),
        mlp_activation="swiglu",
        use_bias=attention_bias or mlp_bias,
        qkv_bias=family == "qwen2",
        tie_embeddings=bool(hf.get("tie_word_embeddings", False)),
        dtype="float32",
    )


def _rope(hf: dict, where: str) -> dict:
    """ModelConfig RoPE fields from `rope_parameters` (transformers 5) or `rope_scaling`."""
    rope = hf.get("rope_parameters") or hf.get("rope_scaling") or {}
    kind = rope.get("rope_type", rope.get("type", "default"))
    fields = {"rope_theta": float(rope.get("rope_theta", hf.get("rope_theta", 10_000.0)))}
    if kind == "llama3":
        fields.update(
            rope_scaling_factor=float(rope["factor"]),
            rope_scaling_low_freq=float(rope["low_freq_factor"]),
            rope_scaling_high_freq=float(rope["high_freq_factor"]),
            rope_scaling_original_len=int(rope["original_max_position_embeddings"]),
        )
    elif kind != "default":
        raise UserError(
            f"{where}: RoPE scaling {kind!r} is not supported (unscaled and 'llama3' are); "
            f"found {rope}."
        )
    return fields


def _sliding_window(hf: dict, family: str) -> int | None:
    if family == "qwen2" and not hf.get("use_sliding_window", False):
        return None
    return hf.get("sliding_window") or None


def _gpt2_config(hf: dict, where: str) -> ModelConfig:
    activation = hf.get("activation_function", "gelu_new")
    if activation not in _GELU_TANH:
        raise UserError(
            f"{where}: activation_function={activation!r}; expected one of {_GELU_TANH}."
        )
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise UserError(
            f"{where}: only 1/sqrt(head_dim) attention scaling is supported (found "
            f"scale_attn_weights={hf.get('scale_attn_weights', True)}, "
            f"scale_attn_by_inverse_layer_idx={hf.get('scale_attn_by_inverse_layer_idx')})."
        )
    d_model = _require(hf, "n_embd", where)
    num_heads = _require(hf, "n_head", where)
    return ModelConfig(
        vocab_size=_require(hf, "vocab_size", where),
        d_model=d_model,
        num_layers=_require(hf, "n_layer", where),
        num_heads=num_heads,
        num_kv_heads=num_heads,
        mlp_dim=hf.get("n_inner") or 4 * d_model,
        max_seq_len=hf.get("n_positions", 1024),
        positions="learned",
        norm="layernorm",
        norm_eps=float(hf.get("layer_norm_epsilon", 1e-5)),
        mlp_activation="gelu",
        use_bias=True,
        tie_embeddings=bool(hf.get("tie_word_embeddings", True)),
        dtype="float32",
    )


def export_family(model_config: ModelConfig, preferred: str | None = None) -> str:
    """The Hugging Face family that represents `model_config` exactly (`preferred` if it can)."""
    c = model_config
    if c.positions == "learned" and c.norm == "layernorm" and c.mlp_activation == "gelu":
        if c.num_kv_heads != c.num_heads or c.resolved_head_dim * c.num_heads != c.d_model:
            raise UserError(
                "GPT-2 export needs num_kv_heads == num_heads and head_dim * num_heads == "
                f"d_model; found num_heads={c.num_heads}, num_kv_heads={c.num_kv_heads}, "
                f"head_dim={c.resolved_head_dim}, d_model={c.d_model}."
            )
        return "gpt2"
    if c.positions == "rope" and c.norm == "rmsnorm" and c.mlp_activation == "swiglu":
        if c.qkv_bias and not c.use_bias:
            return "qwen2"
        return preferred if preferred in ("llama", "mistral") else "llama"
    raise UserError(
        f"no Hugging Face family matches positions={c.positions!r}, norm={c.norm!r}, "
        f"mlp_activation={c.mlp_activation!r}: export supports rope + rmsnorm + swiglu "
        "(Llama, Mistral, Qwen2) and learned + layernorm + gelu (GPT-2)."
    )


def config_to_hf(model_config: ModelConfig, family: str, special_ids: dict | None = None) -> dict:
    """A config.json dict that `transformers.AutoConfig` reads back as `model_config`."""
    c = model_config
    # Explicit None: otherwise transformers fills in its defaults (GPT-2's 50256).
    ids = {"bos_token_id": None, "eos_token_id": None, "pad_token_id": None, **(special_ids or {})}
    common = {
        "architectures": [_EXPORT_ARCHITECTURE[family]],
        "model_type": family,
        "vocab_size": c.vocab_size,
        "tie_word_embeddings": c.tie_embeddings,
        "dtype": "float32",
        **ids,
    }
    if family == "gpt2":
        return {
            **common,
            "n_embd": c.d_model,
            "n_head": c.num_heads,
            "n_layer": c.num_layers,
            "n_inner": c.mlp_dim,
            "n_positions": c.max_seq_len,
            "layer_norm_epsilon": c.norm_eps,
            "activation_function": "gelu_new",
            "scale_attn_weights": True,
            "resid_pdrop": 0.0,
            "embd_pdrop": 0.0,
            "attn_pdrop": 0.0,
        }
    hf = {
        **common,
        "hidden_size": c.d_model,
        "num_hidden_layers": c.num_layers,
        "num_attention_heads": c.num_heads,
        "num_key_value_heads": c.num_kv_heads,
        "head_dim": c.resolved_head_dim,
        "intermediate_size": c.mlp_dim,
        "max_position_embeddings": c.max_seq_len,
        "hidden_act": "silu",
        "rms_norm_eps": c.norm_eps,
        "rope_theta": c.rope_theta,
        "rope_parameters": {"rope_type": "default", "rope_theta": c.rope_theta},
    }
    if c.rope_scaling_factor:
        hf["rope_parameters"] = {
            "rope_type": "llama3",
            "rope_theta": c.rope_theta,
            "factor": c.rope_scaling_factor,
            "low_freq_factor": c.rope_scaling_low_freq,
            "high_freq_factor": c.rope_scaling_high_freq,
            "original_max_position_embeddings": c.rope_scaling_original_len,
        }
        hf["rope_scaling"] = hf["rope_parameters"]  # The key transformers 4 reads.
    if family in ("llama", "mistral"):
        hf.update(attention_bias=c.use_bias, mlp_bias=c.use_bias)
    if family == "mistral":
        hf["sliding_window"] = None
    if family == "qwen2":
        hf.update(use_sliding_window=False, sliding_window=None)
    return hf
