"""CompressConfig (`compress.*` in gin): which stages run, and how each is judged."""

import dataclasses

from research.compression.quantize import INT4_GROUPS, INT4_MODES, MODES
from research.errors import UserError

STAGES = ("prune", "distill", "quantize")
PRUNE_METHODS = ("depth", "width", "magnitude", "wanda")
SPARSITY_PATTERNS = ("unstructured", "2:4")
METHODS = ("rtn", "gptq")
BASELINES = ("q8_0", "q4_0", "q4_1")


@dataclasses.dataclass(frozen=True)
class CompressConfig:
    """launch.compress: stages in order, then every stage judged against the original.

    Attributes:
      stages: the stages to run, in order, each on the previous one's output: "prune"
        (research/compression/prune.py), "distill", "quantize".
      prune_method: "depth" (remove prune_layers whole layers), "width" (keep prune_mlp_dim
        MLP channels and prune_kv_heads kv-head groups per layer), "magnitude" or "wanda"
        (zero single weights at `sparsity`, or 2:4 with sparsity_pattern; the model keeps its
        shape and a later distill stage keeps the zeros). Depth and width give a smaller,
        faster model; sparsity saves no time on CPU.
      prune_layers: layers the depth method removes (the least influential on calibration
        text; the first and last are kept).
      prune_mlp_dim, prune_kv_heads: the width method's new sizes (0: unchanged).
      sparsity: fraction of each prunable matrix zeroed ("unstructured").
      sparsity_pattern: "unstructured" or "2:4".
      distill_*: the distill stage trains the current model (e.g. the pruned one) towards the
        original's logits on the bundled corpus: steps, batch_size x seq_len tokens a step,
        learning_rate (AdamW, warmup then cosine), alpha (weight of T^2 * KL against
        cross-entropy; 0 = cross-entropy only) and temperature T. distill_teacher_topk > 0
        distills from the teacher's top-k logits, computed once before training and cached
        in distill_cache_dir (reused by later runs with the same teacher, text and k),
        instead of running the teacher in every step.
      quant: "int8" (per output channel or groups), "int4" (symmetric, groups of quant_group
        inputs, a float32 scale each: llama.cpp Q4_0's grid) or "int4_asym" (a float16 scale
        and min per group: Q4_1's grid, the same 5 bits per weight at group 32).
      quant_group: k per scale: int4 32, 64 or 128; int8 0 (per output channel) or a
        multiple of 4 (32: llama.cpp Q8_0's blocks).
      method: "rtn" (round to nearest) or "gptq" (error-compensating, from calibration text).
      calibration_sequences, calibration_len: GPTQ's calibration text (the bundled corpus).
      eval_window: tokens per held-out window; the second half of each is scored.
      eval_tokens: held-out tokens to use (0: the whole shipped set, about 100k+).
      baselines: llama.cpp quantizations (made by the `gguf` package's own quantizers) put
        through the same evaluator: "q8_0", "q4_0", "q4_1".
      speed_tokens: tokens decoded at batch 1 to time each model (0 skips timing).
      speed_reps: timed repetitions (median).
    """

    stages: tuple[str, ...] = ("quantize",)
    prune_method: str = "depth"
    prune_layers: int = 0
    prune_mlp_dim: int = 0
    prune_kv_heads: int = 0
    sparsity: float = 0.5
    sparsity_pattern: str = "unstructured"
    distill_steps: int = 100
    distill_batch_size: int = 4
    distill_seq_len: int = 128
    distill_learning_rate: float = 3e-4
    distill_alpha: float = 0.9
    distill_temperature: float = 1.0
    distill_teacher_topk: int = 0
    distill_cache_dir: str = "~/.cache/cirrus/teacher"
    quant: str = "int8"
    quant_group: int = 32
    method: str = "rtn"
    calibration_sequences: int = 128
    calibration_len: int = 512
    eval_window: int = 512
    eval_tokens: int = 0
    baselines: tuple[str, ...] = ("q8_0", "q4_0")
    speed_tokens: int = 64
    speed_reps: int = 3

    def __post_init__(self):
        object.__setattr__(self, "stages", tuple(self.stages))  # Gin gives lists.
        object.__setattr__(self, "baselines", tuple(self.baselines))
        for stage in self.stages:
            if stage not in STAGES:
                raise UserError(f"compress.stages has {stage!r}; stages are {STAGES}.")
        if not self.stages:
            raise UserError(f"compress.stages is empty; choose from {STAGES}.")
        if self.quant not in MODES[1:]:
            raise UserError(f"compress.quant={self.quant!r} is not one of {MODES[1:]}.")
        if self.quant in INT4_MODES and self.quant_group not in INT4_GROUPS:  # int8: ModelConfig.
            raise UserError(f"compress.quant_group={self.quant_group} is not one of {INT4_GROUPS}.")
        if self.method not in METHODS:
            raise UserError(f"compress.method={self.method!r} is not one of {METHODS}.")
        for name in self.baselines:
            if name not in BASELINES:
                raise UserError(f"compress.baselines has {name!r}; choose from {BASELINES}.")
        if self.eval_window < 4 or self.eval_window % 2:
            raise UserError(f"compress.eval_window={self.eval_window} must be even and >= 4.")
        for name in ("calibration_sequences", "calibration_len", "speed_reps"):
            if getattr(self, name) < 1:
                raise UserError(f"compress.{name}={getattr(self, name)} must be >= 1.")
        if self.prune_method not in PRUNE_METHODS:
            raise UserError(
                f"compress.prune_method={self.prune_method!r} is not one of {PRUNE_METHODS}."
            )
        if self.sparsity_pattern not in SPARSITY_PATTERNS:
            raise UserError(
                f"compress.sparsity_pattern={self.sparsity_pattern!r} is not one of "
                f"{SPARSITY_PATTERNS}."
            )
        if not 0 < self.sparsity < 1:
            raise UserError(f"compress.sparsity={self.sparsity} must be in (0, 1), e.g. 0.5.")
        for name in ("prune_layers", "prune_mlp_dim", "prune_kv_heads"):
            if getattr(self, name) < 0:
                raise UserError(f"compress.{name}={getattr(self, name)} must be >= 0.")
        if "prune" in self.stages and self.prune_method == "depth" and self.prune_layers < 1:
            raise UserError(
                f"compress.prune_layers={self.prune_layers}: depth pruning needs >= 1 layer "
                "to remove (e.g. 10 takes SmolLM2 from 30 to 20 layers)."
            )
        if (
            "prune" in self.stages
            and self.prune_method == "width"
            and not (self.prune_mlp_dim or self.prune_kv_heads)
        ):
            raise UserError(
                "compress.prune_method='width' needs compress.prune_mlp_dim and/or "
                "compress.prune_kv_heads (e.g. 1024 and 2 for SmolLM2's 1536 and 3)."
            )
        order = {stage: i for i, stage in enumerate(self.stages)}
        if order.get("distill", -1) > order.get("quantize", len(self.stages)):
            raise UserError(
                "compress.stages: distill before quantize (quantized weights do not train)."
            )
        if self.distill_teacher_topk < 0:
            raise UserError(
                f"compress.distill_teacher_topk={self.distill_teacher_topk} must be >= 0 "
                "(0: the teacher runs in every step)."
            )
        for name in ("distill_steps", "distill_batch_size", "distill_seq_len"):
            if getattr(self, name) < 1:
                raise UserError(f"compress.{name}={getattr(self, name)} must be >= 1.")
        if not 0 <= self.distill_alpha <= 1 or self.distill_temperature <= 0:
            raise UserError(
                f"compress.distill_alpha={self.distill_alpha} must be in [0, 1] and "
                f"compress.distill_temperature={self.distill_temperature} positive."
            )
        if not self.distill_learning_rate > 0:
            raise UserError(
                f"compress.distill_learning_rate={self.distill_learning_rate} must be positive."
            )
        for name in ("eval_tokens", "speed_tokens"):
            if getattr(self, name) < 0:
                raise UserError(f"compress.{name}={getattr(self, name)} must be >= 0.")
