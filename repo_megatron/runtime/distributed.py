"""Process-group set-up and teardown for Megatron-Core: torchrun or SLURM, GPU or CPU.

``initialize(parallel_cfg, seed)`` reads the launcher's environment, starts torch.distributed
(nccl with GPUs, gloo without), builds the gloo control plane (:mod:`.control`) and Megatron's
TP/PP/DP groups and seeds; ``teardown()`` undoes it. On CPU it first installs
:mod:`repo_megatron.runtime.cpu_compat`.
"""

from __future__ import annotations

import logging
import os
import random
import subprocess
from dataclasses import dataclass
from datetime import timedelta
from typing import Mapping, Optional

import torch

from ..config.parallel import ParallelConfig
from ..errors import ConfigError
from . import control, cpu_compat
from .ports import free_port

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the job, as its launcher described it."""
    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int
    launcher: str  # torchrun | slurm | single


def first_slurm_host(nodelist: str) -> str:
    """The first host of a SLURM node list (``scontrol show hostnames`` when available)."""
    try:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], check=True,
                             capture_output=True, text=True, timeout=30).stdout.split()
        if out:
            return out[0]
    except (OSError, subprocess.SubprocessError):
        pass
    # Fallback for the common forms "node[01-04,07]" and "nodeA,nodeB".
    head = nodelist.split(",")[0]
    if "[" in head:
        prefix, rest = head.split("[", 1)
        return prefix + rest.split("-")[0].split(",")[0].rstrip("]")
    return head


def read_launch_env(env: Mapping[str, str] = os.environ) -> LaunchEnv:
    """Rank, world size and rendezvous from torchrun (RANK/WORLD_SIZE/LOCAL_RANK), SLURM
    (SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID, MASTER_ADDR from the node list) or neither."""
    port = int(env.get("MASTER_PORT", "29500"))
    if "RANK" in env and "WORLD_SIZE" in env:
        return LaunchEnv(int(env["RANK"]), int(env["WORLD_SIZE"]), int(env.get("LOCAL_RANK", 0)),
                         env.get("MASTER_ADDR", "127.0.0.1"), port, "torchrun")
    if "SLURM_PROCID" in env and "SLURM_NTASKS" in env:
        addr = env.get("MASTER_ADDR") or first_slurm_host(
            env.get("SLURM_STEP_NODELIST") or env.get("SLURM_JOB_NODELIST", "127.0.0.1"))
        return LaunchEnv(int(env["SLURM_PROCID"]), int(env["SLURM_NTASKS"]),
                         int(env.get("SLURM_LOCALID", 0)), addr, port, "slurm")
    # One process, no launcher: any free port (two single-process runs must not collide).
    if "MASTER_PORT" not in env:
        port = free_port()
    return LaunchEnv(0, 1, 0, env.get("MASTER_ADDR", "127.0.0.1"), port, "single")


def backend_for(parallel: ParallelConfig) -> str:
    if parallel.distributed_backend != "auto":
        return parallel.distributed_backend
    return "nccl" if cpu_compat.has_gpu() else "gloo"


def data_parallel_size(world_size: int, parallel: ParallelConfig) -> int:
    """DP = world / (TP x PP); the world must be a multiple of TP x PP."""
    mp = parallel.model_parallel_size
    if world_size % mp:
        raise ConfigError(
            f"parallel.tensor_model_parallel_size={parallel.tensor_model_parallel_size} x "
            f"parallel.pipeline_model_parallel_size={parallel.pipeline_model_parallel_size} = {mp} "
            f"does not divide the world size {world_size}")
    return world_size // mp


def seed_everything(seed: int) -> None:
    """Python, torch (and Megatron's model-parallel RNG once groups exist)."""
    random.seed(seed)
    torch.manual_seed(seed)


def initialize(parallel: ParallelConfig, seed: int = 1234,
               env: Optional[LaunchEnv] = None) -> LaunchEnv:
    """Start torch.distributed and Megatron's parallel groups from ``parallel``."""
    from megatron.core import parallel_state

    cpu_compat.enable()
    env = env or read_launch_env()
    data_parallel_size(env.world_size, parallel)  # fail early with the keys named
    if not torch.distributed.is_initialized():
        cpu_compat.set_device(env.local_rank)
        torch.distributed.init_process_group(
            backend=backend_for(parallel), rank=env.rank, world_size=env.world_size,
            init_method=f"tcp://{env.master_addr}:{env.master_port}",
            timeout=timedelta(minutes=parallel.distributed_timeout_minutes))
    control.initialize(timedelta(minutes=parallel.control_timeout_minutes))
    parallel_state.initialize_model_parallel(
        tensor_model_parallel_size=parallel.tensor_model_parallel_size,
        pipeline_model_parallel_size=parallel.pipeline_model_parallel_size,
        virtual_pipeline_model_parallel_size=parallel.virtual_pipeline_model_parallel_size,
        distributed_timeout_minutes=parallel.distributed_timeout_minutes,
    )
    seed_everything(seed)
    cpu_compat.seed_model_parallel(seed)
    if env.rank == 0:
        log.info("torch.distributed %s: world %d = TP %d x PP %d x DP %d (%s)",
                 backend_for(parallel), env.world_size, parallel.tensor_model_parallel_size,
                 parallel.pipeline_model_parallel_size,
                 parallel_state.get_data_parallel_world_size(), env.launcher)
    return env


def teardown() -> None:
    """Destroy Megatron's groups and the default process group (safe to call twice)."""
    from megatron.core import parallel_state

    parallel_state.destroy_model_parallel()
    control.destroy()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()
