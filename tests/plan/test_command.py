"""``repo-megatron plan``: the shipped 70B configs fit 80 GB GPUs, impossible layouts are
rejected with the numbers, and the config is read the way the trainer reads it."""

import pathlib

import pytest

from repo_megatron.cli import main
from repo_megatron.config import load_config
from repo_megatron.plan.command import layout_of, workload_of

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "examples" / "configs"


@pytest.fixture(autouse=True)
def in_repository_root(monkeypatch):
    """The shipped configs name model directories relative to the repository root."""
    monkeypatch.chdir(ROOT)


@pytest.mark.parametrize("name,args", [
    ("llama3_70b_repo.yaml", ["--nodes", "4"]),
    ("qwen25_72b_repo.yaml", ["--nodes", "8"]),
    ("llama3_70b_repo_colocated.yaml", ["--nodes", "8"]),
])
def test_shipped_70b_configs_fit_80gb_gpus(name, args, capsys):
    assert main(["plan", str(CONFIGS / name), "--gpu-memory-gb", "80", *args]) == 0
    verdict = capsys.readouterr().out.strip().splitlines()[-1]
    assert verdict.startswith("fits: peak"), verdict


def test_70b_at_tp1_pp1_is_rejected_with_the_numbers(capsys):
    code = main(["plan", str(CONFIGS / "llama3_70b_repo.yaml"),
                 "parallel.tensor_model_parallel_size=1", "parallel.pipeline_model_parallel_size=1",
                 "parallel.virtual_pipeline_model_parallel_size=null",
                 "parallel.sequence_parallel=false"])
    captured = capsys.readouterr()
    assert code == 2
    assert "total of 80 GiB" in captured.out  # the table is printed before the verdict
    (line,) = captured.err.strip().splitlines()
    assert line.startswith(
        f"ConfigError: {CONFIGS / 'llama3_70b_repo.yaml'}: parallel layout TP=1 x PP=1 x DP=8 "
        "does not fit: the single stage needs 590.6 GiB per GPU (weights 131.4, gradients "
        "262.8, optimizer 98.6, step (activations, logits, temporaries) 92.8 GiB, plus 5.0 "
        "reserve) but a GPU has 80 GiB; raise parallel.tensor_model_parallel_size or "
        "parallel.pipeline_model_parallel_size")


def test_kv_heads_not_divisible_by_tp_is_rejected(capsys):
    code = main(["plan", str(CONFIGS / "qwen25_72b_repo.yaml"),
                 "parallel.tensor_model_parallel_size=16"])
    assert code == 2
    assert "parallel.tensor_model_parallel_size=16 does not divide model.num_query_groups=8" \
        in capsys.readouterr().err


def test_node_count_must_hold_whole_replicas(capsys):
    assert main(["plan", str(CONFIGS / "llama3_70b_repo.yaml"), "--nodes", "6"]) == 2
    assert "= 32 does not divide the world size 48" in capsys.readouterr().err


def test_colocated_plan_counts_the_servers_memory_fraction(capsys):
    for args, fraction in (([], 0.35), (["--sglang-mem-fraction", "0.3"], 0.3),
                           (["rollout.sglang.launch.args=[--mem-fraction-static=0.25]"], 0.25)):
        assert main(["plan", str(CONFIGS / "llama3_70b_repo_colocated.yaml"), *args]) == 0
        out = capsys.readouterr().out
        weights, kv = (float(line.split()[-1]) for line in out.splitlines()
                       if line.startswith(("SGLang weights", "SGLang KV cache")))
        assert weights + kv == pytest.approx(fraction * 80, abs=0.02)


def test_tensor_weight_sync_needs_the_sglang_memory_fraction(capsys):
    assert main(["plan", str(CONFIGS / "llama3_70b_repo_colocated.yaml"),
                 "rollout.sglang.launch.args=[]"]) == 2
    assert "set --mem-fraction-static in rollout.sglang.launch.args" in capsys.readouterr().err


def test_fp8_delayed_with_bf16_layers_is_rejected_before_megatron(capsys):
    code = main(["plan", str(CONFIGS / "llama3_70b_repo.yaml"), "model.fp8=e4m3",
                 "model.fp8_recipe=delayed", "model.num_layers_at_start_in_bf16=1"])
    assert code == 2
    assert "model.fp8_recipe=delayed cannot keep layers in bf16" in capsys.readouterr().err


def test_workload_sequence_is_prompt_plus_response_padded_for_fp8():
    cfg = load_config(str(CONFIGS / "llama3_70b_repo.yaml"),
                      ["rollout.max_new_tokens=3000", "model.fp8=e4m3"])
    layout = layout_of(cfg, world_size=64)
    work = workload_of(cfg, layout)
    # 1024 + 3000 = 4024, padded to a multiple of 16 x TP 8 (sequence parallel) = 4096.
    assert work.seq_length == 4096
    # 64 prompts x 8 responses over micro-batch 1 x DP 2
    assert (layout.data, work.num_micro_batches) == (2, 256)


def test_colocated_plan_shows_the_memory_of_each_phase(capsys):
    assert main(["plan", str(CONFIGS / "llama3_70b_repo_colocated.yaml")]) == 0
    out = capsys.readouterr().out
    table = out.split("per GPU, GiB")[1].splitlines()[1:]
    rows = {line.split(" (")[0]: [float(v) for v in line.split()[-2:]]
            for line in table if line.endswith(tuple("0123456789"))}
    assert rows["rollout phase"] == [pytest.approx(a + b + c, abs=0.02) for a, b, c in zip(
        rows["SGLang weights"], rows["SGLang KV cache"], rows["reserve"])]
    assert "trainer offloaded" in out and "SGLang released" in out
    assert "SGLang --mem-fraction-static can go up to 0.94 (now 0.35)" in out
    assert rows["total of 80 GiB"] == [max(p) for p in zip(
        rows["rollout phase"], rows["train phase"], rows["sync phase"])]


def test_workload_of_a_token_budget_is_its_worst_micro_batch():
    path = str(CONFIGS / "llama3_70b_repo.yaml")
    over = ["rollout.max_new_tokens=3000", "algorithm.max_tokens_per_microbatch=9000"]
    layout = layout_of(load_config(path, over), world_size=64)
    work = workload_of(load_config(path, over), layout)
    # 4024-token sequences: two fit 9000 positions; 512 of them over DP 2 in pairs
    assert (work.seq_length, work.micro_batch_size, work.num_micro_batches) == (4024, 2, 128)
    packed = workload_of(load_config(path, [*over, "algorithm.sequence_packing=true"]), layout)
    assert (packed.seq_length, packed.micro_batch_size, packed.num_micro_batches) == (9000, 1, 256)
