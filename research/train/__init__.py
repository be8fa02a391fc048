"""Training: config, optimizer, pure steps, the loop."""

from research.train.config import TrainConfig
from research.train.loop import NonFiniteLossError, Trainer, build_trainer, evaluate, train
from research.train.objective import Objective, cross_entropy, next_token, with_masks
from research.train.optimizer import learning_rate_schedule, make_optimizer, weight_decay_mask
from research.train.state import TrainState, abstract_model, init_train_state, state_shardings
from research.train.step import eval_step, train_step, train_step_accumulated

__all__ = [
    "NonFiniteLossError",
    "Objective",
    "TrainConfig",
    "TrainState",
    "Trainer",
    "abstract_model",
    "build_trainer",
    "cross_entropy",
    "eval_step",
    "evaluate",
    "init_train_state",
    "learning_rate_schedule",
    "make_optimizer",
    "next_token",
    "state_shardings",
    "train",
    "train_step",
    "train_step_accumulated",
    "weight_decay_mask",
    "with_masks",
]
