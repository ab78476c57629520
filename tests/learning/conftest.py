"""Warmed-up testbed policies, built once per test session (CI starts cold: this is part of the
learning tests' measured time)."""

import os
import time

import pytest

from repo_megatron.data.synthetic import write_jsonl
from repo_megatron.testbed import tasks
from repo_megatron.testbed.warmup import WarmupRecipe, warm_policy

# The learning test's starting policy: answers 30% of sums right, slips a trailing zero
# otherwise (its on-policy success at T=1 starts in the 10-60% band; measured ~0.3).
SUMS_RECIPE = WarmupRecipe(mixture={"sum": 1.0}, steps=300, batch_size=32, lr=3e-3,
                           correct_share=0.3, seed=0)


@pytest.fixture(scope="session")
def sums_policy(tmp_path_factory):
    """``(model_dir, prompts_path, warm-up seconds)``: the sums policy and every sum as a
    prompt file."""
    root = tmp_path_factory.mktemp("sums_policy")
    start = time.perf_counter()
    model_dir = warm_policy(str(root / "model"), SUMS_RECIPE)
    prompts = os.path.join(root, "sums.jsonl")
    write_jsonl(prompts, tasks.all_sums(), "sum")
    return model_dir, prompts, time.perf_counter() - start
