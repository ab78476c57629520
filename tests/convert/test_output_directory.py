"""Output directories appear whole or not at all: a reused --out is refused (or, with
--overwrite, replaced whole), a failed run leaves what was there, a full disk (a real ENOSPC
from a small tmpfs, and a simulated one) is one line and leaves nothing behind."""

import hashlib
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

from repo_megatron.cli import main
from repo_megatron.errors import ConversionError, OutputExistsError
from repo_megatron.convert import byte_copy, convert_hf_to_megatron, convert_megatron_to_hf
from repo_megatron.convert.output import atomic_directory
from tests.convert.tiny_models import make_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def hf(tmp_path_factory):
    return make_tiny_model("llama", str(tmp_path_factory.mktemp("hf") / "llama"))


@pytest.fixture(scope="module")
def megatron(hf, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("megatron") / "ckpt")
    convert_hf_to_megatron(hf, out, progress=False)
    return out


def snapshot(directory) -> dict:
    """Relative path -> sha256 of every file under ``directory``."""
    out = {}
    for root, _, files in os.walk(directory):
        for name in files:
            path = os.path.join(root, name)
            with open(path, "rb") as f:
                out[os.path.relpath(path, directory)] = hashlib.sha256(f.read()).hexdigest()
    return out


def siblings(path) -> list[str]:
    """Everything beside ``path`` other than ``path`` itself (temporary leftovers)."""
    parent, name = os.path.split(os.path.abspath(path))
    return sorted(n for n in os.listdir(parent) if n != name)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert err and "\n" not in err and "Traceback" not in err, err
    return err


def test_non_empty_out_is_refused_without_overwrite(hf, megatron, tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "model.safetensors").write_bytes(b"old")
    before = snapshot(out)
    code = main(["convert", "megatron-to-hf", "--megatron", megatron, "--out", str(out),
                 "--no-progress"])
    assert code == 2 and "directory is not empty (pass --overwrite" in _one_line_error(capsys)
    assert snapshot(out) == before and siblings(out) == []
    with pytest.raises(OutputExistsError, match="not empty"):
        convert_hf_to_megatron(hf, str(out), progress=False)


def test_empty_out_directory_is_used(megatron, tmp_path):
    (tmp_path / "out").mkdir()
    convert_megatron_to_hf(megatron, str(tmp_path / "out"), progress=False)
    assert os.path.exists(tmp_path / "out" / "model.safetensors")


def test_out_that_is_a_file_is_refused(hf, tmp_path, capsys):
    (tmp_path / "out").write_text("keep me")
    code = main(["convert", "hf-to-megatron", "--hf", hf, "--out", str(tmp_path / "out"),
                 "--no-progress"])
    assert code == 2 and "exists and is not a directory" in _one_line_error(capsys)
    assert (tmp_path / "out").read_text() == "keep me"


def test_overwrite_replaces_a_single_file_export_with_a_sharded_one(hf, megatron, tmp_path):
    """The stale-files bug: an old model.safetensors next to a new sharded export would be
    loaded instead of it. With --overwrite nothing of the old directory survives."""
    out = str(tmp_path / "out")
    convert_megatron_to_hf(megatron, out, progress=False)
    with open(os.path.join(out, "stale.txt"), "w") as f:
        f.write("from the old export")
    other = make_tiny_model("llama", str(tmp_path / "other"), seed=1)
    convert_hf_to_megatron(other, str(tmp_path / "m2"), progress=False)
    convert_megatron_to_hf(str(tmp_path / "m2"), out, max_shard_bytes=200_000, progress=False,
                           overwrite=True)
    names = set(os.listdir(out))
    assert "model.safetensors" not in names and "stale.txt" not in names
    assert "model.safetensors.index.json" in names
    from transformers import AutoModelForCausalLM
    loaded = AutoModelForCausalLM.from_pretrained(out).state_dict()
    expected = load_file(os.path.join(other, "model.safetensors"))
    assert all(torch.equal(loaded[k], expected[k]) for k in expected)
    assert siblings(out) == ["m2", "other"]


