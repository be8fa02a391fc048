"""DPOConfig (`dpo.*` in gin): what launch.dpo reads besides the model (`model.*`) and the
optimizer, steps, batch and sequence length (`train.*`)."""

import dataclasses

from research.errors import UserError


@dataclasses.dataclass(frozen=True)
class DPOConfig:
    """Direct preference optimization (Rafailov et al. 2023) on prompt / chosen / rejected.

    Attributes:
      data: preference JSONL files, directories (their *.jsonl) or globs; relative paths are
        looked up in the working directory, then in the repository (the shipped demo set).
      beta: the DPO temperature: the loss is -log sigmoid(beta * (log-ratio of chosen -
        log-ratio of rejected)), log-ratios against the initial (reference) model. Smaller
        beta lets the policy drift further from the reference.
      min_prompt_tokens: a pair longer than train.seq_len loses prompt tokens from the left
        (bos kept) but keeps at least this many (or its whole prompt if shorter); a pair whose
        longer response leaves less room than that is dropped.
      validation_fraction: pairs held out (chosen by train.seed) and scored every
        train.task_eval_every steps and at the end: loss, reward accuracy and margin.
    """

    data: tuple[str, ...] = ()
    beta: float = 0.1
    min_prompt_tokens: int = 32
    validation_fraction: float = 0.1

    def __post_init__(self):
        if isinstance(self.data, str):  # One path given bare in gin.
            object.__setattr__(self, "data", (self.data,))
        object.__setattr__(self, "data", tuple(self.data))
        if not self.beta > 0:
            raise UserError(
                f"dpo.beta={self.beta} must be positive (0.1 is the usual value; larger keeps "
                "the model closer to the reference)."
            )
        if self.min_prompt_tokens < 1:
            raise UserError(f"dpo.min_prompt_tokens={self.min_prompt_tokens} must be >= 1.")
        if not 0 <= self.validation_fraction < 1:
            raise UserError(
                f"dpo.validation_fraction={self.validation_fraction} must be in [0, 1)."
            )
