"""Real checkpoints' quirks: the GGUF quantization tag, a tied model's redundant lm_head,
dtypes checked before anything is written; and how the bytes move (copies planned from the
mapping's own transforms, in-memory only for casts and column-split chunks)."""

import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from repo_megatron.errors import ConversionError
from repo_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf
from repo_megatron.convert.safetensors_io import SafetensorsCheckpoint
from repo_megatron.convert.torch_dist_io import TorchDistReader
from repo_megatron.hf_files import strip_gguf_quantization
from tests.convert.tiny_models import make_tiny_model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {f: make_tiny_model(f, str(root / f)) for f in ("llama", "qwen2")}


def _edited(src: str, dst, edit=None, config=None) -> str:
    shutil.copytree(src, dst)
    path = os.path.join(dst, "model.safetensors")
    if edit is not None:
        tensors = load_file(path)
        edit(tensors)
        save_file(tensors, path, metadata={"format": "pt"})
    if config is not None:
        cfg = json.load(open(os.path.join(dst, "config.json")))
        json.dump(config(cfg), open(os.path.join(dst, "config.json"), "w"))
    return str(dst)


def test_gguf_quantization_tag_is_dropped_from_exported_configs(models, tmp_path):
    """transformers tags models loaded from GGUF with quantization_config {quant_method: gguf};
    kept in an fp32 export, transformers treats it as quantized and refuses save_pretrained."""
    hf = _edited(models["llama"], tmp_path / "hf", config=lambda c: {
        **c, "quantization_config": {"quant_method": "gguf"}})
    convert_hf_to_megatron(hf, str(tmp_path / "m"), progress=False)
    assert "quantization_config" not in json.load(open(tmp_path / "m" / "hf" / "config.json"))
    # A checkpoint made before the fix still exports clean.
    json.dump({**json.load(open(tmp_path / "m" / "hf" / "config.json")),
               "quantization_config": {"quant_method": "gguf"}},
              open(tmp_path / "m" / "hf" / "config.json", "w"))
    convert_megatron_to_hf(str(tmp_path / "m"), str(tmp_path / "back"), progress=False)
    assert "quantization_config" not in json.load(open(tmp_path / "back" / "config.json"))
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "back"))
    model.save_pretrained(str(tmp_path / "saved"))  # refused while the tag is there
    assert os.path.exists(tmp_path / "saved" / "model.safetensors")


def test_other_quantization_configs_are_kept():
    config = {"quantization_config": {"quant_method": "fp8"}, "hidden_size": 8}
    assert strip_gguf_quantization(config) == config
    assert strip_gguf_quantization({"quantization_config": {"quant_method": "gguf"}}) == {}


def test_redundant_lm_head_equal_to_the_embedding_is_accepted(models, tmp_path):
    """Many tied checkpoints also ship lm_head.weight (a copy of the embedding)."""
    hf = _edited(models["qwen2"], tmp_path / "hf", edit=lambda t: t.update(
        {"lm_head.weight": t["model.embed_tokens.weight"].clone()}))
    convert_hf_to_megatron(hf, str(tmp_path / "m"), progress=False)
    assert "output_layer.weight" not in TorchDistReader(str(tmp_path / "m")).tensors
    convert_megatron_to_hf(str(tmp_path / "m"), str(tmp_path / "back"), progress=False)
    before, after = load_file(os.path.join(models["qwen2"], "model.safetensors")), \
        load_file(str(tmp_path / "back" / "model.safetensors"))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_redundant_lm_head_that_differs_is_refused(models, tmp_path):
    def edit(t):
        t["lm_head.weight"] = t["model.embed_tokens.weight"].clone()
        t["lm_head.weight"][7, 3] += 1.0

    hf = _edited(models["qwen2"], tmp_path / "hf", edit=edit)
    with pytest.raises(ConversionError, match=r"model.safetensors: tensor lm_head.weight differs "
                                              r"from model.embed_tokens.weight, but config.json "
                                              r"has tie_word_embeddings=true"):
        convert_hf_to_megatron(hf, str(tmp_path / "m"), progress=False)
    assert not os.path.exists(tmp_path / "m")


