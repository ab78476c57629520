"""The whole loop runs end to end on CPU: single process, TP=2 and PP=2 (gloo)."""

import os

import pytest

from repo_megatron.config import config_from_dict
from repo_megatron.metrics.writer import read_rows
from tests.distributed import run_distributed
from tests.run.conftest import tiny_run_config


def _train(cfg_dict: dict) -> int:
    from repo_megatron.run.loop import train
    return train(config_from_dict(cfg_dict))


@pytest.mark.parametrize("layout", [{"tensor_model_parallel_size": 2},
                                    {"pipeline_model_parallel_size": 2}],
                         ids=["tp2", "pp2"])
def test_two_steps_in_a_parallel_layout(tiny_chat_model, tmp_path, layout):
    cfg = tiny_run_config(tiny_chat_model, str(tmp_path / "run"), parallel=layout,
                          checkpoint={"hf_export_at_end": True})
    assert run_distributed(_train, 2, cfg, timeout=600) == [0, 0]
    rows = read_rows(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    assert "eval/solve_rate" in rows[0] and "eval/solve_rate" in rows[-1]
    for row in rows[1:]:
        assert row["train/optimizer_steps"] == 1.0
        assert row["rollout/groups"] == 2.0
        # the engine samples with exactly the weights Megatron trains (synced every step)
        assert row["train/logprob_mismatch_mean"] < 1e-4, row
    assert os.path.getsize(tmp_path / "run" / "metrics.png") > 5000
    ckpts = os.listdir(tmp_path / "run" / "checkpoints")
    assert ckpts == ["step_000002"]
    export = tmp_path / "run" / "hf" / "step_000002"
    assert {"config.json", "model.safetensors", "tokenizer_config.json"} <= set(os.listdir(export))


def _train_device_faithful(cfg_dict: dict) -> int:
    from repo_megatron.runtime import cpu_compat
    cpu_compat.enable(device_faithful=True)
    return _train(cfg_dict)


def test_two_steps_device_faithful_with_the_embedded_engine(tiny_chat_model, tmp_path):
    """The whole loop, device-faithful (repo_megatron.runtime.device_faithful): the RePO stage
    on rank 0's embedded engine, rewards, evaluation, the weight sync from device tensors into
    the host engine, checkpoints and the HF export at TP2, as a GPU run would place them."""
    cfg = tiny_run_config(tiny_chat_model, str(tmp_path / "run"),
                          parallel={"tensor_model_parallel_size": 2},
                          algorithm={"micro_batch_size": 2, "tis_cap": 2.0},
                          checkpoint={"hf_export_at_end": True})
    assert run_distributed(_train_device_faithful, 2, cfg, timeout=600) == [0, 0]
    rows = read_rows(str(tmp_path / "run"))
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["train/logprob_mismatch_mean"] < 1e-4, row
    assert os.path.isdir(tmp_path / "run" / "hf" / "step_000002")


def test_exported_weights_load_in_transformers(tiny_chat_model, tmp_path):
    """The single-process run's export is a Hugging Face model directory."""
    cfg = tiny_run_config(tiny_chat_model, str(tmp_path / "run"), train_steps=1,
                          checkpoint={"hf_export_at_end": True})
    assert run_distributed(_train, 1, cfg, timeout=600) == [0]
    from transformers import AutoModelForCausalLM
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "hf" / "step_000001")
    assert model.config.num_hidden_layers == 2


def _serve_run_config(tmp_path, **sglang):
    """The tiny run on one `repo-megatron serve` worker it launches itself, with ``sglang``
    settings on top."""
    import sys

    from tests.helpers import write_tiny_chat_model
    from tests.sglang.servers import free_ports

    model_dir = write_tiny_chat_model(str(tmp_path / "model"), with_weights=True)
    return tiny_run_config(model_dir, str(tmp_path / "run"), rollout={
        "engine": "sglang", "prompts_per_step": 2, "group_size": 2, "max_new_tokens": 8,
        "sglang": {**sglang,
                   "launch": {"num_servers": 1, "base_port": free_ports(1),
                              "command": [sys.executable, "-m", "repo_megatron.cli", "serve"],
                              "args": ["--model", model_dir, "--threads", "1",
                                       "--weights-root", str(tmp_path)],
                              "startup_timeout_s": 240}}})


def _assert_two_steps_agree(run_dir: str) -> None:
    rows = read_rows(run_dir)
    assert [r["step"] for r in rows] == [0, 1, 2]
    for row in rows[1:]:
        assert row["train/logprob_mismatch_mean"] < 1e-4, row


def test_training_through_sglang_protocol_workers(tmp_path):
    """The loop with `repo-megatron serve` workers it launches itself: weights reach the
    servers (disk sync), and their log-probs agree with Megatron's recomputation."""
    import importlib.util

    if importlib.util.find_spec("starlette") is None:
        pytest.skip("needs starlette/uvicorn")
    cfg = _serve_run_config(tmp_path, weight_sync="disk", disk_dir=str(tmp_path / "sync"))
    assert run_distributed(_train, 1, cfg, timeout=600) == [0]
    _assert_two_steps_agree(str(tmp_path / "run"))


def test_colocated_training_releases_memory_and_offloads_the_trainer(tmp_path):
    """The colocated flow end to end: the server started with --enable-memory-saver (added by
    the launch: released regions out of service, as SGLang's), tensor weight sync, the trainer offloaded (host) for
    each rollout; a wrong order of release / resume / generate would fail the run."""
    import importlib.util

    if importlib.util.find_spec("starlette") is None:
        pytest.skip("needs starlette/uvicorn")
    cfg = _serve_run_config(tmp_path, weight_sync="tensor", offload_trainer="host")
    assert run_distributed(_train, 1, cfg, timeout=600) == [0]
    _assert_two_steps_agree(str(tmp_path / "run"))
    log = tmp_path / "run" / "servers" / "sglang-0.log"
    moves = [line.split("memory ")[1].strip() for line in log.read_text().splitlines()
             if "memory released" in line or "memory resumed" in line]
    # the initial sync, then per step: released for training, weights back for the sync, the
    # KV cache and CUDA graphs back at the next generation (after the trainer's offload)
    cycle = ["released: kv_cache, weights, cuda_graph", "resumed: weights",
             "resumed: kv_cache, cuda_graph"]
    assert moves[:3] == cycle and moves.count(cycle[0]) >= 3, moves
