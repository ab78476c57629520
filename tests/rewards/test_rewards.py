"""Built-in rewards, the registry, custom rewards by import path."""

import pytest

from repo_megatron.errors import ConfigError
from repo_megatron.rewards import RewardRequest, RewardResult, resolve_reward
from repo_megatron.rewards.base import call_reward
from repo_megatron.rewards.exact import last_boxed


def score(name, response, answer):
    return call_reward(resolve_reward(name), RewardRequest(response, answer, "q"))


@pytest.mark.parametrize("response,value", [
    ("68 * 7 = 476, so the answer is \\boxed{476}.", 1.0),
    ("The result is 476", 1.0),
    ("\\boxed{\\frac{952}{2}}", 1.0),
    ("\\boxed{475}", 0.0),
    ("I don't know", 0.0),
])
def test_math_reward_compares_the_final_answer(response, value):
    result = score("math", response, "476")
    assert result.value == value and not result.failed and result.reason


def test_math_reward_reasons():
    assert score("math", "\\boxed{475}", "476").reason == "wrong: got 475, expected 476"
    assert score("math", "no idea", "476").reason == "no final answer found"
    assert score("math", "\\boxed{476}", "476").reason == "correct: 476"


def test_math_reward_reads_latex_references():
    assert score("math", "so x = 0.5", "\\frac{1}{2}").value == 1.0


def test_exact_reward_uses_the_last_boxed_answer_else_the_last_line():
    assert score("exact", "\\boxed{3} no, \\boxed{ 4 }", "4").value == 1.0
    assert score("exact", "thinking\n4.\n", "4").value == 1.0
    result = score("exact", "\\boxed{5}", "4")
    assert result.value == 0.0 and result.reason == "\\boxed{} '5' != '4'"


def test_last_boxed_handles_nested_braces():
    assert last_boxed("\\boxed{1} then \\boxed{\\frac{1}{2}}") == "\\frac{1}{2}"
    assert last_boxed("\\boxed{unclosed") is None and last_boxed("none") is None


def test_custom_reward_by_import_path():
    result = score("tests.rewards.misbehaving:by_cue", "4", "4")
    assert result == RewardResult(1.0, "compared '4' with '4'")


def test_a_raising_reward_fails_the_sample_with_the_reason():
    result = score("tests.rewards.misbehaving:by_cue", "raise", "4")
    assert result == RewardResult(0.0, "reward raised ValueError: cannot grade", failed=True)


def test_a_reward_returning_nonsense_fails_the_sample():
    result = score("tests.rewards.misbehaving:bad_return", "4", "4")
    assert result.failed and "must return a number" in result.reason


@pytest.mark.parametrize("name,message", [
    ("nope", "not a registered reward"),
    ("tests.rewards.nothere:fn", "cannot import"),
    ("tests.rewards.misbehaving:missing", "cannot import"),
    ("tests.rewards.misbehaving:NOT_CALLABLE", "not callable"),
])
def test_unknown_rewards_are_config_errors(name, message):
    with pytest.raises(ConfigError, match=rf"data.reward={name}: .*{message}"):
        resolve_reward(name)
