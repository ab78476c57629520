"""``repo-megatron plan --measure``: one rank of the real layout measured on the meta device.

The measurement's counts are checked against Megatron's own objects (its DDP buffers and
distributed optimizer shards) and the plan's formulas against the measurement, on the shipped
70B layout (TP 8 x PP 4, virtual 2) with a scaled-down model; the full-size shipped configs
run through the CLI.
"""

import json
import pathlib

import pytest
import torch.distributed as dist

from repo_megatron.cli import main
from repo_megatron.config import load_config
from repo_megatron.plan.command import layout_of, workload_of
from repo_megatron.plan.fake_world import fake_rank, global_rank
from repo_megatron.plan.measure import (GRADIENTS, OPTIMIZER, WEIGHTS, RankUnderMeasurement,
                                        measure_stage, measured_micro_batches)
from repo_megatron.plan.memory import Layout, in_flight_micro_batches, stage_memory

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"
# Llama-shaped (GQA 32 / 8 heads, SwiGLU f = 3.5 h) and small enough to measure in seconds.
SMALL = ["model.architecture_overrides={num_hidden_layers: 16, hidden_size: 1024, "
         "intermediate_size: 3584, num_attention_heads: 32, num_key_value_heads: 8, "
         "head_dim: 32, vocab_size: 64000}",
         "data.max_prompt_tokens=256", "rollout.max_new_tokens=768"]


@pytest.fixture(autouse=True)
def in_repository_root(monkeypatch):
    """The shipped configs name model directories relative to the repository root."""
    monkeypatch.chdir(ROOT)


def small(*overrides: str, config: str = "llama3_70b_repo.yaml", world: int = 32):
    """A shipped config (scaled down, unless it is small already) in a world of ``world``."""
    scaled = [] if config == "quickstart.yaml" else SMALL
    cfg = load_config(str(CONFIGS / config), [*scaled, *overrides])
    layout = layout_of(cfg, world)
    return cfg, layout, workload_of(cfg, layout)


def test_a_fake_rank_is_its_pipeline_stage_of_the_whole_world_and_leaves_nothing_behind():
    cfg, layout, _ = small(world=64)                     # TP 8 x PP 4 x DP 2
    from megatron.core import parallel_state as ps
    for stage in (0, 3):
        with fake_rank(cfg.parallel, layout.data, stage) as rank:
            assert rank == global_rank(cfg.parallel, 2, stage) == stage * 16
            assert dist.get_world_size() == 64
            assert (ps.get_pipeline_model_parallel_rank(), ps.get_tensor_model_parallel_rank(),
                    ps.get_data_parallel_rank(), ps.get_data_parallel_world_size()) == (stage, 0, 0, 2)
        assert not dist.is_initialized()


def test_measured_micro_batches_keep_as_many_in_flight():
    for layout in (Layout(8, 4, 2, 1, True, True), Layout(8, 8, None, 1, True, True)):
        m = measured_micro_batches(layout, 512)
        assert m == 2 * layout.pipeline and m % layout.pipeline == 0
        assert all(in_flight_micro_batches(r, layout.pipeline, layout.virtual, m)
                   == in_flight_micro_batches(r, layout.pipeline, layout.virtual, 512)
                   for r in range(layout.pipeline))
    assert measured_micro_batches(Layout(8, 4, None, 1, True, True), 3) == 3


@pytest.mark.parametrize("stage", [0, 3])
def test_weights_gradients_and_optimizer_are_megatrons_own_buffers(stage):
    cfg, layout, work = small(world=64)                  # DP 2 shards the optimizer
    with RankUnderMeasurement(cfg, layout, work, stage, micro_batches=4) as rank:
        rank.train_step()
        rank.tag_state()
        by_tag = rank.tracker.by_tag
        buffers = [b for ddp in rank.trainer.model for b in ddp.buffers]
        param_bytes = sum(b.param_data.numel() * b.param_data.element_size() for b in buffers)
        grad_bytes = sum(b.grad_data.numel() * b.grad_data.element_size() for b in buffers)
        optimizer = rank.trainer.optimizer
        shards = [p for opt in getattr(optimizer, "chained_optimizers", [optimizer])
                  for group in opt.shard_fp32_from_float16_groups for p in group]
        params = sum(p.numel() for chunk in rank.chunks for p in chunk.parameters())
        assert by_tag[WEIGHTS] == param_bytes >= 2 * params    # bf16, padded per bucket
        assert by_tag[GRADIENTS] == grad_bytes == 2 * param_bytes  # fp32
        # fp32 main parameters, Adam's m and v: DP rank 0's half of the buffers
        assert by_tag[OPTIMIZER] == 3 * 4 * sum(p.numel() for p in shards)
        assert sum(p.numel() for p in shards) == pytest.approx(params / 2, rel=1e-3)
    plan = stage_memory(cfg.architecture(), 64512, layout, work, stage, 80 * 2**30, 0)
    assert params == plan.params                             # the plan's parameter count


