"""A full disk during a save: a one-line "no space left on device while saving ..." error on
every rank, the partial save removed, and the previous checkpoint intact (never pruned)."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from repo_megatron.checkpoint import manager as M
from tests.checkpoint import sessions as S
from tests.distributed import run_distributed
from tests.helpers import write_tiny_llama

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_disk_full_is_recognised_from_errno_from_text_and_from_free_space(tmp_path, monkeypatch):
    assert M.is_disk_full(OSError(errno.ENOSPC, "No space left on device"), str(tmp_path))
    wrapped = RuntimeError("Worker failure: [Errno 28] No space left on device")  # megatron's
    assert M.is_disk_full(wrapped, str(tmp_path))
    torch_zip = RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 704 vs 598")
    assert not M.is_disk_full(torch_zip, str(tmp_path))  # this disk has room
    monkeypatch.setattr(M, "free_bytes", lambda directory: 4096)
    assert M.is_disk_full(torch_zip, str(tmp_path))


def _full_disk_on_rank1(root: str) -> dict:
    from megatron.core.dist_checkpointing.strategies import filesystem_async

    from repo_megatron.errors import CheckpointError

    s = S.session(root, parallel={"tensor_model_parallel_size": 2}, keep_last=1)
    S.train_step(s, 1)
    first = s.save(1)
    S.train_step(s, 2)
    if torch.distributed.get_rank() == 1:  # inherited by the forked writer processes
        def no_space(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        filesystem_async._write_item = no_space
    try:
        s.save(2)
        error = None
    except CheckpointError as e:
        error = str(e)
    out = {"error": error, "listing": sorted(os.listdir(s.checkpoints.directory)),
           "first_intact": s.checkpoints.verify(first) is None}
    s.close()
    return out


def test_no_space_in_a_writer_process_gives_one_line_on_every_rank(tmp_path):
    write_tiny_llama(str(tmp_path / "model"), num_layers=2)
    directory = tmp_path / "run" / "checkpoints"
    for rank, out in enumerate(run_distributed(_full_disk_on_rank1, 2, str(tmp_path), timeout=600)):
        assert out["error"] is not None, rank
        assert out["error"].startswith(f"no space left on device while saving checkpoint "
                                       f"step_000002 to {directory} ("), out["error"]
        assert out["error"].endswith("MB free; kept: step_000001)"), out["error"]
        assert out["listing"] == ["step_000001"], out   # partial save removed, nothing pruned
        assert out["first_intact"], rank


def test_a_really_full_disk(tmp_path):
    """A 5 MB tmpfs (in a private mount namespace): the first checkpoint fits, the second does
    not. Needs the right to mount (root or CAP_SYS_ADMIN)."""
    if shutil.which("unshare") is None or os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root and unshare(1)")
    write_tiny_llama(str(tmp_path / "model"), num_layers=2)
    run = tmp_path / "run"
    run.mkdir()
    script = (f"mount -t tmpfs -o size=5m tmpfs {run} && exec {sys.executable} -m "
              f"tests.checkpoint.save_job {tmp_path} --steps 3")
    proc = subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", script],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    if "mount" in proc.stderr and "permission denied" in proc.stderr.lower():
        pytest.skip(f"cannot mount here: {proc.stderr.strip()[:200]}")
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    directory = run / "checkpoints"
    assert out["error"].startswith(f"no space left on device while saving checkpoint "
                                   f"step_000002 to {directory} ("), out
    assert out["saved"] == [1] and out["complete"] == ["step_000001"], out
    assert out["verified"] == {"step_000001": True} and out["partial"] == [], out
