"""Trainer offload for colocated runs (repo_megatron.trainer.offload*), on real Megatron-Core.

The host path's mechanics run device-faithful (repo_megatron.runtime.device_faithful) at TP2 and
at PP2, in bf16 with fp32 main weights and the distributed optimizer (the 70B configs'
precision), with a KL reference model: after one full RePO step (so Adam's state exists) the
trainer is offloaded and restored twice, then takes a second step. The same two steps run
without offload in the same ranks, and must give the same loss, gradient norm and state, bit
for bit. What is freed is checked against an independent count: every device storage Python can
reach (device_bytes_held), before and after.

The same ranks also run the colocated config (weight_sync tensor, offload_trainer host) through
the session's phases as the loop calls them (rollout, prepare, update, weight sync, save), where
the session itself offloads the trainer for each rollout and restores it for training
(repo_megatron.run.colocation): the trainer's storages are empty while the rollout runs, and
the two steps give the same loss, gradient norm and state as the plain run, bit for bit.

The torch_memory_saver path and the pinned host path need a GPU: those tests are marked `gpu`.
"""

import dataclasses
import hashlib
import importlib.util
import os
from functools import partial

import pytest

from repo_megatron.config import load_config
from repo_megatron.errors import ConfigError
from repo_megatron.run.dry_run import RANK_IMPORTS, dry_config
from tests.distributed import free_port, run_distributed
from tests.run.conftest import ROOT

LAYOUTS = {"tp2": {"tensor_model_parallel_size": 2},
           "pp2": {"pipeline_model_parallel_size": 2}}


def _config(layout: dict, run_dir: str, head_dim: int = 8, **overrides):
    """The tiny example scaled to ``layout`` as the dry run scales it, with ``head_dim`` (the
    hidden size follows): bf16, distributed optimizer, RePO with KL."""
    base = load_config(os.path.join(ROOT, "examples", "configs", "tiny.yaml"), [])
    base = dataclasses.replace(base, parallel=dataclasses.replace(base.parallel, **layout))
    cfg, _ = dry_config(base, run_dir)
    arch = cfg.model.architecture_overrides
    hidden = arch["num_attention_heads"] * head_dim
    model = dataclasses.replace(cfg.model, params_dtype="bf16", architecture_overrides={
        **arch, "head_dim": head_dim, "hidden_size": hidden, "intermediate_size": 2 * hidden,
        **overrides})
    return dataclasses.replace(
        cfg, model=model,
        optimizer=dataclasses.replace(cfg.optimizer, use_distributed_optimizer=True),
        algorithm=dataclasses.replace(cfg.algorithm, injection="repo", kl_coef=0.01))


def _step(session, step: int) -> tuple[float, float]:
    groups, _ = session.rollout(step)
    metrics = session.update(session.prepare(groups))
    return metrics["train/loss"], metrics["train/grad_norm"]


def _digests(offloader) -> list[str]:
    """SHA-256 of every state storage's bytes: weights, gradients, main weights, Adam, the
    reference model."""
    from repo_megatron.trainer.offload_state import storage_bytes

    return [hashlib.sha256(storage_bytes(s.storage).cpu().numpy().tobytes()).hexdigest()
            for s in offloader.state()]


def _cycle(offloader) -> dict:
    """One offload and restore, with what a test needs to judge them."""
    import torch

    from repo_megatron.runtime import cpu_compat
    from repo_megatron.trainer.offload_state import device_bytes_held, storage_bytes

    state = offloader.state()
    snapshot = [storage_bytes(s.storage).cpu() for s in state]     # host copies
    held_before = device_bytes_held()
    free_before = cpu_compat.device_free_bytes()
    report = offloader.offload()
    emptied = [s.storage.nbytes() == 0 for s in state]
    held_after = device_bytes_held()
    free_after = cpu_compat.device_free_bytes()
    restore_s = offloader.restore()
    restored = [storage_bytes(s.storage) for s in state]
    here = cpu_compat.device()
    return {
        "report": report, "kinds": [s.kind for s in state], "emptied": emptied,
        "held_before": held_before, "held_after": held_after,
        "driver_freed": None if free_before is None else free_after - free_before,
        "restore_s": restore_s,
        "gradients_were_nonzero": any(bool(snap.any())
                                      for s, snap in zip(state, snapshot) if not s.keep),
        "kept_bitwise": all(torch.equal(r.cpu(), snap)
                            for s, r, snap in zip(state, restored, snapshot) if s.keep),
        "gradients_zero": all(not bool(r.any()) for s, r in zip(state, restored) if not s.keep),
        "restored_on_device": all(r.device == here for r in restored),
        "parameters_on_device": all(p.device == here for chunk in offloader.model
                                    for p in chunk.parameters()),
    }


