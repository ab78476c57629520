"""``/update_weights_from_disk`` reads only below ``--weights-root``: paths outside it (also via
``..`` or a symlink), missing paths and files get the same answer, so the endpoint is no
oracle for what exists; index entries that leave ``model_path`` are refused; nothing is read
without a root."""

import json
import os

import httpx
import pytest
import torch
from safetensors.torch import save_file

from repo_megatron.engines.sglang_server.app import ServeOptions
from repo_megatron.engines.sglang_server.gate import brief
from repo_megatron.engines.sglang_server.weights_dir import WeightsDirError, read_weights_dir

from ..sglang.inprocess import serve_model


@pytest.fixture
def tree(tmp_path):
    """root/good (one shard), root/escape -> outside (symlink), outside/secret (a shard)."""
    root, outside = tmp_path / "root", tmp_path / "outside"
    (root / "good").mkdir(parents=True)
    outside.mkdir()
    save_file({"w": torch.ones(2)}, str(root / "good" / "model.safetensors"))
    save_file({"w": torch.zeros(2)}, str(outside / "model.safetensors"))
    (root / "escape").symlink_to(outside)
    (root / "a_file").write_text("x")
    return root, outside


def message(root, path) -> str:
    with pytest.raises(WeightsDirError) as error:
        read_weights_dir(str(root), path)
    return str(error.value).replace(brief(path), "<path>")


def test_a_directory_under_the_root_loads_by_absolute_or_relative_path(tree):
    root, _ = tree
    for path in (str(root / "good"), "good"):
        [(name, tensor)] = read_weights_dir(str(root), path)
        assert name == "w" and torch.equal(tensor, torch.ones(2))


def test_outside_missing_and_non_directories_get_one_and_the_same_answer(tree):
    root, outside = tree
    answers = {message(root, p) for p in (
        str(outside), str(root / "escape"), str(root / ".." / "outside"), "../outside",
        str(root / "missing"), str(outside / "missing"), "/etc", "/nonexistent/x",
        str(root / "a_file"), "", 17, None, "good\0x")}
    assert answers == {"model_path <path> is not a weight directory under this server's "
                       "--weights-root"}


def test_without_a_root_nothing_is_read(tree):
    root, _ = tree
    with pytest.raises(WeightsDirError, match="start it with --weights-root"):
        read_weights_dir(None, str(root / "good"))


@pytest.mark.parametrize("entry", ["../../outside/model.safetensors", "/etc/passwd",
                                   "../escape/model.safetensors", 5])
def test_index_entries_must_stay_inside_model_path(tree, entry):
    root, _ = tree
    index = root / "good" / "model.safetensors.index.json"
    index.write_text(json.dumps({"weight_map": {"w": "model.safetensors", "v": entry}}))
    with pytest.raises(WeightsDirError, match="is not a file inside model_path"):
        read_weights_dir(str(root), "good")


def test_a_broken_index_or_shard_is_a_clear_error(tree):
    root, _ = tree
    index = root / "good" / "model.safetensors.index.json"
    for text in ("{", "[]", '{"weight_map": 3}'):
        index.write_text(text)
        with pytest.raises(WeightsDirError, match="no readable weight_map"):
            read_weights_dir(str(root), "good")
    os.remove(index)
    (root / "good" / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(WeightsDirError, match="cannot read model.safetensors"):
        read_weights_dir(str(root), "good")


def test_the_endpoint_answers_400_outside_the_root_and_loads_inside(model_dir, tmp_path):
    root = tmp_path / "sync"
    (root / "step1").mkdir(parents=True)
    save_file({"model.norm.weight": torch.full((64,), 3.0)},
              str(root / "step1" / "model.safetensors"))
    with serve_model(model_dir, options=ServeOptions(weights_root=str(root))) as (url, server):
        for path in (model_dir, "/etc", str(root / "nope")):
            answer = httpx.post(url + "/update_weights_from_disk", json={"model_path": path})
            assert answer.status_code == 400 and answer.json()["success"] is False
            assert os.path.basename(path) not in answer.json()["message"].split("'")[0]
        answer = httpx.post(url + "/update_weights_from_disk",
                            json={"model_path": str(root / "step1"), "weight_version": "7"},
                            timeout=60)
        assert answer.status_code == 200, answer.text
        assert server.weight_version == "7"
        assert torch.equal(server.worker.engine.model.model.norm.weight, torch.full((64,), 3.0))
