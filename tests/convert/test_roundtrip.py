"""HF -> Megatron -> HF is bitwise identical for every family; the command line and the
tools/ wrappers; errors name the tensor (single process, no model built)."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

from repo_megatron.cli import main
from repo_megatron.errors import ConfigError, ConversionError
from repo_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf
from repo_megatron.convert.torch_dist_io import TorchDistReader
from tests.convert.tiny_models import FAMILIES, make_tiny_model

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def _hf_tensors(directory: str) -> dict:
    out = {}
    for name in os.listdir(directory):
        if name.endswith(".safetensors"):
            out.update(load_file(os.path.join(directory, name)))
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_tiny_model(f, str(root / f)) for f in FAMILIES}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_roundtrip_is_bitwise_identical(models, tmp_path, family):
    hf = models[family]
    convert_hf_to_megatron(hf, str(tmp_path / "megatron"), tp=2, progress=False)
    # Small shards: the export's sharding and index are exercised too.
    convert_megatron_to_hf(str(tmp_path / "megatron"), str(tmp_path / "back"),
                           max_shard_bytes=200_000, progress=False)
    before, after = _hf_tensors(hf), _hf_tensors(str(tmp_path / "back"))
    assert before.keys() == after.keys()
    for name, t in before.items():
        assert after[name].dtype == t.dtype and torch.equal(after[name], t), name
    with open(os.path.join(hf, "config.json")) as a, \
            open(tmp_path / "back" / "config.json") as b:
        assert json.load(a) == json.load(b)
    index = json.load(open(tmp_path / "back" / "model.safetensors.index.json"))
    assert set(index["weight_map"]) == set(before)


def test_checkpoint_holds_global_layer_stacked_tensors(models, tmp_path):
    convert_hf_to_megatron(models["qwen2"], str(tmp_path / "m"), tp=2, progress=False)
    reader = TorchDistReader(str(tmp_path / "m"))
    # 1000 tokens padded to a multiple of 128 x TP=2; the tied model has no output layer.
    assert reader.global_shape("embedding.word_embeddings.weight") == (1024, 64)
    assert "output_layer.weight" not in reader.tensors
    # 4 layers x (4 q heads + 2 x 2 kv heads) x head_dim 16 rows.
    assert reader.global_shape("decoder.layers.self_attention.linear_qkv.weight") == (4, 128, 64)
    assert reader.global_shape("decoder.layers.self_attention.linear_qkv.bias") == (4, 128)
    assert torch.equal(reader.read("embedding.word_embeddings.weight")[1000:],
                       torch.zeros(24, 64))
    info = json.load(open(tmp_path / "m" / "convert.json"))
    assert info["padded_vocab_size"] == 1024 and info["tensor_model_parallel_size"] == 2
    assert os.path.exists(tmp_path / "m" / "hf" / "config.json")


def test_cli_and_tools_wrappers(models, tmp_path):
    hf = models["llama"]
    assert main(["convert", "hf-to-megatron", "--hf", hf, "--out", str(tmp_path / "m"),
                 "--tp", "1", "--pp", "2", "--no-progress"]) == 0
    tool = os.path.join(REPO, "tools", "convert_megatron_to_hf.py")
    subprocess.run([sys.executable, tool, "--megatron", str(tmp_path / "m"),
                    "--out", str(tmp_path / "back"), "--no-progress"], check=True, cwd=REPO)
    before, after = _hf_tensors(hf), _hf_tensors(str(tmp_path / "back"))
    assert before.keys() == after.keys()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_cli_error_is_one_line(models, tmp_path, capsys):
    code = main(["convert", "hf-to-megatron", "--hf", models["llama"], "--out",
                 str(tmp_path / "m"), "--tp", "4", "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and err.startswith("ConversionError: --tp 4")


def test_tp_larger_than_kv_heads_is_rejected(models, tmp_path):
    with pytest.raises(ConversionError, match=r"--tp 4 .*num_query_groups=2 \(KV heads\)"):
        convert_hf_to_megatron(models["llama"], str(tmp_path / "m"), tp=4, progress=False)


def test_unknown_architecture(models, tmp_path):
    hf = shutil.copytree(models["llama"], tmp_path / "gpt2")
    config = json.load(open(hf / "config.json"))
    config.update(architectures=["GPT2LMHeadModel"], model_type="gpt2")
    json.dump(config, open(hf / "config.json", "w"))
    with pytest.raises(ConfigError, match="architecture GPT2LMHeadModel is not supported"):
        convert_hf_to_megatron(str(hf), str(tmp_path / "m"), progress=False)


def _edited_copy(src: str, dst, edit) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path, metadata={"format": "pt"})
    return str(dst)


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.pop("model.layers.2.mlp.up_proj.weight"),
     "tensor model.layers.2.mlp.up_proj.weight is missing"),
    (lambda t: t.update({"model.layers.0.self_attn.rotary_emb.inv_freq": torch.ones(8)}),
     "unexpected tensor model.layers.0.self_attn.rotary_emb.inv_freq"),
    (lambda t: t.update({"model.layers.1.self_attn.k_proj.weight": torch.ones(16, 64)}),
     r"tensor model.layers.1.self_attn.k_proj.weight has shape \[16, 64\], expected \[32, 64\]"),
])
def test_hf_tensor_errors_name_the_tensor(models, tmp_path, edit, message):
    hf = _edited_copy(models["llama"], tmp_path / "hf", edit)
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_megatron(hf, str(tmp_path / "m"), progress=False)


def test_megatron_tensor_errors_name_the_tensor(models, tmp_path):
    convert_hf_to_megatron(models["mistral"], str(tmp_path / "m"), progress=False)
    # The checkpoint read with a config that expects another FFN size, then another family.
    hf = shutil.copytree(tmp_path / "m" / "hf", tmp_path / "cfg")
    config = json.load(open(hf / "config.json"))
    json.dump({**config, "intermediate_size": 96}, open(hf / "config.json", "w"))
    with pytest.raises(ConversionError, match=r"tensor decoder.layers.mlp.linear_fc1.weight "
                                              r"has shape \[4, 256, 64\], expected \[4, 192, 64\]"):
        convert_megatron_to_hf(str(tmp_path / "m"), str(tmp_path / "out"), hf_config_dir=str(hf),
                               progress=False)
    json.dump({**config, "architectures": ["Qwen3ForCausalLM"], "model_type": "qwen3"},
              open(hf / "config.json", "w"))
    with pytest.raises(ConversionError,
                       match="decoder.layers.self_attention.q_layernorm.weight is missing"):
        convert_megatron_to_hf(str(tmp_path / "m"), str(tmp_path / "out"), hf_config_dir=str(hf),
                               progress=False)
    json.dump({**config, "tie_word_embeddings": True}, open(hf / "config.json", "w"))
    with pytest.raises(ConversionError, match="unexpected tensor output_layer.weight"):
        convert_megatron_to_hf(str(tmp_path / "m"), str(tmp_path / "out"), hf_config_dir=str(hf),
                               progress=False)
