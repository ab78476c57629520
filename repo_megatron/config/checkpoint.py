"""``checkpoint:`` saving, keeping and resuming."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from .base import knob


@dataclass
class CheckpointConfig:
    save_interval: int = knob(0, "Save every N steps (0 = only at the end)", ge=0)
    keep_last: int = knob(2, "Complete checkpoints kept", ge=1)
    hf_export_interval: int = knob(0, "Export Hugging Face safetensors every N steps (0 = off)",
                                   ge=0)
    hf_export_at_end: bool = knob(True, "Export Hugging Face safetensors after the last step")
    async_save: bool = knob(False, "Write the model and optimizer files in the background "
                                   "(megatron's async dist-checkpointing); the checkpoint is "
                                   "committed (manifest, rename) once every rank's write is done")
    verify_checksums: bool = knob(True, "On resume, check every file's SHA-256 against the "
                                        "checkpoint's manifest (sizes are always checked)")
    directory: Optional[str] = knob(None, "Where checkpoints go (null = RUN_DIR/checkpoints)",
                                    path="output")
