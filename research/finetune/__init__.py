"""Fine-tuning methods beyond next-token loss: DPO on preference pairs.

pairs, report = encode_pairs(template, read_preferences(["prefs.jsonl"]), seq_len=256)
pairs.reference = reference_logprobs(model_config, params, pairs, batch_size=8)
train(model_config, train_config, data_dir=None, workdir=..., init_params=params,
      objective=dpo_objective(beta=0.1), dataset=pair_dataset(pairs, 8, seed=0))
"""

from research.finetune.config import DPOConfig
from research.finetune.dpo import (
    dpo_objective,
    dpo_terms,
    pair_batch,
    pair_dataset,
    pair_evaluator,
    reference_logprobs,
    response_logprobs,
)
from research.finetune.preference import (
    EncodeReport,
    Preference,
    PreferencePairs,
    encode_pairs,
    read_preferences,
)

__all__ = [
    "DPOConfig",
    "EncodeReport",
    "Preference",
    "PreferencePairs",
    "dpo_objective",
    "dpo_terms",
    "encode_pairs",
    "pair_batch",
    "pair_dataset",
    "pair_evaluator",
    "read_preferences",
    "reference_logprobs",
    "response_logprobs",
]