def test_overwrite_replaces_a_sharded_export_with_a_single_file(megatron, tmp_path):
    out = str(tmp_path / "out")
    convert_megatron_to_hf(megatron, out, max_shard_bytes=200_000, progress=False)
    convert_megatron_to_hf(megatron, out, progress=False, overwrite=True)
    assert sorted(n for n in os.listdir(out) if "safetensors" in n) == ["model.safetensors"]


def test_failed_run_leaves_the_existing_directory_untouched(hf, megatron, tmp_path, monkeypatch,
                                                            capsys):
    """A run that fails half-way into an existing checkpoint (here: the disk fills after a
    few copies) must not truncate it: the old files stay, byte for byte."""
    out = tmp_path / "out"
    shutil.copytree(megatron, out)
    before = snapshot(out)
    calls = {"n": 0}
    real = os.copy_file_range

    def fills_up(*args):
        calls["n"] += 1
        if calls["n"] > 5:
            raise OSError(28, "No space left on device")
        return real(*args)

    monkeypatch.setattr(byte_copy.os, "copy_file_range", fills_up)
    code = main(["convert", "hf-to-megatron", "--hf", hf, "--out", str(out), "--overwrite",
                 "--no-progress"])
    err = _one_line_error(capsys)
    assert code == 1 and err.startswith("OSError: No space left on device: ")
    assert f"--out {out} left as it was" in err
    assert 6 <= calls["n"] <= 7  # it failed half-way, and stopped (the other thread's copy)
    assert snapshot(out) == before and siblings(out) == []


def test_interrupt_removes_the_temporary_directory(tmp_path):
    with pytest.raises(KeyboardInterrupt):
        with atomic_directory(str(tmp_path / "out")) as tmp:
            open(os.path.join(tmp, "half"), "w").close()
            raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_full_disk_on_a_real_small_file_system(hf, megatron, tmp_path):
    """ENOSPC from the kernel: a 400 KiB tmpfs in a private mount namespace, holding an
    existing export that --overwrite must not lose."""
    if shutil.which("unshare") is None or subprocess.run(
            ["unshare", "-Urm", "true"], capture_output=True).returncode != 0:
        pytest.skip("needs `unshare -Urm` (user + mount namespaces) for a private tmpfs")
    disk = tmp_path / "disk"
    disk.mkdir()
    out = disk / "out"
    script = f"""
set -e
mount -t tmpfs -o size=400k none {disk}
mkdir {out} && echo "an old export" > {out}/config.json
cd {REPO}
set +e
{sys.executable} -m repo_megatron.cli convert megatron-to-hf --megatron {megatron} \\
    --out {out} --overwrite --no-progress 2> {tmp_path}/err
echo "exit=$?"
cat {out}/config.json
ls -A {disk}
"""
    proc = subprocess.run(["unshare", "-Urm", "sh", "-c", script], capture_output=True,
                          text=True, timeout=300)
    err = (tmp_path / "err").read_text().strip()
    # Exit 1, the old export intact, nothing else left on the disk.
    assert proc.stdout.splitlines() == ["exit=1", "an old export", "out"], \
        (proc.stdout, proc.stderr, err)
    assert err.count("\n") == 0 and err.startswith("OSError: No space left on device"), err


def test_exported_json_files_are_checked(megatron, tmp_path):
    """A checkpoint whose hf/tokenizer.json was truncated (a full disk before atomic writes)
    is refused, not copied on."""
    broken = shutil.copytree(megatron, tmp_path / "m")
    (broken / "hf" / "tokenizer.json").write_text('{"model": {"vocab": {"a": 1,')
    with pytest.raises(ConversionError, match=r"hf/tokenizer.json: not valid JSON .*truncated"):
        convert_megatron_to_hf(str(broken), str(tmp_path / "out"), progress=False)
    assert not os.path.exists(tmp_path / "out") and siblings(tmp_path / "out") == ["m"]


