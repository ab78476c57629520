"""``optimizer:`` Megatron's optimizer (Adam) and learning-rate schedule."""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import ConfigError
from .base import knob


@dataclass
class OptimizerConfig:
    lr: float = knob(1e-6, "Peak learning rate", gt=0)
    min_lr: float = knob(0.0, "Learning rate at the end of decay", ge=0)
    lr_warmup_steps: int = knob(0, "Linear warm-up steps", ge=0)
    lr_decay_style: str = knob("constant", "Schedule after warm-up",
                               choices=["constant", "linear", "cosine"])
    weight_decay: float = knob(0.0, "Decoupled weight decay", ge=0)
    adam_beta1: float = knob(0.9, "Adam beta1", ge=0, le=1)
    adam_beta2: float = knob(0.999, "Adam beta2", ge=0, le=1)
    adam_eps: float = knob(1e-8, "Adam epsilon", gt=0)
    clip_grad: float = knob(1.0, "Gradient-norm clip (0 = off)", ge=0)
    use_distributed_optimizer: bool = knob(False, "Shard optimizer states across DP ranks")
    max_nonfinite_steps: int = knob(
        3, "An optimizer step whose loss or gradient is NaN/inf is skipped (no update, no "
           "checkpoint of that step); this many in a row stop the run with an error", ge=1)

    def validate(self, path: str) -> None:
        if self.min_lr > self.lr:
            raise ConfigError(f"{path}.min_lr={self.min_lr} must be <= {path}.lr={self.lr}")
