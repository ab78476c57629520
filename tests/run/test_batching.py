"""The batch planner (run/batching.py): token-budget micro-batches are a real bound on what a
micro-batch computes, hold every sequence once, give every DP rank the same number of
micro-batches and about the same tokens; the fixed plan is the rollout-order layout."""

import dataclasses
import random

import pytest

from repo_megatron.config.algorithm import AlgorithmConfig
from repo_megatron.errors import ConfigError
from repo_megatron.run.batching import (balance_by_tokens, fixed_plan, plan_metrics,
                                        plan_micro_batches, row_length, token_budget_plan)


def long_tailed(n=200, seed=0):
    """Mostly short sequences, a few up to 2048 tokens (a truncated Pareto law)."""
    rng = random.Random(seed)
    return [min(2048, int(16 / (1 - rng.random() * (1 - 16 / 2048)) ** 2)) for _ in range(n)]


def check_plan(plan, lengths, max_tokens, multiple=1):
    """Every sequence exactly once; a micro-batch's shape holds its sequences; same count on
    every rank."""
    seen = sorted(i for rank in plan for p in rank for i in p.sequences)
    assert seen == list(range(len(lengths)))
    assert len({len(rank) for rank in plan}) == 1
    for rank in plan:
        for p in rank:
            own = [lengths[i] for i in p.sequences]
            assert p.length % multiple == 0
            if p.packed:
                assert p.rows == 1 and p.length >= sum(own)
            else:
                assert p.rows >= len(own) and p.length >= max(own, default=0)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("multiple,equal_shapes", [(1, False), (8, False), (1, True)])
def test_token_budget_micro_batches_never_exceed_the_budget_on_a_long_tailed_batch(
        packed, multiple, equal_shapes):
    lengths = long_tailed()
    assert max(lengths) == 2048 and sorted(lengths)[len(lengths) // 2] < 100  # long-tailed
    budget = 4096
    plan = token_budget_plan(lengths, 4, budget, multiple=multiple, packed=packed,
                             multiple_of=2, equal_shapes=equal_shapes)
    check_plan(plan, lengths, budget, multiple)
    assert max(p.tokens for rank in plan for p in rank) <= budget
    assert len(plan[0]) % 2 == 0                      # the interleaved schedule's multiple
    if equal_shapes:
        assert all(len({(p.rows, p.length) for p in rank}) == 1 for rank in plan)


def test_token_budget_cuts_padding_and_balances_ranks_where_fixed_does_not():
    lengths = long_tailed(256, seed=1)
    fixed = plan_metrics([fixed_plan(lengths, 4, 4)], [lengths])
    budget = plan_metrics([token_budget_plan(lengths, 4, 4 * 2048)], [lengths])
    packed = plan_metrics([token_budget_plan(lengths, 4, 4 * 2048, packed=True)], [lengths])
    assert fixed["padding_share"] > 0.3 and fixed["dp_imbalance"] > 1.1
    assert budget["padding_share"] < 0.1 and budget["dp_imbalance"] < 1.05
    assert packed["padding_share"] < 0.01 and packed["dp_imbalance"] < 1.05


def test_token_budget_runs_a_sequence_longer_than_the_budget_alone_or_stops_when_strict():
    lengths = [10, 300, 20, 30]
    plan = token_budget_plan(lengths, 1, 100)
    check_plan(plan, lengths, 100)
    alone = [p for p in plan[0] if 1 in p.sequences]
    assert [p.sequences for p in alone] == [(1,)] and alone[0].tokens == 300
    assert all(p.tokens <= 100 for p in plan[0] if 1 not in p.sequences)
    with pytest.raises(ConfigError, match="algorithm.max_tokens_per_microbatch=100: sequence 1 "
                                          "of the step has 300 tokens"):
        token_budget_plan(lengths, 1, 100, strict=True)


def test_token_budget_padding_of_the_length_multiple_counts_against_the_budget():
    # 3 x 30 = 90 real positions, but each row pads to 32: 96 > 90 must not share one budget
    plan = token_budget_plan([30, 30, 30], 1, 90, multiple=32, overhead=0)
    assert all(p.tokens <= 90 or len(p.sequences) == 1 for p in plan[0])
    assert row_length([30], 32, False) == 32 and row_length([30, 30], 32, True) == 64


def test_token_budget_plan_gives_idle_ranks_empty_micro_batches_of_one_padding_row():
    plan = token_budget_plan([50, 40], 4, 100)
    check_plan(plan, [50, 40], 100)
    empty = [p for rank in plan for p in rank if not p.sequences]
    assert len(empty) == 2 and all(p.rows == 1 and p.length == 2 for p in empty)


def test_balance_by_tokens_is_the_differencing_partition_and_deterministic():
    # The textbook case: differencing leaves 2 (8-7, 6-5, 4-1, 3-1) where 15 / 15 exists
    lengths = [8, 7, 6, 5, 4]
    sets = balance_by_tokens(lengths, 2)
    assert sorted(sum(lengths[i] for i in s) for s in sets) == [14, 16]
    assert sorted(i for s in sets for i in s) == list(range(5))
    assert balance_by_tokens(lengths, 2) == sets
    assert balance_by_tokens([], 3) == [[], [], []]


def test_the_algorithm_section_selects_the_plan():
    lengths = [5, 9, 3, 7, 2]
    alg = AlgorithmConfig(micro_batch_size=2)
    assert plan_micro_batches(lengths, 1, alg) == fixed_plan(lengths, 1, 2)
    budget = dataclasses.replace(alg, max_tokens_per_microbatch=16, sequence_packing=True)
    plan = plan_micro_batches(lengths, 1, budget)
    assert plan == token_budget_plan(lengths, 1, 16, packed=True)
    assert all(p.packed and p.tokens <= 16 for p in plan[0])
