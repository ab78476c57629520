"""Rank and rendezvous come from torchrun or SLURM variables."""

import pytest

from repo_megatron.config.parallel import ParallelConfig
from repo_megatron.errors import ConfigError
from repo_megatron.runtime.distributed import data_parallel_size, first_slurm_host, read_launch_env


def test_torchrun_variables():
    env = read_launch_env({"RANK": "3", "WORLD_SIZE": "8", "LOCAL_RANK": "1",
                           "MASTER_ADDR": "10.0.0.1", "MASTER_PORT": "6000"})
    assert (env.rank, env.world_size, env.local_rank, env.master_addr, env.master_port,
            env.launcher) == (3, 8, 1, "10.0.0.1", 6000, "torchrun")


def test_slurm_variables_take_master_from_the_node_list():
    env = read_launch_env({"SLURM_PROCID": "9", "SLURM_NTASKS": "16", "SLURM_LOCALID": "1",
                           "SLURM_JOB_NODELIST": "gpu-node[017-018,020]"})
    assert (env.rank, env.world_size, env.local_rank, env.launcher) == (9, 16, 1, "slurm")
    assert env.master_addr == "gpu-node017"


def test_explicit_master_addr_wins_under_slurm():
    env = read_launch_env({"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "MASTER_ADDR": "head",
                           "SLURM_JOB_NODELIST": "n[1-2]"})
    assert env.master_addr == "head"


def test_single_process_without_launcher():
    env = read_launch_env({})
    assert (env.rank, env.world_size, env.launcher) == (0, 1, "single")


@pytest.mark.parametrize("nodelist,first", [("a,b", "a"), ("node7", "node7"),
                                            ("rack[3-4]", "rack3"), ("x[09,11]", "x09")])
def test_first_slurm_host_fallback(nodelist, first):
    assert first_slurm_host(nodelist) == first


def test_world_must_be_a_multiple_of_tp_times_pp():
    par = ParallelConfig(tensor_model_parallel_size=2, pipeline_model_parallel_size=2)
    assert data_parallel_size(8, par) == 2
    with pytest.raises(ConfigError, match="= 4 does not divide the world size 6"):
        data_parallel_size(6, par)
