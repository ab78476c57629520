"""Converted checkpoints give transformers' log-probs in Megatron layouts (real TP/PP on gloo),
sliding-window attention included; weight sync returns the original HF weights, and so does
the export of Megatron's own TP2 x PP2 saves.

One launch per layout checks every family (each launch costs 10+ s of imports). Log-probs are
taken over the model's true vocabulary (TP-gathered logits, padding rows dropped) through
Megatron's pipeline schedule; ``forward_logprobs`` itself normalises over the padded
vocabulary, so it is compared to transformers only where there is no padding.
"""

import os
from functools import partial

import pytest
import torch
from safetensors.torch import load_file

from repo_megatron.convert import convert_hf_to_megatron, convert_megatron_to_hf
from tests.convert.tiny_models import FAMILIES, hf_logprobs, make_tiny_model
from tests.distributed import run_distributed

TOKENS = torch.randint(0, 1000, (4, 24), generator=torch.Generator().manual_seed(0))
UNPADDED = "mistral"  # also converted with no vocabulary padding (vocab 1000, divisor 8)
SAVED_BY_MEGATRON = ("llama", "qwen2")  # untied; tied with QKV bias


def _true_vocab_logprob_step(vocab_size: int, data_iterator, model):
    """Forward step: next-token log-probs over the first ``vocab_size`` logits."""
    from megatron.core.tensor_parallel import gather_from_tensor_model_parallel_region
    from repo_megatron.trainer.forward import forward_inputs

    _, inputs, _ = forward_inputs(next(data_iterator), model)
    tokens = inputs["input_ids"]

    def loss(logits):  # [b, s, padded_vocab / tp]
        logits = gather_from_tensor_model_parallel_region(logits)[..., :vocab_size].float()
        logp = torch.log_softmax(logits[:, :-1], -1).gather(-1, tokens[:, 1:, None])[..., 0]
        return logits.new_zeros(()), {"logprobs": logp}

    return model(**inputs), loss


def _megatron_logprobs(root: str, tp: int, pp: int, families: list, sync: bool,
                       save: tuple = ()):
    """Per family, on the last pipeline stage: true-vocabulary log-probs of the converted
    checkpoint in this layout; (``sync``) this rank's weight-sync output on every rank. The
    families in ``save`` are saved back by Megatron itself (``ROOT/family/saved``)."""
    from megatron.core import parallel_state

    from repo_megatron.checkpoint.model_io import load_model, save_model
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.trainer.forward import forward_logprobs, run_schedule
    from repo_megatron.trainer.micro_batch import MicroBatch
    from repo_megatron.weight_sync import megatron_to_hf_named_tensors

    parallel = ParallelConfig(tensor_model_parallel_size=tp, pipeline_model_parallel_size=pp)
    initialize(parallel, seed=99)  # random init differs from the checkpoint: loading must fix it
    micro_batches = [MicroBatch(tokens=t) for t in TOKENS.split(2)]
    out = {}
    for family in families:
        ckpt = os.path.join(root, family, "megatron")
        arch = read_architecture(os.path.join(ckpt, "hf"))
        model = build_model(arch, ModelConfig(transformer_impl="local"), parallel)
        load_model(model, ckpt)
        for m in model:
            m.eval()
        with torch.no_grad():
            res = run_schedule(model, micro_batches,
                               partial(_true_vocab_logprob_step, arch.vocab_size), True)
        logp = torch.cat([r["logprobs"] for r in res]).numpy() if res else None
        # numpy, not tensors: torch shares tensors with the parent through this process,
        # which exits before the parent reads them.
        synced = {k: v.numpy() for k, v in megatron_to_hf_named_tensors(model, arch)} \
            if sync else None
        out[family] = (logp, synced)
        if family in save:
            save_model(model, os.path.join(root, family, "saved"))
    if tp == 1 and pp == 1:  # no padding: forward_logprobs' own normalisation is exact
        ckpt = os.path.join(root, UNPADDED, "megatron_unpadded")
        arch = read_architecture(os.path.join(ckpt, "hf"))
        model_cfg = ModelConfig(transformer_impl="local", make_vocab_size_divisible_by=8)
        model = build_model(arch, model_cfg, parallel)
        load_model(model, ckpt)
        out["forward_logprobs"] = torch.cat(forward_logprobs(model, micro_batches))[:, :-1].numpy()
        # The same checkpoint in a model padded to 1024 rows: Megatron marks vocabulary tensors
        # allow_shape_mismatch, so the overlapping rows (every real token) load.
        padded = build_model(arch, ModelConfig(transformer_impl="local"), parallel)
        load_model(padded, ckpt)
        with torch.no_grad():
            res = run_schedule(padded, micro_batches,
                               partial(_true_vocab_logprob_step, arch.vocab_size), True)
        out["other_padding"] = torch.cat([r["logprobs"] for r in res]).numpy()
    out["last_stage"] = parallel_state.is_pipeline_last_stage()
    return out


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
    """family -> (transformers log-probs, HF weights); converted with vocabulary padding for
    TP=2 (the llama vocabulary, 1001, is not divisible by TP)."""
    root = str(tmp_path_factory.mktemp("parity"))
    refs = {}
    for family in FAMILIES:
        hf = make_tiny_model(family, os.path.join(root, family, "hf"))
        convert_hf_to_megatron(hf, os.path.join(root, family, "megatron"), tp=2, pp=2,
                               progress=False)
        refs[family] = (hf_logprobs(hf, TOKENS), load_file(os.path.join(hf, "model.safetensors")))
    # The windows are short enough to matter: without them transformers' log-probs change.
    for family in ("mistral_swa", "qwen2_swa"):
        full = make_tiny_model(family, os.path.join(root, family, "full_attention"),
                               sliding_window=None)
        assert (hf_logprobs(full, TOKENS) - refs[family][0]).abs().max() > 1e-2, family
    convert_hf_to_megatron(os.path.join(root, UNPADDED, "hf"),
                           os.path.join(root, UNPADDED, "megatron_unpadded"),
                           make_vocab_size_divisible_by=8, progress=False)
    return root, refs


