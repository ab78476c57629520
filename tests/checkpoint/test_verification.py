"""Checkpoints prove themselves before they are trusted: a resume over a corrupted, truncated
or planted newest checkpoint falls back to the previous intact one, and fails clearly when
none is left. Real Megatron saves and loads (TP=2 on gloo)."""

import json
import os

import pytest
import torch

from repo_megatron.checkpoint.manifest import (build_entries, check_entries, hash_shares,
                                               unlisted_files, writer_rank)
from repo_megatron.checkpoint.plain import check_plain
from tests.checkpoint import sessions as S
from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama


class Planted:
    """A pickle that runs a shell command when it is unpickled without ``weights_only``."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_manifest_catches_garbage_truncation_and_extra_files(tmp_path):
    for name, data in (("a.distcp", os.urandom(4096)), ("rng/r0.pt", b"x" * 10)):
        os.makedirs(tmp_path / os.path.dirname(name), exist_ok=True)
        (tmp_path / name).write_bytes(data)
    entries = build_entries(str(tmp_path), ["a.distcp", "rng/r0.pt"])
    assert check_entries(str(tmp_path), entries) == []
    with open(tmp_path / "a.distcp", "r+b") as f:  # same size, other bytes
        f.seek(100)
        f.write(b"\0" * 64)
    assert check_entries(str(tmp_path), entries) == [
        "a.distcp does not match its SHA-256 in the manifest"]
    assert check_entries(str(tmp_path), entries, checksums=False) == []
    os.truncate(tmp_path / "rng" / "r0.pt", 3)
    (tmp_path / "extra.pt").write_bytes(b"")
    assert "rng/r0.pt has 3 bytes, the manifest says 10" in check_entries(str(tmp_path), entries)
    assert unlisted_files(str(tmp_path), entries, exempt=[]) == ["extra.pt"]


def test_each_rank_hashes_the_files_it_wrote_and_the_rest_goes_by_size():
    sizes = {"__0_0.distcp": 100, "__0_1.distcp": 100, "__1_0.distcp": 300, "__1_1.distcp": 0,
             "rng/rank_00000.pt": 1, "rng/rank_00001.pt": 1, ".metadata": 5, "common.pt": 3,
             "trainer_state.pt": 50, "__7_0.distcp": 20}   # rank 7 is not in a world of 2
    assert [writer_rank(n) for n in sizes] == [0, 0, 1, 1, 0, 1, None, None, None, 7]
    assert hash_shares(sizes, 2, own_files=True) == [
        ["__0_0.distcp", "__0_1.distcp", "rng/rank_00000.pt", "trainer_state.pt",
         "__7_0.distcp", ".metadata", "common.pt"],
        ["__1_0.distcp", "__1_1.distcp", "rng/rank_00001.pt"]]
    # on resume, by size alone: largest first to the rank with the fewest bytes so far
    shares = hash_shares(sizes, 3, own_files=False)
    assert shares == [["__1_0.distcp"],                                      # 300 bytes
                      ["__0_0.distcp", "trainer_state.pt"],                  # 150
                      ["__0_1.distcp", "__7_0.distcp", ".metadata", "common.pt",
                       "rng/rank_00000.pt", "rng/rank_00001.pt", "__1_1.distcp"]]   # 130
    assert sorted(n for share in shares for n in share) == sorted(sizes)
    assert [sorted(share) for share in hash_shares(sizes, 1, own_files=True)] == [sorted(sizes)]


def test_trainer_state_must_be_plain_data():
    check_plain({"step": 3, "sampler": {"epoch": 0}, "rng": (3, (1, 2), None),
                 "t": torch.zeros(2), "replay": {"p:1": [{"ids": [1, 2]}]}})
    with pytest.raises(TypeError, match=r"trainer_state.replay\[0\] is a .*Planted"):
        check_plain({"replay": [Planted("x")]})


def _fallback_run(root: str) -> dict:
    from repo_megatron.errors import CheckpointError
    from repo_megatron.checkpoint.manager import read_meta
    from repo_megatron.checkpoint.manifest import file_entry

    s = S.session(root, parallel={"tensor_model_parallel_size": 2}, keep_last=4)
    ckpt = s.checkpoints.directory
    path = {step: os.path.join(ckpt, f"step_{step:06d}") for step in (1, 2, 3, 4)}
    weights = {}
    for step in (1, 2, 3, 4):
        S.train_step(s, step)
        s.save(step)
        weights[step] = S.weights_fingerprint(s)
    rank0 = torch.distributed.get_rank() == 0
    marker = os.path.join(root, "planted-code-ran")
    out = {"restored": [], "weights_match": [], "errors": []}

    def damage(step: int) -> None:
        if not rank0:
            return
        if step == 4:    # the case: 1 MB of garbage in a .distcp
            S.corrupt_with_garbage(S.distcp_files(path[4])[0])
        elif step == 3:  # same size, other bytes: only the SHA-256 can tell
            target = S.distcp_files(path[3])[-1]
            size = os.path.getsize(target)
            with open(target, "r+b") as f:
                f.seek(size // 3)
                f.write(os.urandom(size // 3))
        elif step == 2:  # truncated
            target = S.distcp_files(path[2])[0]
            os.truncate(target, os.path.getsize(target) // 2)
        else:            # a planted pickle, with a manifest that matches it
            state = os.path.join(path[1], "trainer_state.pt")
            torch.save({"step": 1, "scheduler": Planted(marker)}, state)
            meta = read_meta(path[1])
            meta["manifest"]["trainer_state.pt"] = file_entry(state)
            with open(os.path.join(path[1], "meta.json"), "w") as f:
                json.dump(meta, f)

    for step in (4, 3, 2, 1):
        damage(step)
        torch.distributed.barrier()
        S.train_step(s, 9)  # weights away from every checkpoint
        try:
            restored = s.restore()
        except CheckpointError as e:
            out["errors"].append(str(e))
            continue
        out["restored"].append(restored)
        out["weights_match"].append(S.weights_fingerprint(s) == weights[restored])
    out["listing"] = sorted(os.listdir(ckpt))
    out["marker"] = os.path.exists(marker)
    s.close()
    return out


def test_resume_falls_back_past_corrupted_truncated_and_planted_checkpoints(tmp_path):
    write_tiny_llama(str(tmp_path / "model"), num_layers=2)
    for rank, out in enumerate(run_distributed(_fallback_run, 2, str(tmp_path), timeout=600)):
        # step 4 (garbage) -> 3; step 3 (bytes changed) -> 2; step 2 (truncated) -> 1
        assert out["restored"] == [3, 2, 1], (rank, out)
        assert out["weights_match"] == [True, True, True], rank
        # step 1's trainer state names code: refused; nothing intact is left
        (error,) = out["errors"]
        assert error == (f"no intact checkpoint in {tmp_path}/run/checkpoints to resume from: "
                         "step_000001: cannot be loaded: refused: it unpickles posix.system "
                         "(only tensors and plain data are loaded; a checkpoint from "
                         "elsewhere?)"), error
        assert "\n" not in error
        assert not out["marker"], "the planted pickle ran"
        assert out["listing"] == ["step_000001", "step_000002.corrupt", "step_000003.corrupt",
                                  "step_000004.corrupt"], out["listing"]


def _planted_sharded_object(root: str) -> dict:
    """A .distcp holding a pickled object (megatron ShardedObject): torch.distributed.checkpoint
    unpickles those with weights_only=False."""
    from megatron.core import dist_checkpointing
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from repo_megatron.checkpoint.manager import CheckpointManager
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.config.parallel import ParallelConfig

    initialize(ParallelConfig(), seed=1)
    out = {}
    for name, guarded in (("plain_megatron", False), ("ours", True)):
        marker = os.path.join(root, f"ran-{name}")
        directory = os.path.join(root, name)
        os.makedirs(directory)
        dist_checkpointing.save({"obj": ShardedObject("obj", Planted(marker), (1,), (0,))},
                                directory)
        template = {"obj": ShardedObject("obj", None, (1,), (0,))}
        try:
            if guarded:
                CheckpointManager(root).load(directory, template)
            else:
                dist_checkpointing.load(template, directory)
            out[name] = "loaded"
        except BaseException as e:  # torch's CheckpointException is a BaseException
            out[name] = f"refused: {type(e).__name__}: {str(e)[:2000]}"
        out[f"{name}_ran"] = os.path.exists(marker)
    return out


def test_a_planted_pickle_in_a_distcp_file_is_refused(tmp_path):
    (out,) = run_distributed(_planted_sharded_object, 1, str(tmp_path), timeout=300)
    assert out["plain_megatron_ran"], "control: megatron alone unpickles the object"
    assert not out["ours_ran"] and out["ours"].startswith("refused"), out
    assert "Weights only load failed" in out["ours"], out
