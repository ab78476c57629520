"""Converted checkpoints load into a model with Transformer Engine's ``_extra_state`` keys.

With TE importable, megatron-core builds ``decoder.final_layernorm`` as ``TENorm`` whatever the
layer spec, and the TE spec's linears and Qwen3 q/k norms are TE modules: each checkpoints an
``_extra_state``, and a strict load asks for every one. TE cannot be imported here, so the TE
model is megatron-core's real TE layer spec with CPU stand-ins for the TE classes
(``tests/convert/te_standins.py``); its sharded state dict, made by megatron-core's own code,
is the oracle for the keys. One launch (PP=2 on gloo: the final norm is on the last stage
only) checks every family.
"""

import logging
import os

import pytest
import torch
from safetensors.torch import load_file
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.metadata import BytesStorageMetadata

from repo_megatron.convert import convert_hf_to_megatron
from tests.convert.tiny_models import make_tiny_model
from tests.distributed import run_distributed

FAMILIES = ("llama", "mistral", "qwen2", "qwen3")  # untied, sliding-free, tied + bias, qk norms
PP = 2


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.INFO)
        self.messages = []

    def emit(self, record):
        self.messages.append(record.getMessage())


def _load_everywhere(root: str) -> dict:
    """Per family, this pipeline stage's: the TE model's ShardedObject keys, its export after
    loading the converted checkpoint, and what the load logged. Qwen3 also crosses specs both
    ways, and a non-``_extra_state`` mismatch is loaded to see it raise."""
    import dataclasses

    from megatron.core.dist_checkpointing.core import CheckpointingException
    from megatron.core.dist_checkpointing.dict_utils import nested_values
    from megatron.core.dist_checkpointing.mapping import ShardedObject

    from repo_megatron.checkpoint.model_io import load_model, save_model, sharded_model_state
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.weight_sync import megatron_to_hf_named_tensors
    from tests.convert.te_standins import build_te_model

    records = _Records()
    logger = logging.getLogger("repo_megatron.checkpoint.model_io")
    logger.addHandler(records)
    logger.setLevel(logging.INFO)

    def load_logged(model, path):
        records.messages.clear()
        load_model(model, path)
        return list(records.messages)

    def export(model, arch):
        return {k: v.numpy() for k, v in megatron_to_hf_named_tensors(model, arch)}

    parallel = ParallelConfig(pipeline_model_parallel_size=PP)
    initialize(parallel, seed=7)  # random init differs from the checkpoint: loading must fix it
    out = {}
    for family in FAMILIES:
        ckpt = os.path.join(root, family, "megatron")
        arch = read_architecture(os.path.join(ckpt, "hf"))
        te_model = build_te_model(arch, parallel)
        objects = sorted({v.unique_key for v in nested_values(sharded_model_state(te_model))
                          if isinstance(v, ShardedObject)})
        log = load_logged(te_model, ckpt)
        out[family] = {"objects": objects, "log": log, "export": export(te_model, arch)}

    # Qwen3 across specs: the converted checkpoint (TE's keys) into the local spec, whose
    # norms have no _extra_state; that model's own save (the local keys, as checkpoints
    # converted before TE's norms were covered) back into the TE model.
    ckpt = os.path.join(root, "qwen3", "megatron")
    arch = read_architecture(os.path.join(ckpt, "hf"))
    local = build_model(arch, ModelConfig(transformer_impl="local"), parallel)
    out["local_log"] = load_logged(local, ckpt)
    out["local_export"] = export(local, arch)
    save_model(local, os.path.join(root, "qwen3", "local_saved"))
    te_model = build_te_model(arch, parallel)
    out["older_log"] = load_logged(te_model, os.path.join(root, "qwen3", "local_saved"))
    out["older_export"] = export(te_model, arch)
    # A model without q/k norms: the checkpoint's q/k norm weights are a real mismatch.
    no_qk = build_te_model(dataclasses.replace(arch, qk_layernorm=False), parallel)
    try:
        load_model(no_qk, ckpt)
        out["mismatch"] = None
    except CheckpointingException as e:
        out["mismatch"] = str(e)
    return out