def test_trainer_export_replaces_the_previous_export_whole(tmp_path):
    """EngineRollout.export (run/rollout_side.py) writes through the same atomic directory."""
    from types import SimpleNamespace

    from repo_megatron.run.rollout_side import EngineRollout

    out = tmp_path / "hf" / "step_000001"
    out.mkdir(parents=True)
    (out / "model.safetensors.index.json").write_text("{}")  # a stale sharded export
    saved = []
    side = SimpleNamespace(
        hf_config=SimpleNamespace(save_pretrained=lambda d: saved.append(("config", d))),
        formatter=SimpleNamespace(tokenizer=SimpleNamespace(
            save_pretrained=lambda d: saved.append(("tokenizer", d)))))
    weights = {"model.norm.weight": torch.ones(4)}
    EngineRollout.export(side, weights, str(out))
    assert sorted(os.listdir(out)) == ["model.safetensors"]
    assert torch.equal(load_file(str(out / "model.safetensors"))["model.norm.weight"],
                       torch.ones(4))
    assert [what for what, _ in saved] == ["config", "tokenizer"]
    assert siblings(out) == []


def test_a_copy_renamed_into_place_meanwhile_is_kept_and_the_loser_gets_one_line(tmp_path,
                                                                                  monkeypatch):
    """The window between the last check and the rename: another process's complete copy
    lands there. rename(2) refuses to replace it; theirs stands and ours is removed."""
    import repo_megatron.convert.output as output

    out = tmp_path / "out"
    checks = []
    real_check = output.check_output_directory

    def check_once(*args, **kwargs):  # the check after the work sees nothing yet: the window
        checks.append(args)
        if len(checks) == 1:
            real_check(*args, **kwargs)

    monkeypatch.setattr(output, "check_output_directory", check_once)
    with pytest.raises(OutputExistsError, match=r"--out .*out: directory is not empty "
                                                r"\(another process wrote it meanwhile\)"):
        with atomic_directory(str(out)) as tmp:
            open(os.path.join(tmp, "weights"), "w").write("ours")
            out.mkdir()
            (out / "weights").write_text("theirs")   # the other process's rename
    assert len(checks) == 2
    assert (out / "weights").read_text() == "theirs"
    assert not [n for n in os.listdir(tmp_path) if n.startswith(".out.tmp-")]


def test_runs_started_together_convert_the_cached_model_once(tmp_path, monkeypatch):
    """Two runs of one model start at once (a sweep, the benchmarks' parallel arms): the
    second waits on the cache entry's lock and reuses the first one's conversion."""
    import threading
    import time

    import repo_megatron.convert as convert
    from repo_megatron.config import config_from_dict
    from repo_megatron.convert import cache

    calls = []

    def slow_convert(hf_path, out, **_):
        calls.append(out)
        with atomic_directory(out) as tmp:
            time.sleep(0.5)
            open(os.path.join(tmp, "metadata.json"), "w").write("{}")

    monkeypatch.setattr(convert, "convert_hf_to_megatron", slow_convert)
    monkeypatch.setattr(cache, "_rank", lambda: 0)
    monkeypatch.setattr(cache.control, "barrier", lambda: None)
    cfg = config_from_dict({"model": {"hf_path": str(tmp_path / "hf"),
                                      "cache_dir": str(tmp_path / "cache")}}, check_model=False)

    class Arch:
        vocab_size = 100

    paths, errors = [], []

    def run():
        try:
            paths.append(cache.converted_checkpoint(cfg, Arch()))
        except Exception as e:  # noqa: BLE001 - reported by the assertion below
            errors.append(e)

    threads = [threading.Thread(target=run) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert len(calls) == 1 and paths[0] == paths[1] == calls[0]
    assert os.listdir(paths[0]) == ["metadata.json"]
