"""Dynamic sampling: zero-variance groups (after injection) are dropped and refilled."""

from repo_megatron.rollout.dynamic_sampling import has_reward_variance
from repo_megatron.rollout.types import Group, Prompt, Sample

from .fakes import is_rephrase_prompt, make_stage, prompt


def group(rewards, replay=()):
    samples = [Sample("p", (1,), [1], "", r, "", "stop") for r in rewards]
    samples += [Sample("p", (1,), [1], "", r, "", "stop", is_replay=True, is_offpolicy=True)
                for r in replay]
    return Group(Prompt("p", "q", "a", (1,)), samples)


def test_variance_ignores_replayed_samples():
    assert not has_reward_variance(group([0, 0, 0]))
    assert has_reward_variance(group([0, 1, 0]))
    assert not has_reward_variance(group([1, 1], replay=[0]))


def solve_if_easy(text, rng):
    if is_rephrase_prompt(text):
        return "\\boxed{476}"
    if "easy" in text:
        return "\\boxed{4}"                       # always right: zero variance
    if "mixed" in text:
        return "\\boxed{4}" if rng.random() < 0.5 else "\\boxed{0}"
    return "\\boxed{0}"                           # hard: always wrong


EASY = prompt("easy", "easy: 2 + 2", "4", solution="\\boxed{4}")
MIXED = prompt("mixed", "mixed: 2 + 2", "4")
HARD = prompt("hard", "hard: (23 + 45) * 7", "476", solution="\\boxed{476}")
HARD_NO_SOLUTION = prompt("hard2", "hard: (23 + 45) * 7 again", "476")


def test_zero_variance_groups_are_dropped_after_injection():
    stage, _ = make_stage(solve_if_easy, group_size=8, dynamic={"enabled": True})
    batch = stage.run([EASY, MIXED, HARD, HARD_NO_SOLUTION], step=0)
    # HARD failed everywhere, but the injected rephrase gives it variance: kept
    assert [g.prompt.uid for g in batch.groups] == ["mixed", "hard"]
    assert batch.metrics["rollout/zero_variance_share"] == 0.5
    assert batch.metrics["rollout/groups"] == 4 and batch.metrics["rollout/groups_kept"] == 2


def test_dropped_groups_are_refilled_by_oversampling():
    stage, _ = make_stage(solve_if_easy, group_size=8,
                          dynamic={"enabled": True, "max_oversample_rounds": 2})
    pool = iter([prompt(f"m{i}", f"mixed: 2 + 2 #{i}", "4") for i in range(10)])
    asked = []

    def refill(n):
        asked.append(n)
        return [next(pool) for _ in range(n)]

    batch = stage.run([EASY, MIXED, HARD_NO_SOLUTION], step=0, refill=refill)
    assert asked == [2]
    assert [g.prompt.uid for g in batch.groups] == ["mixed", "m0", "m1"]


def test_oversampling_stops_after_max_rounds():
    stage, _ = make_stage(solve_if_easy, group_size=4,
                          dynamic={"enabled": True, "max_oversample_rounds": 1})
    asked = []
    batch = stage.run([EASY], step=0, refill=lambda n: asked.append(n) or [EASY])
    assert asked == [1] and batch.groups == []
    assert batch.metrics["rollout/groups"] == 2


def test_without_dynamic_sampling_every_group_is_kept():
    stage, _ = make_stage(solve_if_easy)
    assert len(stage.run([EASY, HARD_NO_SOLUTION], step=0).groups) == 2