@pytest.mark.parametrize("edit, message", [
    (lambda t: t.update({"model.norm.weight": t["model.norm.weight"].to(torch.bfloat16)}),
     r"tensor model.norm.weight is BF16 but model.embed_tokens.weight is F32; mixed dtypes"),
    (lambda t: t.update({"model.layers.1.mlp.down_proj.weight":
                         t["model.layers.1.mlp.down_proj.weight"].to(torch.int8)}),
     r"tensor model.layers.1.mlp.down_proj.weight is I8; only F32, BF16 and F16"),
])
def test_bad_dtypes_are_refused_before_anything_is_written(models, tmp_path, edit, message):
    hf = _edited(models["llama"], tmp_path / "hf", edit=edit)
    with pytest.raises(ConversionError, match=message):
        convert_hf_to_megatron(hf, str(tmp_path / "m"), progress=False)
    assert sorted(os.listdir(tmp_path)) == ["hf"]


def test_bf16_and_fp16_models_round_trip(models, tmp_path):
    for dtype in (torch.bfloat16, torch.float16):
        name = str(dtype).split(".")[1]
        hf = _edited(models["llama"], tmp_path / name,
                     edit=lambda t: t.update({k: v.to(dtype) for k, v in t.items()}))
        convert_hf_to_megatron(hf, str(tmp_path / f"m_{name}"), progress=False)
        convert_megatron_to_hf(str(tmp_path / f"m_{name}"), str(tmp_path / f"b_{name}"),
                               progress=False)
        before = load_file(os.path.join(hf, "model.safetensors"))
        after = load_file(str(tmp_path / f"b_{name}" / "model.safetensors"))
        assert all(after[k].dtype == dtype and torch.equal(after[k], before[k]) for k in before)


def test_conversion_copies_bytes_without_loading_tensors(models, tmp_path, monkeypatch):
    """The families' transforms only move rows, so both directions are byte copies: nothing
    reads a tensor into memory."""
    def refuse(*args, **kwargs):
        raise AssertionError("a tensor was loaded")

    monkeypatch.setattr(SafetensorsCheckpoint, "get", refuse)
    monkeypatch.setattr(TorchDistReader, "read", refuse)
    for family, hf in models.items():
        convert_hf_to_megatron(hf, str(tmp_path / family / "m"), tp=2, progress=False)
        convert_megatron_to_hf(str(tmp_path / family / "m"), str(tmp_path / family / "back"),
                               max_shard_bytes=100_000, progress=False)
        before = load_file(os.path.join(hf, "model.safetensors"))
        back = tmp_path / family / "back"
        after = {k: v for f in sorted(os.listdir(back)) if f.endswith(".safetensors")
                 for k, v in load_file(str(back / f)).items()}
        assert after.keys() == before.keys(), family
        assert all(torch.equal(after[k], before[k]) for k in before), family


def test_dtype_cast_on_export_goes_through_memory(models, tmp_path):
    convert_hf_to_megatron(models["llama"], str(tmp_path / "m"), progress=False)
    convert_megatron_to_hf(str(tmp_path / "m"), str(tmp_path / "back"), dtype=torch.bfloat16,
                           progress=False)
    before = load_file(os.path.join(models["llama"], "model.safetensors"))
    after = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(after[k], before[k].to(torch.bfloat16)) for k in before)


def test_mapping_that_computes_values_is_converted_in_memory(models, tmp_path, monkeypatch):
    """A mapping not marked ``moves_rows`` (e.g. a future family with arithmetic in its
    transform) takes the in-memory path both ways, and still round-trips."""
    import dataclasses

    from repo_megatron.models import weight_mapping

    real = weight_mapping.WEIGHT_MAPPINGS["llama"]
    monkeypatch.setitem(weight_mapping.WEIGHT_MAPPINGS._entries, "llama", lambda arch: [
        dataclasses.replace(m, moves_rows=False) for m in real(arch)])
    convert_hf_to_megatron(models["llama"], str(tmp_path / "m"), tp=2, progress=False)
    convert_megatron_to_hf(str(tmp_path / "m"), str(tmp_path / "back"), progress=False)
    before = load_file(os.path.join(models["llama"], "model.safetensors"))
    after = load_file(str(tmp_path / "back" / "model.safetensors"))
    assert all(torch.equal(after[k], before[k]) for k in before)
