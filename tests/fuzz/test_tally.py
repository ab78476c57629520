import pytest

from tests.fuzz.tally import CLEAN_ERROR, OK, SERVER_ERROR, Tally


def test_tally_passes_only_clean_outcomes():
    tally = Tally("demo")
    tally.record("a", OK)
    tally.record("b", CLEAN_ERROR)
    tally.check(min_cases=2)
    tally.record("c", SERVER_ERROR, "500 from /generate")
    with pytest.raises(AssertionError, match="1 failing cases of 3"):
        tally.check()


def test_tally_fails_when_too_few_cases_ran():
    with pytest.raises(AssertionError, match="only 0 cases"):
        Tally("empty").check(min_cases=1)