@pytest.mark.parametrize("config,overrides", [
    ("llama3_70b_repo.yaml", []),
    ("qwen25_72b_repo.yaml", []),                            # QKV bias, PP 8
    ("llama3_70b_repo.yaml", ["parallel.sequence_parallel=false"]),
    ("llama3_70b_repo.yaml", ["model.recompute_granularity=null"]),
    ("llama3_70b_repo.yaml", ["model.recompute_granularity=full"]),
    ("llama3_70b_repo.yaml", ["model.architecture_overrides.tie_word_embeddings=true",
                              "algorithm.micro_batch_size=2", "algorithm.kl_coef=0.1"]),
    # SmolLM2 in fp32 on one GPU: local spec, no recomputation, tied embeddings, 4 per batch
    ("quickstart.yaml", []),
], ids=["llama", "qwen", "no-sp", "no-recompute", "full-recompute", "tied-mbs2-kl",
        "quickstart-fp32-local"])
def test_the_plan_matches_the_measurement(config, overrides):
    world = {"qwen25_72b_repo.yaml": 64, "quickstart.yaml": 1}.get(config, 32)
    cfg, layout, work = small(*overrides, config=config, world=world)
    from repo_megatron.models.architecture import padded_vocab_size
    arch = cfg.architecture()
    vocab = padded_vocab_size(arch.vocab_size, cfg.model.make_vocab_size_divisible_by,
                              layout.tensor)
    for stage in (0, layout.pipeline - 1):
        measured = measure_stage(cfg, layout, work, stage)
        plan = stage_memory(arch, vocab, layout, work, stage, 80 * 2**30, 0)
        where = f"{measured.stage} of {config} {overrides}"
        assert measured.params == plan.params, where
        for item in ("weights", "gradients", "optimizer", "reference"):
            assert getattr(measured, item) == pytest.approx(getattr(plan, item), rel=0.01), \
                f"{item}, {where}"
        for item in ("activations", "logits", "backward", "weight_sync"):
            # within 10%, or within 1% of the peak for the small items
            planned = getattr(plan, item)
            assert abs(getattr(measured, item) - planned) <= max(0.1 * planned,
                                                                 0.01 * plan.trainer), \
                f"{item}: measured {getattr(measured, item)}, planned {planned}, {where}"
        assert measured.peak == pytest.approx(plan.trainer, rel=0.05), where


def _measured_json(capsys, name):
    assert main(["plan", str(CONFIGS / name), "--measure"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("measured, GiB") for line in out)  # the side-by-side table
    return json.loads(out[-1])


def test_llama3_70b_measured_peak_is_within_ten_percent_of_the_plan(capsys):
    summary = _measured_json(capsys, "llama3_70b_repo.yaml")
    assert 0.9 <= summary["ratio"] <= 1.1, summary
    assert summary["ratio"] == pytest.approx(
        summary["measured_peak_gib"] / summary["planned_peak_gib"], abs=1e-3)
    first = summary["stages"]["first stage"]
    assert first["peak_phase"] == "forward"
    for item, values in first["items"].items():
        if values["planned_gib"] >= 1:                         # every large item within 5%
            assert values["measured_gib"] == pytest.approx(values["planned_gib"], rel=0.05), item


@pytest.mark.slow
@pytest.mark.parametrize("name", ["qwen25_72b_repo.yaml", "llama3_70b_repo_colocated.yaml"])
def test_other_shipped_70b_configs_measured_peak_is_within_ten_percent(capsys, name):
    pytest.importorskip("sglang.srt.weight_sync.tensor_bucket")  # the colocated buckets
    summary = _measured_json(capsys, name)
    assert 0.9 <= summary["ratio"] <= 1.1, summary
