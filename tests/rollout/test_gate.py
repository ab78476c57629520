"""The gate and injection rules (pure functions)."""

import pytest

from repo_megatron.config.algorithm import DEFAULT_META_PATTERNS
from repo_megatron.rollout.gate import (best_candidate, failure_rate, gate_fires,
                                        lowest_reward_index, rephrase_prompt, replace_lowest,
                                        strip_meta)
from repo_megatron.rollout.types import Group, Prompt, Sample


def sample(reward, text="x", **flags):
    return Sample("p", (1,), [1, 2], text, reward, "", "stop", **flags)


def test_failure_rate_counts_rewards_below_delta():
    assert failure_rate([0, 0.5, 1, 0.49], reward_threshold=0.5) == 0.5


@pytest.mark.parametrize("rewards,rho,fires", [
    ([0, 0, 0, 0], 1.0, True),      # gamma = 1 >= 1
    ([0, 0, 0, 1], 1.0, False),     # gamma = 0.75 < 1
    ([0, 0, 0, 1], 0.75, True),     # gamma == rho fires
    ([0, 0, 1, 1], 0.75, False),
    ([1, 1, 1, 1], 0.0, True),      # rho = 0: every group with a solution
])
def test_gate_fires_exactly_when_failure_rate_reaches_rho(rewards, rho, fires):
    assert gate_fires(rewards, 0.5, rho, has_solution=True) is fires


def test_gate_never_fires_without_a_solution():
    assert not gate_fires([0, 0, 0, 0], 0.5, 0.0, has_solution=False)


def test_lowest_reward_index_breaks_ties_by_first_slot():
    assert lowest_reward_index([1, 0, 0.5, 0]) == 1
    assert lowest_reward_index([0.2, 0.2, 0.2]) == 0
    assert lowest_reward_index([1, 1, -1]) == 2


def test_replace_lowest_swaps_in_the_injected_sample_and_keeps_the_displaced_one():
    group = Group(Prompt("p", "q", "a", (1,)), [sample(1.0), sample(0.0), sample(0.0)])
    injected = sample(1.0, is_rephrased=True)
    out = replace_lowest(group, injected)
    assert out.samples[1] is injected and out.injected_index == 1
    assert out.replaced is group.samples[1]
    assert group.injected_index is None          # the input group is untouched


def test_best_candidate_takes_highest_reward_then_first():
    a, b, c = sample(0.0), sample(1.0), sample(1.0)
    assert best_candidate([a, b, c]) is b
    assert best_candidate([]) is None


def test_strip_meta_removes_references_to_the_solution_and_preambles():
    text = ("Sure! Let me solve it.\n"
            "As shown in the reference solution, 23 + 45 = 68.\n"
            "According to the expert's solution, 68 * 7 = 476.\n"
            "The answer is \\boxed{476}.")
    assert strip_meta(text, DEFAULT_META_PATTERNS) == \
        "23 + 45 = 68.\n68 * 7 = 476.\nThe answer is \\boxed{476}."


def test_strip_meta_returns_clean_text_unchanged():
    text = "  68 * 7 = 476\n\n\n\\boxed{476} "
    assert strip_meta(text, DEFAULT_META_PATTERNS) is text


def test_rephrase_prompt_keeps_braces_in_the_solution():
    template = "Problem: {question}\nReference solution: {solution}"
    assert rephrase_prompt(template, "q {solution}", "\\boxed{4}") == \
        "Problem: q {solution}\nReference solution: \\boxed{4}"


def test_strip_meta_drops_lines_that_still_talk_about_the_reference():
    # a SmolLM2-135M rephrase, as measured
    text = ("I'll provide a reference that demonstrates the calculation of (37 + 74) * 4.\n"
            "Let's break down the steps:\n"
            "1. Add the numbers in parentheses: 37 + 74 = 111.\n"
            "2. Multiply the result by 4: 111 * 4 = 444.\n\n"
            "I will not mention the reference in my answer, so to speak.\n")
    assert strip_meta(text, DEFAULT_META_PATTERNS) == (
        "Let's break down the steps:\n"
        "1. Add the numbers in parentheses: 37 + 74 = 111.\n"
        "2. Multiply the result by 4: 111 * 4 = 444.")