def _check_logprobs(results, refs, layout):
    checked = 0
    for rank, res in enumerate(results):
        if not res["last_stage"]:
            continue
        for family in FAMILIES:
            diff = (torch.from_numpy(res[family][0]) - refs[family][0]).abs().max().item()
            assert diff < 1e-4, f"{family} {layout} rank {rank}: max |dlogp| = {diff:.2e}"
            checked += 1
    assert checked >= len(FAMILIES)


def test_tp1_logprobs_equal_transformers(converted):
    root, refs = converted
    (res,) = run_distributed(_megatron_logprobs, 1, root, 1, 1, list(FAMILIES), True)
    _check_logprobs([res], refs, "tp1")
    diff = (torch.from_numpy(res["forward_logprobs"]) - refs[UNPADDED][0]).abs().max().item()
    assert diff < 1e-4, f"forward_logprobs without padding: max |dlogp| = {diff:.2e}"
    # Weight sync at TP=1 returns exactly the original tensors.
    for family in FAMILIES:
        synced, hf = res[family][1], refs[family][1]
        assert synced.keys() == hf.keys(), family
        assert all(torch.equal(torch.from_numpy(synced[k]), hf[k]) for k in hf), family
    # A checkpoint padded for another layout loads: every real row is there.
    diff = (torch.from_numpy(res["other_padding"]) - refs[UNPADDED][0]).abs().max().item()
    assert diff < 1e-4, f"1000-row checkpoint in a 1024-row model: max |dlogp| = {diff:.2e}"


def test_tp2pp2_logprobs_and_weight_sync(converted):
    """4 gloo processes: TP=2 x PP=2."""
    root, refs = converted
    results = run_distributed(_megatron_logprobs, 4, root, 2, 2, list(FAMILIES), True,
                              SAVED_BY_MEGATRON)
    _check_logprobs(results, refs, "tp2pp2")
    # Megatron's own TP2 x PP2 saves export to the original weights, bit for bit: TP row
    # shards are copied as bytes, column-split shards (linear_proj, linear_fc2) go through
    # memory, PP stages hold their own layers.
    for family in SAVED_BY_MEGATRON:
        out = os.path.join(root, family, "saved_hf")
        convert_megatron_to_hf(os.path.join(root, family, "saved"), out,
                               hf_config_dir=os.path.join(root, family, "hf"), progress=False)
        back, hf = load_file(os.path.join(out, "model.safetensors")), refs[family][1]
        assert back.keys() == hf.keys() and all(torch.equal(back[k], hf[k]) for k in hf), family
    for family in FAMILIES:
        hf = refs[family][1]
        # Ranks 0, 1 (TP group of stage 0) and 2, 3 (stage 1): TP peers get the same tensors,
        # and the two stages together hold every HF tensor exactly once.
        for a, b in ((results[0], results[1]), (results[2], results[3])):
            sa, sb = a[family][1], b[family][1]
            assert sa.keys() == sb.keys() and all((sa[k] == sb[k]).all() for k in sa)
        stage0, stage1 = results[0][family][1], results[2][family][1]
        assert not stage0.keys() & stage1.keys(), family
        synced = {**stage0, **stage1}
        assert synced.keys() == hf.keys(), f"{family}: {synced.keys() ^ hf.keys()}"
        for k in hf:
            assert torch.equal(torch.from_numpy(synced[k]), hf[k]), f"{family}: {k} differs"