def _two_steps(cfg, strategy) -> dict:
    """Steps 1 and 2 of ``cfg``; with a ``strategy`` (an offload class), two offload/restore
    cycles between them."""
    from repo_megatron.runtime import cpu_compat
    from repo_megatron.run.dry_run import SyntheticRollout
    from repo_megatron.run.session import Session
    from repo_megatron.trainer.offload_host import HostOffload

    cpu_compat.enable(device_faithful=True)     # no-op on a GPU
    session = Session(cfg, rollout=partial(SyntheticRollout, cfg))
    try:
        out = {"step1": _step(session, 1)}
        offloader = (strategy or HostOffload)(session.trainer.model, session.trainer.optimizer,
                                              session.reference)
        if strategy is not None:
            out["cycles"] = [_cycle(offloader)]
            buffer = getattr(offloader, "host_buffer", None)
            out["host_buffer"] = None if buffer is None else {
                "on_host": buffer.device.type == "cpu", "address": buffer.data_ptr()}
            out["cycles"].append(_cycle(offloader))
            out["host_buffer_reused"] = (buffer is None or
                                         offloader.host_buffer.data_ptr() == buffer.data_ptr())
        out["step2"] = _step(session, 2)
        out["digests"] = _digests(offloader)
        out["device_faithful"] = cpu_compat.device_faithful()
        return out
    finally:
        session.close()


def _colocated(cfg, strategy_name: str):
    """``cfg`` in the colocated layout, its trainer offloaded by ``strategy_name``."""
    sglang = dataclasses.replace(cfg.rollout.sglang, weight_sync="tensor",
                                 offload_trainer=strategy_name)
    return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, sglang=sglang))


def _colocated_steps(cfg) -> dict:
    """Steps 1 and 2 of a colocated ``cfg`` through the session's phases, as the loop runs
    them; whether the trainer's state was off the device while each rollout ran."""
    from repo_megatron.runtime import cpu_compat
    from repo_megatron.run.dry_run import SyntheticRollout
    from repo_megatron.run.session import Session

    cpu_compat.enable(device_faithful=True)
    session = Session(cfg, rollout=partial(SyntheticRollout, cfg))
    try:
        out = {"offloaded_during_rollout": []}
        offload = session.colocation.offload
        for step in (1, 2):
            groups, _ = session.rollout(step)
            out["offloaded_during_rollout"].append(
                offload.offloaded and all(s.storage.nbytes() == 0 for s in offload._offloaded))
            metrics = session.update(session.prepare(groups))
            out[f"step{step}"] = metrics["train/loss"], metrics["train/grad_norm"]
            out[f"offload_metrics{step}"] = {k: v for k, v in metrics.items()
                                             if k.startswith("offload/")}
            session.sync_weights()
            session.save(step)
        out["strategy"] = offload.name
        out["digests"] = _digests(offload)
        sink = session.rollout_side.engine
        out["synced_parameters"] = None if sink is None else sink.parameters
        return out
    finally:
        session.close()


def _with_and_without(configs: dict, strategy_name: str, ports: list[int]) -> dict:
    """``{(layout, "plain" | "offload" | "colocated"): ...}``: each run in a process group of
    its own (a fresh rendezvous port), all in the same ranks (a launch costs seconds of
    imports)."""
    from repo_megatron.trainer.offload import STRATEGIES

    results, ports = {}, iter(ports)
    for layout, cfg in configs.items():
        for name, strategy in (("plain", None), ("offload", STRATEGIES[strategy_name])):
            os.environ["MASTER_PORT"] = str(next(ports))
            results[layout, name] = _two_steps(cfg, strategy)
        os.environ["MASTER_PORT"] = str(next(ports))
        results[layout, "colocated"] = _colocated_steps(_colocated(cfg, strategy_name))
    return results


def _launch(world_size: int, configs: dict, strategy_name: str, **kwargs) -> list[dict]:
    ports = [free_port() for _ in range(3 * len(configs))]
    return run_distributed(_with_and_without, world_size, configs, strategy_name, ports,
                           timeout=600, **kwargs)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    # head_dim 32 (hidden 64-128): state of a few MB, so that the fixed leftovers (RoPE's
    # cache, the received pipeline activation, the optimizer's scalars: ~25 KB) stay small
    configs = {name: _config(layout, str(tmp_path_factory.mktemp(name)), head_dim=32)
               for name, layout in LAYOUTS.items()}
    return _launch(2, configs, "host", preload=RANK_IMPORTS)


@pytest.fixture(params=list(LAYOUTS))
def layout_runs(runs, request) -> list[dict]:
    """Per rank: ``{"plain": ..., "offload": ..., "colocated": ...}`` of one layout."""
    return [{name: rank[request.param, name] for name in ("plain", "offload", "colocated")}
            for rank in runs]


def test_offload_frees_every_trainer_storage(layout_runs):
    from repo_megatron.trainer.offload_state import KINDS

    for rank in layout_runs:
        for cycle in rank["offload"]["cycles"]:
            report = cycle["report"]
            assert all(cycle["emptied"]), "a counted storage still holds memory"
            assert report.freed_bytes == report.state_bytes > 0
            assert report.freed_fraction == 1.0
            assert set(cycle["kinds"]) == set(KINDS)   # weights ... the reference model
            assert all(report.by_kind[k] > 0 for k in KINDS)
            # gradients are freed, the rest is copied
            assert report.copied_bytes == report.state_bytes - report.by_kind["gradients"]
            # the independent count: every device storage reachable from Python
            dropped = cycle["held_before"] - cycle["held_after"]
            assert dropped == report.state_bytes + report.workspace_bytes
            assert cycle["held_after"] < 0.05 * cycle["held_before"], \
                "more than 5% of the device memory is not trainer state"


