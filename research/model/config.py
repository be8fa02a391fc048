"""The model's one configuration: a frozen dataclass. Families are values, not classes."""

import dataclasses

from research.errors import UserError

POSITIONS = ("rope", "learned")
NORMS = ("rmsnorm", "layernorm")
ACTIVATIONS = ("swiglu", "gelu")
INITS = ("normal", "truncated_normal")
DTYPES = ("float32", "bfloat16")
REMATS = ("none", "full", "save_dots")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """A decoder-only transformer.

    GPT-2: positions="learned", norm="layernorm", mlp_activation="gelu", use_bias=True,
    tie_embeddings=True. Llama / Mistral: positions="rope", norm="rmsnorm",
    mlp_activation="swiglu", num_kv_heads < num_heads. Qwen2: Llama plus qkv_bias=True.
    """

    vocab_size: int = 8192
    d_model: int = 512
    num_layers: int = 8
    num_heads: int = 8
    num_kv_heads: int = 8
    mlp_dim: int = 2048
    max_seq_len: int = 256
    head_dim: int = 0  # 0 means d_model // num_heads.
    positions: str = "rope"
    rope_theta: float = 10_000.0
    # Llama 3.1+ RoPE frequency scaling (HF rope_type "llama3"); factor 0 turns it off.
    rope_scaling_factor: float = 0.0
    rope_scaling_low_freq: float = 1.0
    rope_scaling_high_freq: float = 4.0
    rope_scaling_original_len: int = 8192
    norm: str = "rmsnorm"
    norm_eps: float = 1e-5
    mlp_activation: str = "swiglu"
    use_bias: bool = False  # Biases on every dense layer (GPT-2).
    qkv_bias: bool = False  # Biases on q, k, v only (Qwen2).
    tie_embeddings: bool = False
    init: str = "normal"
    init_std: float = 0.02
    # GPT-2 / nanoGPT: residual output projections get std / sqrt(2 * num_layers).
    scale_residual_init: bool = True
    dtype: str = "float32"  # Compute dtype; parameters are always float32.
    remat: str = "none"
    # Weight quantization (research/compression/quantize.py): "none", "int8" (per output
    # channel or groups), "int4" (symmetric, groups of quant_group inputs) or "int4_asym"
    # (scale + min per group, as Q4_1). Inference only: launch.compress makes it.
    quant: str = "none"
    quant_group: int = 32
    # LoRA (research/model/lora.py): rank > 0 adds adapters A [in, r] (random) and B [r, out]
    # (zero) beside every Dense whose name matches lora_targets, scaled by alpha / rank; the
    # trainer then trains only those (the base frozen, float or quantized: QLoRA).
    # lora_targets: module names ("q_proj" matches every layer's) or one regex full-matched
    # against the dotted path ("layers.3.attention.q_proj"), as PEFT's target_modules.
    lora_rank: int = 0
    lora_alpha: float = 16.0
    lora_dropout: float = 0.0
    lora_targets: tuple = ("q_proj", "v_proj")

    def __post_init__(self):
        for name, allowed in (
            ("positions", POSITIONS),
            ("norm", NORMS),
            ("mlp_activation", ACTIVATIONS),
            ("init", INITS),
            ("dtype", DTYPES),
            ("remat", REMATS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise UserError(f"model.{name}={value!r} is not one of {allowed}.")
        from research.compression.quantize import check_mode

        check_mode(self.quant, self.quant_group)
        if self.lora_rank < 0 or not 0 <= self.lora_dropout < 1 or not self.lora_alpha > 0:
            raise UserError(
                f"model.lora_rank={self.lora_rank} (>= 0), model.lora_dropout="
                f"{self.lora_dropout} (in [0, 1)) and model.lora_alpha={self.lora_alpha} (> 0) "
                "are out of range."
            )
        if isinstance(self.lora_targets, str):
            object.__setattr__(self, "lora_targets", (self.lora_targets,))
        object.__setattr__(self, "lora_targets", tuple(self.lora_targets))
        for name in ("vocab_size", "d_model", "num_layers", "num_heads", "num_kv_heads"):
            if getattr(self, name) <= 0:
                raise UserError(f"model.{name} must be positive, got {getattr(self, name)}.")
        if self.num_heads % self.num_kv_heads:
            raise UserError(
                f"model.num_heads={self.num_heads} must be a multiple of "
                f"model.num_kv_heads={self.num_kv_heads} (grouped-query attention)."
            )
        if not self.head_dim and self.d_model % self.num_heads:
            raise UserError(
                f"model.d_model={self.d_model} is not divisible by model.num_heads="
                f"{self.num_heads}; set model.head_dim explicitly."
            )
        if self.positions == "rope" and self.resolved_head_dim % 2:
            raise UserError(
                f"model.head_dim={self.resolved_head_dim} must be even for RoPE (it rotates "
                f"pairs of dimensions); change model.head_dim or model.num_heads."
            )

        if self.rope_scaling_factor and not (
            self.rope_scaling_factor >= 1
            and 0 < self.rope_scaling_low_freq < self.rope_scaling_high_freq
            and self.rope_scaling_original_len > 0
        ):
            raise UserError(
                f"model.rope_scaling_factor={self.rope_scaling_factor} needs factor >= 1, "
                f"0 < model.rope_scaling_low_freq ({self.rope_scaling_low_freq}) < "
                f"model.rope_scaling_high_freq ({self.rope_scaling_high_freq}) and a positive "
                f"model.rope_scaling_original_len ({self.rope_scaling_original_len})."
            )

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    def replace(self, **changes) -> "ModelConfig":
        return dataclasses.replace(self, **changes)
