"""One place a step's metrics go: a JSONL row, TensorBoard scalars, Weights & Biases.

Everything lives under the run directory: ``RUN_DIR/metrics.jsonl`` (one row per step, the
source of truth for ``repo-megatron plot``) and ``RUN_DIR/tensorboard/``. On resume, rows of
steps after the checkpoint are dropped first, so each step has exactly one row.
"""

from __future__ import annotations

import json
import logging
import math
import os
from typing import Any, Mapping, Optional

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.jsonl"


def read_rows(run_dir: str) -> list[dict]:
    """Every complete JSONL row of a run (a torn last line from a killed run is skipped)."""
    path = os.path.join(run_dir, METRICS_FILE)
    if not os.path.exists(path):
        return []
    rows = []
    with open(path) as f:
        for line in f:
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError:
                log.warning("%s: skipping a torn line", path)
    return rows


def truncate_after(run_dir: str, step: int) -> None:
    """Keep only rows with ``step <= step`` (atomically: write aside, then rename)."""
    path = os.path.join(run_dir, METRICS_FILE)
    rows = [r for r in read_rows(run_dir) if r.get("step", 0) <= step]
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        for r in rows:
            f.write(json.dumps(r) + "\n")
    os.replace(tmp, path)


def _finite(value: Any) -> Optional[float]:
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return value if math.isfinite(value) else None


class MetricsWriter:
    """Append step rows; rank 0 only (other ranks get a writer that does nothing)."""

    def __init__(self, run_dir: str, *, enabled: bool = True, tensorboard: bool = True,
                 wandb_project: Optional[str] = None, config: Optional[dict] = None):
        self.enabled = enabled
        self.run_dir = run_dir
        self._tb = None
        self._wandb = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        if tensorboard:
            from torch.utils.tensorboard import SummaryWriter
            self._tb = SummaryWriter(os.path.join(run_dir, "tensorboard"))
        if wandb_project:
            try:
                import wandb
            except ImportError:
                log.warning("logging.wandb_project is set but wandb is not installed; skipping")
            else:
                self._wandb = wandb.init(project=wandb_project, config=config,
                                         dir=run_dir, resume="allow")

    def write(self, step: int, metrics: Mapping[str, Any]) -> None:
        if not self.enabled or not metrics:
            return
        row = {"step": step, **metrics}
        with open(os.path.join(self.run_dir, METRICS_FILE), "a") as f:
            f.write(json.dumps(row, default=float) + "\n")
            f.flush()
            os.fsync(f.fileno())
        scalars = {k: v for k, v in ((k, _finite(v)) for k, v in metrics.items()) if v is not None}
        if self._tb is not None:
            for key, value in scalars.items():
                self._tb.add_scalar(key, value, step)
            self._tb.flush()
        if self._wandb is not None:
            self._wandb.log(scalars, step=step)

    def close(self) -> None:
        if self._tb is not None:
            self._tb.close()
        if self._wandb is not None:
            self._wandb.finish()