def test_offload_restores_state_bitwise(layout_runs):
    for rank in layout_runs:
        run = rank["offload"]
        assert run["device_faithful"]
        assert run["cycles"][0]["gradients_were_nonzero"]    # step 1's, dropped
        for cycle in run["cycles"]:
            assert cycle["kept_bitwise"] and cycle["gradients_zero"]
            assert cycle["restored_on_device"] and cycle["parameters_on_device"]


def test_offload_host_buffer_is_host_memory_allocated_once(layout_runs):
    for rank in layout_runs:
        run = rank["offload"]
        assert run["host_buffer"]["on_host"]
        assert run["host_buffer_reused"]


def test_offload_step_after_restore_equals_step_without_offload(layout_runs):
    for rank in layout_runs:
        plain, offloaded = rank["plain"], rank["offload"]
        assert offloaded["step1"] == plain["step1"]
        assert offloaded["step2"] == plain["step2"]           # loss, grad norm: bitwise
        assert offloaded["digests"] == plain["digests"]       # every byte of the state


def test_colocated_session_offloads_for_rollout_and_trains_as_without_offload(layout_runs):
    for rank in layout_runs:
        plain, colocated = rank["plain"], rank["colocated"]
        assert colocated["strategy"] == "host"
        assert colocated["offloaded_during_rollout"] == [True, True]
        assert colocated["step1"] == plain["step1"]
        assert colocated["step2"] == plain["step2"]           # loss, grad norm: bitwise
        assert colocated["digests"] == plain["digests"]       # every byte of the state
        for step in (1, 2):                                   # the step's log says so
            figures = colocated[f"offload_metrics{step}"]
            assert figures["offload/freed_fraction"] == 1.0 and figures["offload/state_gib"] > 0
            assert figures["offload/seconds"] >= 0 and figures["offload/restore_seconds"] >= 0
    assert layout_runs[0]["colocated"]["synced_parameters"] > 0   # rank 0's engine was fed


# ---- selection ----------------------------------------------------------------------------

def _rollout_cfg(**sglang):
    from repo_megatron.config.base import build
    from repo_megatron.config.rollout import RolloutConfig

    return build(RolloutConfig, {"sglang": sglang}, "rollout")


def test_offload_trainer_is_off_for_disaggregated_runs():
    for sync in ("disk", "distributed"):
        assert _rollout_cfg(weight_sync=sync).sglang.trainer_offload == "off"
    assert _rollout_cfg(weight_sync="tensor").sglang.trainer_offload == "auto"


def test_offload_trainer_strategy_in_a_disaggregated_run_is_a_config_error():
    with pytest.raises(ConfigError, match=r"rollout\.sglang\.offload_trainer=host needs the "
                                          r"colocated layout"):
        _rollout_cfg(weight_sync="disk", offload_trainer="host")


def test_offload_memory_saver_where_it_cannot_work_is_a_config_error():
    from repo_megatron.trainer.offload import memory_saver_problem, resolve_offload_mode

    if memory_saver_problem() is None:
        pytest.skip("torch_memory_saver works here (the GPU tests cover it)")
    with pytest.raises(ConfigError, match=r"rollout\.sglang\.offload_trainer=memory_saver "
                                          r"cannot work here"):
        resolve_offload_mode("memory_saver")
    assert resolve_offload_mode("auto") == "host"
    assert resolve_offload_mode("off") == "off"


# ---- on a GPU -----------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.parametrize("strategy", ["host", "memory_saver"])
def test_offload_on_gpu_frees_device_memory_and_restores_bitwise(strategy, tmp_path):
    import torch

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    if strategy == "memory_saver" and importlib.util.find_spec("torch_memory_saver") is None:
        pytest.skip("torch_memory_saver is not installed")
    cfg = _config({}, str(tmp_path), head_dim=64, num_hidden_layers=4, hidden_size=1024,
                  num_attention_heads=16, num_key_value_heads=4, intermediate_size=4096)
    cfg = dataclasses.replace(cfg, parallel=dataclasses.replace(cfg.parallel,
                                                                distributed_backend="nccl"))
    (rank,) = _launch(1, {"tp1": cfg}, strategy)
    rank = {name: rank["tp1", name] for name in ("plain", "offload", "colocated")}
    for cycle in rank["offload"]["cycles"]:
        report = cycle["report"]
        # the driver's view: what the offload gave back to other processes on this GPU
        assert cycle["driver_freed"] >= 0.95 * report.state_bytes
        assert cycle["kept_bitwise"] and cycle["gradients_zero"]
    assert rank["offload"]["step2"] == rank["plain"]["step2"]
    assert rank["offload"]["digests"] == rank["plain"]["digests"]
