"""``parallel:`` the Megatron-Core layout (TP x PP x DP, virtual PP)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..errors import ConfigError
from .base import knob


@dataclass
class ParallelConfig:
    tensor_model_parallel_size: int = knob(1, "Tensor-parallel size (TP)", ge=1)
    pipeline_model_parallel_size: int = knob(1, "Pipeline-parallel size (PP)", ge=1)
    virtual_pipeline_model_parallel_size: Optional[int] = knob(
        None, "Model chunks per pipeline rank for the interleaved schedule (needs PP > 1)", ge=2)
    sequence_parallel: bool = knob(False, "Megatron sequence parallelism (needs TP > 1 and the "
                                          "Transformer Engine spec)")
    distributed_backend: str = knob("auto", "torch.distributed backend: auto = nccl with GPUs, "
                                            "gloo without", choices=["auto", "nccl", "gloo"])
    distributed_timeout_minutes: int = knob(30, "Timeout of collective operations", ge=1)
    control_timeout_minutes: int = knob(
        1440, "Timeout of the gloo control plane: how long trainer ranks wait for rank 0 "
              "(rollout, evaluation, checkpoint conversion, weight sync, export)", ge=1)

    def validate(self, path: str) -> None:
        vpp = self.virtual_pipeline_model_parallel_size
        if vpp is not None and self.pipeline_model_parallel_size == 1:
            raise ConfigError(f"{path}.virtual_pipeline_model_parallel_size={vpp} needs "
                              f"{path}.pipeline_model_parallel_size > 1")
        if self.sequence_parallel and self.tensor_model_parallel_size == 1:
            raise ConfigError(f"{path}.sequence_parallel=true needs "
                              f"{path}.tensor_model_parallel_size > 1")

    @property
    def model_parallel_size(self) -> int:
        return self.tensor_model_parallel_size * self.pipeline_model_parallel_size
