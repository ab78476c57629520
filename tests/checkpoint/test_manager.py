"""Checkpoints are atomic, pruned to the last K, and resume into any layout."""

import os

import pytest
import torch

from repo_megatron.checkpoint.manager import (CheckpointManager, complete_checkpoints,
                                              latest_checkpoint, step_dir_name)
from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama


def test_incomplete_and_foreign_directories_are_not_checkpoints(tmp_path):
    for name, meta in (("step_000001", True), ("step_000002", False), (".tmp-step_000003", True),
                       ("notes", True)):
        os.makedirs(tmp_path / name)
        if meta:
            (tmp_path / name / "meta.json").write_text('{"step": 0}')
    assert [s for s, _ in complete_checkpoints(str(tmp_path))] == [1]
    assert latest_checkpoint(str(tmp_path))[0] == 1
    assert latest_checkpoint(str(tmp_path / "missing")) is None


def _save_three_then_resume(root: str):
    from repo_megatron.checkpoint.model_io import sharded_model_state
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.trainer.forward import forward_logprobs
    from repo_megatron.trainer.micro_batch import MicroBatch

    from repo_megatron.checkpoint import manager as manager_module

    parallel = ParallelConfig(tensor_model_parallel_size=2)
    initialize(parallel, seed=1)
    arch = read_architecture(os.path.join(root, "model"))
    model = build_model(arch, ModelConfig(transformer_impl="local"), parallel)
    manager = CheckpointManager(os.path.join(root, "ckpt"), keep_last=2)
    hashed = {"save": [], "verify": []}   # the files this rank hashed, at save and on resume
    build, check = manager_module.build_entries, manager_module.check_entries
    manager_module.build_entries = lambda d, names: hashed["save"].extend(names) or build(d, names)
    manager_module.check_entries = lambda d, entries, checksums: (
        hashed["verify"].extend(entries) or check(d, entries, checksums))
    batch = [MicroBatch(tokens=torch.randint(0, 1000, (2, 12),
                                             generator=torch.Generator().manual_seed(3)))]
    for step in (1, 2, 3):
        with torch.no_grad():
            for p in model[0].parameters():
                p.add_(0.01 * step)
        torch.manual_seed(100 + step)
        manager.save(step, sharded_model_state(model), {"step": step, "data_position": 7 * step})
    expected = forward_logprobs(model, batch)[0]
    expected_draw = torch.rand(3)  # the RNG stream right after the last save
    kept = [s for s, _ in complete_checkpoints(manager.directory)]
    # An interrupted save of step 4 must be ignored and cleaned up.
    if torch.distributed.get_rank() == 0:
        os.makedirs(os.path.join(manager.directory, ".tmp-" + step_dir_name(4)))
    torch.distributed.barrier()
    manager.remove_incomplete()
    leftovers = sorted(os.listdir(manager.directory))

    fresh = build_model(arch, ModelConfig(transformer_impl="local"), parallel)
    before = forward_logprobs(fresh, batch)[0]
    step, path = latest_checkpoint(manager.directory)
    hashed["verify"] = []
    verified = manager.verify(path)
    torch.manual_seed(999)
    loaded, trainer_state = manager.load(path, sharded_model_state(fresh))
    for i, m in enumerate(fresh):
        m.load_state_dict(loaded[f"model{i}"])
    return dict(kept=kept, leftovers=leftovers, step=step, trainer_state=trainer_state,
                diff=(forward_logprobs(fresh, batch)[0] - expected).abs().max().item(),
                diff_before=(before - expected).abs().max().item(),
                rng_equal=torch.equal(torch.rand(3), expected_draw), verified=verified,
                hashed=hashed, manifest=sorted(manager_module.read_meta(path)["manifest"]))


def test_save_keeps_last_k_and_resume_restores_weights_and_rng(tmp_path):
    write_tiny_llama(str(tmp_path / "model"), num_layers=2)
    results = run_distributed(_save_three_then_resume, 2, str(tmp_path))
    for rank, res in enumerate(results):
        assert res["kept"] == [2, 3], rank
        assert res["leftovers"] == ["step_000002", "step_000003"], rank
        assert res["step"] == 3
        assert res["trainer_state"] == {"step": 3, "data_position": 21}
        assert res["diff_before"] > 1e-3, "the fresh model already matched: test proves nothing"
        assert res["diff"] < 1e-6, rank
        assert res["rng_equal"], rank
        assert res["verified"] is None, rank
    # at save, each rank hashed the shards and RNG state it wrote (from its page cache)
    for rank, res in enumerate(results):
        def written_by(r):
            return {n for n in res["manifest"]
                    if n.startswith(f"__{r}_") or n == f"rng/rank_{r:05d}.pt"}
        saved = set(res["hashed"]["save"])      # over the three saves
        assert written_by(rank) and written_by(rank) <= saved, (rank, saved)
        assert not written_by(1 - rank) & saved, (rank, saved)
    # on resume, the two ranks checked every file of the manifest between them, once each
    verified = [res["hashed"]["verify"] for res in results]
    assert sorted(verified[0] + verified[1]) == results[0]["manifest"], verified
    assert verified[0] and verified[1]


def _tracker_states_round_trip(root: str):
    """Megatron's RNG tracker (a real CudaRNGStatesTracker holding CPU generator states: on CPU
    Megatron installs its no-op inference tracker) is saved per rank and restored."""
    from megatron.core.tensor_parallel import random as mrandom

    from tests.checkpoint import sessions

    s = sessions.session(root, parallel={"tensor_model_parallel_size": 2})
    sessions.train_step(s, 1)  # (the forward forks the tracker: the real one cannot on CPU)
    tracker = mrandom.CudaRNGStatesTracker()
    rank = torch.distributed.get_rank()
    saved = {"model-parallel-rng": torch.Generator().manual_seed(10 + rank).get_state()}
    tracker.set_states(dict(saved))
    cpu_tracker, mrandom._CUDA_RNG_STATE_TRACKER = mrandom._CUDA_RNG_STATE_TRACKER, tracker
    s.save(1)
    tracker.set_states({"model-parallel-rng": torch.Generator().manual_seed(99).get_state()})
    s.restore()
    restored = mrandom.get_cuda_rng_tracker().get_states()
    mrandom._CUDA_RNG_STATE_TRACKER = cpu_tracker
    s.close()
    return torch.equal(restored["model-parallel-rng"], saved["model-parallel-rng"])


def test_megatron_rng_tracker_states_are_saved_and_restored_per_rank(tmp_path):
    write_tiny_llama(str(tmp_path / "model"), num_layers=2)
    assert run_distributed(_tracker_states_round_trip, 2, str(tmp_path), timeout=600) == [True, True]


@pytest.mark.gpu
def test_cuda_rng_states_round_trip():
    from repo_megatron.checkpoint.rng import rng_state, set_rng_state

    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    state = rng_state()
    expected = torch.rand(3, device="cuda")
    set_rng_state(state)
    assert torch.equal(torch.rand(3, device="cuda"), expected)
