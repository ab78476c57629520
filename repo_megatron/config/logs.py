"""``logging:`` metrics sinks."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import knob


@dataclass
class LoggingConfig:
    tensorboard: bool = knob(True, "Write TensorBoard scalars under RUN_DIR/tensorboard")
    wandb_project: Optional[str] = knob(None, "Weights & Biases project (when wandb is installed)")
    progress_bar: bool = knob(True, "Show progress bars (rank 0)")
    level: str = knob("INFO", "Python log level", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
