"""One full RePO rollout step on a real transformers model through the embedded engine.

CI: a tiny random Llama (it never solves anything, so injection is forced by switching
verification off). ``-m slow``: SmolLM2-135M-Instruct on "(a + b) * c" problems, where the gate
fires and verified rephrases get injected.
"""

import json
import os
import time

import pytest

from repo_megatron.config.algorithm import AlgorithmConfig, RePOConfig
from repo_megatron.config.data import DataConfig
from repo_megatron.config.rollout import RolloutConfig
from repo_megatron.data import ChatFormatter, load_prompts
from repo_megatron.rewards import RewardRunner
from repo_megatron.rollout import RolloutStage

TRAIN = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "data", "arith_train.jsonl")


@pytest.fixture(scope="module")
def math_rewards():
    with RewardRunner("math", timeout_s=10.0, num_workers=2) as runner:
        yield runner


def level1_prompts(formatter, n):
    """The first ``n`` "Compute (a + b) * c" prompts of the shipped training set."""
    with open(TRAIN) as f:
        rows = {f"arith_train:{i + 1}": json.loads(line) for i, line in enumerate(f)}
    prompts = load_prompts(DataConfig(path=TRAIN), formatter)
    return [p for p in prompts if rows[p.uid]["level"] == 1][:n]


def run_step(engine, formatter, rewards, *, group_size, max_new_tokens, schedule="lazy",
             require_verified=True, attempts=1, n_prompts=2, temperature=1.0):
    stage = RolloutStage(
        engine, formatter, rewards,
        RolloutConfig(group_size=group_size, max_new_tokens=max_new_tokens,
                      temperature=temperature),
        AlgorithmConfig(injection="repo", repo=RePOConfig(
            schedule=schedule, require_verified=require_verified,
            num_rephrase_attempts=attempts)), seed=1234)
    return stage.run(level1_prompts(formatter, n_prompts), step=0)


def test_repo_step_on_a_tiny_random_llama(tiny_engine, smollm2_tokenizer, math_rewards):
    formatter = ChatFormatter(smollm2_tokenizer)
    lazy = run_step(tiny_engine, formatter, math_rewards, group_size=3, max_new_tokens=6,
                    require_verified=False)
    assert len(lazy.groups) == 2
    for group in lazy.groups:
        assert group.gate_fired and group.injected_index == 0      # nothing solved: slot 0
        injected = group.samples[0]
        assert injected.is_rephrased and injected.behaviour_logprobs is None
        assert injected.prompt_ids == group.prompt.prompt_ids
        rollouts = group.samples[1:]
        assert all(len(s.behaviour_logprobs) == len(s.response_ids) for s in rollouts)
        assert all(s.weight_version == 0 for s in group.samples)
    assert lazy.metrics["rollout/gate_rate"] == 1.0
    assert lazy.metrics["rollout/injection_rate"] == 1.0
    for schedule in ("eager", "overlap"):  # the same groups whatever the schedule
        other = run_step(tiny_engine, formatter, math_rewards, group_size=3, max_new_tokens=6,
                         require_verified=False, schedule=schedule)
        assert [[s.response_ids for s in g.samples] for g in other.groups] == \
            [[s.response_ids for s in g.samples] for g in lazy.groups], schedule


@pytest.mark.slow
@pytest.mark.timeout(3600)   # minutes on 2 idle cores; much longer when the cores are shared
def test_repo_step_on_smollm2_injects_verified_rephrases(smollm2_tokenizer, math_rewards):
    from repo_megatron.engines.embedded import HFEngine, load_hf_model

    t0 = time.perf_counter()
    engine = HFEngine(load_hf_model(None, "smollm2"), smollm2_tokenizer, batch_size=32)
    load_s = time.perf_counter() - t0
    formatter = ChatFormatter(smollm2_tokenizer)
    t0 = time.perf_counter()
    batch = run_step(engine, formatter, math_rewards, group_size=4, max_new_tokens=160,
                     attempts=3, n_prompts=8, temperature=0.7)
    step_s = time.perf_counter() - t0
    m = batch.metrics
    print(f"\nSmolLM2-135M-Instruct, 8 prompts '(a + b) * c', G=4, T=0.7, 3 rephrase attempts, "
          f"lazy; model load {load_s:.1f} s, step {step_s:.1f} s")
    for key in sorted(m):
        print(f"  {key} = {m[key]:.4g}")
    for group in batch.groups:
        if group.injected_index is not None:
            print(f"--- injected for {group.prompt.question!r} (answer {group.prompt.answer}):\n"
                  f"{group.samples[group.injected_index].response_text}")
            break
    assert m["rollout/gate_rate"] > 0
    assert m["rollout/injection_rate"] > 0
    injected = [g.samples[g.injected_index] for g in batch.groups if g.injected_index is not None]
    assert all(s.is_rephrased and s.reward >= 0.5 and s.behaviour_logprobs is None
               for s in injected)
