"""Reading a judge's verdict: the strict last line first, a fallback after, failures named."""

import pytest

from repo_megatron.rewards.judge_verdict import parse_score, parse_verdict, parse_yes_no


@pytest.mark.parametrize("answer, value", [
    ("The response computes 12 * 3 = 36, as the reference does.\nVerdict: yes", 1.0),
    ("It drops the minus sign.\n\nVerdict: no", 0.0),
    ("**Verdict:** **Yes**", 1.0),
    ("final verdict = incorrect.", 0.0),
    ("<think>maybe the verdict is no</think>\nVerdict: yes", 1.0),
])
def test_strict_yes_no_verdicts_are_read_from_the_last_line(answer, value):
    verdict = parse_yes_no(answer)
    assert verdict.value == value
    assert "(strict)" in verdict.reason


def test_yes_no_fallback_takes_the_last_yes_no_word_and_says_so():
    verdict = parse_yes_no("The final answer 36 matches the reference. So: yes, it is right.")
    assert verdict.value == 1.0 and "fallback" in verdict.reason
    assert parse_yes_no("Verdict: yes\nActually, no.").value == 0.0   # not the last line


def test_reasoning_in_think_blocks_is_never_read():
    verdict = parse_yes_no("<think>yes yes yes</think>I cannot tell.")
    assert not verdict.ok
    assert "no verdict" in verdict.reason and "I cannot tell." in verdict.reason


@pytest.mark.parametrize("answer, value", [
    ("Mostly right.\nScore: 7", 0.7),
    ("Score: 7/10.", 0.7),
    ("Score: 3 / 4", 0.75),
    ("**Score**: 10", 1.0),
])
def test_strict_scores_are_scaled_by_max_score(answer, value):
    verdict = parse_score(answer, max_score=10)
    assert verdict.value == pytest.approx(value) and "(strict)" in verdict.reason


def test_a_strict_score_outside_the_scale_fails_rather_than_clipping():
    verdict = parse_score("Score: 11", max_score=10)
    assert not verdict.ok and "outside 0..10" in verdict.reason


def test_score_fallback_skips_numbers_outside_the_scale():
    verdict = parse_score("The answer 476 is right; I rate it 9/10 (it never says 476.5).", 10)
    assert verdict.value == pytest.approx(0.9) and "fallback" in verdict.reason
    assert not parse_score("It says 476.", 10).ok


def test_parse_verdict_dispatches_on_kind():
    assert parse_verdict("Verdict: yes", "yes_no").value == 1.0
    assert parse_verdict("Score: 2", "score", max_score=4).value == 0.5
