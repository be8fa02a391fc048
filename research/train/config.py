"""Training hyperparameters: one frozen dataclass, bound in gin as `train.*`."""

import dataclasses

from research.errors import UserError

SCHEDULES = ("cosine", "linear", "constant")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """Everything the training loop reads. Model and data have their own configs."""

    num_steps: int = 1000
    batch_size: int = 8  # Global batch, in sequences.
    seq_len: int = 256
    micro_batches: int = 1  # Gradient accumulation: the batch is split into this many parts.
    seed: int = 0
    # Optimizer: optax AdamW with warmup, then a cosine or linear decay to a fraction of the peak.
    learning_rate: float = 3e-4
    warmup_steps: int = 100
    schedule: str = "cosine"
    final_lr_fraction: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    eps: float = 1e-8
    weight_decay: float = 0.1
    # No decay on norms, biases and embeddings unless asked (GPT-3 / nanoGPT convention).
    decay_embeddings: bool = False
    grad_clip_norm: float = 1.0  # 0 disables clipping.
    z_loss: float = 0.0  # PaLM's auxiliary z-loss weight on log(Z)^2.
    # Mesh over all devices as (data, fsdp, tensor); -1 takes the remaining devices.
    mesh_shape: tuple[int, ...] = (-1, 1, 1)
    # Logging and evaluation.
    log_every: int = 10
    eval_every: int = 100  # 0 disables periodic validation.
    eval_batches: int = 8  # Validation batches per periodic evaluation (0 = whole split).
    # Steps between runs of the evaluation suite (`eval.*`: bits per byte, cloze, JSONL tasks);
    # it also runs at the end. 0 disables it. Use a multiple of log_every.
    task_eval_every: int = 0
    # Peak FLOP/s per device for MFU; 0 measures a matmul peak on the first device at start.
    peak_flops_per_device: float = 0.0
    # Multi-host: every process all-gathers its SIGTERM flag every this many steps, so all
    # hosts save the same step and exit 42 together (a notice waits at most this many steps).
    preemption_sync_every: int = 1
    # Step watchdog: dump all thread stacks and exit (code 3) when no step completes within
    # this many seconds, e.g. a collective waiting on a dead host. 0 = off.
    watchdog_s: float = 0.0

    def __post_init__(self):
        for name in (
            "num_steps",
            "batch_size",
            "seq_len",
            "micro_batches",
            "log_every",
            "preemption_sync_every",
        ):
            if getattr(self, name) <= 0:
                raise UserError(f"train.{name} must be positive, got {getattr(self, name)}.")
        if self.batch_size % self.micro_batches:
            raise UserError(
                f"train.batch_size={self.batch_size} is not divisible by "
                f"train.micro_batches={self.micro_batches}; pick a batch size that is a "
                f"multiple of the number of micro-batches."
            )
        if self.watchdog_s < 0:
            raise UserError(f"train.watchdog_s must be >= 0 (0 = off), got {self.watchdog_s}.")
        if self.schedule not in SCHEDULES:
            raise UserError(f"train.schedule={self.schedule!r} is not one of {SCHEDULES}.")
        if self.learning_rate <= 0:
            raise UserError(f"train.learning_rate must be positive, got {self.learning_rate}.")
        if self.warmup_steps < 0 or not 0 <= self.final_lr_fraction <= 1:
            raise UserError(
                "train.warmup_steps must be >= 0 and train.final_lr_fraction in [0, 1]; got "
                f"{self.warmup_steps} and {self.final_lr_fraction}."
            )

    def replace(self, **changes) -> "TrainConfig":
        return dataclasses.replace(self, **changes)
