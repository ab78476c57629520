"""Ranks waiting for rank 0 (rollout, evaluation, conversion, weight sync) wait on the gloo
control plane with its own long timeout, never inside a collective of the default group (NCCL
on GPUs, whose watchdog kills a rank that waits longer than its timeout).

Both tests give the default group (the second also Megatron's groups) a timeout of a few
seconds while rank 0 takes longer than that: any wait on those groups fails them."""

import time
from datetime import timedelta

from tests.distributed import run_distributed
from tests.run.conftest import tiny_chat_model, tiny_run_config  # noqa: F401 (a fixture)

DEFAULT_TIMEOUT_S = 4
RANK0_DELAY_S = 10


def _init_default_group_with_short_timeout():
    import torch

    from repo_megatron.runtime.distributed import read_launch_env

    env = read_launch_env()
    torch.distributed.init_process_group(
        "gloo", rank=env.rank, world_size=env.world_size,
        init_method=f"tcp://{env.master_addr}:{env.master_port}",
        timeout=timedelta(seconds=DEFAULT_TIMEOUT_S))
    return env.rank


def _wait_for_rank0_both_ways():
    import torch

    from repo_megatron.runtime import control

    rank = _init_default_group_with_short_timeout()
    control.initialize(timedelta(minutes=5))
    # The control plane: rank 0 is slower than the default group's timeout.
    if rank == 0:
        time.sleep(RANK0_DELAY_S)
    received = control.broadcast_object({"groups": [1, 2, 3]} if rank == 0 else None)
    control.barrier()
    # The negative control: the same wait on the default group times out.
    default_group = "no timeout"
    if rank == 0:
        time.sleep(RANK0_DELAY_S)
    else:
        try:
            torch.distributed.broadcast_object_list([None], src=0)
        except RuntimeError as e:
            default_group = f"timed out: {e}"[:80]
    control.barrier()
    return received, default_group


def test_control_plane_outlasts_the_default_group_timeout():
    (got0, _), (got1, default_group) = run_distributed(_wait_for_rank0_both_ways, 2, timeout=120)
    assert got0 == got1 == {"groups": [1, 2, 3]}
    assert default_group.startswith("timed out"), default_group


def _short_timeouts_except_control(method):
    """``method`` run with every process group but the control plane (the default group and
    Megatron's) timing out after DEFAULT_TIMEOUT_S."""
    from torch.distributed import distributed_c10d as c10d

    from repo_megatron.runtime import control

    def wrapped(self, *args):
        others = [pg for pg in c10d._world.pg_map if pg is not control.group()]
        for pg in others:
            c10d._set_pg_timeout(timedelta(seconds=DEFAULT_TIMEOUT_S), pg)
        try:
            return method(self, *args)
        finally:
            for pg in others:
                c10d._set_pg_timeout(timedelta(minutes=30), pg)
    return wrapped


def _train_with_slow_rank0_rollout(cfg_dict: dict):
    from repo_megatron.config import config_from_dict
    from repo_megatron.run import rollout_side, session
    from repo_megatron.run.loop import train

    rollout = rollout_side.EngineRollout.rollout

    def slow_rollout(self, step):
        time.sleep(RANK0_DELAY_S)
        return rollout(self, step)

    rollout_side.EngineRollout.rollout = slow_rollout
    for phase in ("rollout", "evaluate", "sync_weights"):
        setattr(session.Session, phase, _short_timeouts_except_control(
            getattr(session.Session, phase)))
    return train(config_from_dict(cfg_dict))


def test_trainer_ranks_wait_for_the_rollout_on_the_control_plane(tiny_chat_model, tmp_path):
    """Two data-parallel ranks, one step: while rank 1 waits for rank 0's slow rollout, its
    evaluation and its engine weight sync, every other process group times out quickly."""
    cfg = tiny_run_config(tiny_chat_model, str(tmp_path / "run"), train_steps=1)
    assert run_distributed(_train_with_slow_rank0_rollout, 2, cfg, timeout=600) == [0, 0]