def _checkpoint_objects(path: str) -> list:
    """The ShardedObject entries of a torch_dist checkpoint, as torch's DCP reader lists them."""
    metadata = FileSystemReader(path).read_metadata()
    return sorted(k for k, v in metadata.state_dict_metadata.items()
                  if isinstance(v, BytesStorageMetadata))


@pytest.fixture(scope="module")
def loaded(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("te_extra_state"))
    hf = {}
    for family in FAMILIES:
        src = make_tiny_model(family, os.path.join(root, family, "hf"))
        convert_hf_to_megatron(src, os.path.join(root, family, "megatron"), pp=PP,
                               progress=False)
        hf[family] = load_file(os.path.join(src, "model.safetensors"))
    return root, hf, run_distributed(_load_everywhere, PP, root)


def _assert_same_weights(stages: list, hf: dict, what: str):
    """The pipeline stages' exports together are the HF model."""
    synced = {k: v for stage in stages for k, v in stage.items()}
    assert synced.keys() == hf.keys(), f"{what}: {synced.keys() ^ hf.keys()}"
    for k in hf:
        assert torch.equal(torch.from_numpy(synced[k]), hf[k]), f"{what}: {k} differs"


@pytest.mark.parametrize("family", FAMILIES)
def test_converted_checkpoint_has_every_te_extra_state(loaded, family):
    """The converter writes exactly the TE model's _extra_state objects (final norm and
    Qwen3's q/k norms included), so the strict load needs no tolerance and logs nothing."""
    root, hf, results = loaded
    objects = sorted({k for res in results for k in res[family]["objects"]})
    assert "decoder.final_layernorm._extra_state/shard_0_1" in results[-1][family]["objects"]
    if family == "qwen3":
        for norm in ("q_layernorm", "k_layernorm"):
            assert f"decoder.layers.self_attention.{norm}._extra_state/shard_3_4" in objects
    assert _checkpoint_objects(os.path.join(root, family, "megatron")) == objects
    assert [res[family]["log"] for res in results] == [[]] * PP
    _assert_same_weights([res[family]["export"] for res in results], hf[family], family)


def test_extra_state_on_one_side_only_is_tolerated_with_one_log_line(loaded):
    """TE checkpoint -> local model: the norms' _extra_state is ignored; local save (no norm
    _extra_state) -> TE model: the norms keep their own. Both load every weight. Rank 0 (the
    first stage) logs for every stage: the final norm is the last stage's."""
    _, hf, results = loaded
    res = results[0]
    (line,) = res["local_log"]
    assert "only in the checkpoint (ignored): ['decoder.final_layernorm._extra_state', " \
           "'decoder.layers.self_attention.k_layernorm._extra_state', " \
           "'decoder.layers.self_attention.q_layernorm._extra_state']; only in the model " \
           "(kept as built): none" in line
    (line,) = res["older_log"]
    assert "only in the checkpoint (ignored): none; only in the model (kept as built): " \
           "['decoder.final_layernorm._extra_state', " \
           "'decoder.layers.self_attention.k_layernorm._extra_state', " \
           "'decoder.layers.self_attention.q_layernorm._extra_state']" in line
    assert results[1]["local_log"] == [] and results[1]["older_log"] == []
    _assert_same_weights([r["local_export"] for r in results], hf["qwen3"], "local")
    _assert_same_weights([r["older_export"] for r in results], hf["qwen3"], "TE from older")


def test_extra_state_tolerance_does_not_hide_a_weight_mismatch(loaded):
    _, _, results = loaded
    for r in results:
        assert r["mismatch"] is not None
        assert "decoder.layers.self_attention.q_layernorm.weight" in r["mismatch"]
        assert "_extra_state" not in r["mismatch"]
