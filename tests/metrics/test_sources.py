"""Per-source rollout metrics equal the stage's own metrics of a run over that source alone."""

from dataclasses import replace

import pytest

from repo_megatron.metrics.sources import onpolicy_rollouts, source_metrics
from tests.rollout.fakes import is_rephrase_prompt, make_stage, prompt


def policy(text, rng):
    if is_rephrase_prompt(text):
        return "\\boxed{476}" if rng.random() < 0.7 else "\\boxed{0}"
    if "2 + 2" in text:
        return "\\boxed{4}" if rng.random() < 0.5 else "\\boxed{5}"
    return f"\\boxed{{{rng.randint(470, 480)}}}"


MATH = [replace(prompt(f"math:{i}", f"Compute ({i} + 45) * 7.", "476",
                       solution="\\boxed{476}"), source="math") for i in range(1, 5)]
EASY = [replace(prompt(f"easy:{i}", f"Compute 2 + 2, case {i}.", "4"), source="easy")
        for i in range(1, 4)]
PER_STEP_COUNTERS = {"engine_calls", "generated_tokens", "time_s", "rephrase_requests",
                     "rephrase_discarded"}


@pytest.mark.parametrize("options", [
    {"injection": "repo", "dynamic": {"enabled": True}},
    {"injection": "luffy"},
    {"injection": "repo", "replay": {"enabled": True, "min_buffer_size": 1}},
])
def test_per_source_metrics_equal_a_run_over_that_source_alone(options):
    mixed_stage, _ = make_stage(policy, **options)
    for step in (1, 2):                         # step 2: replay has samples to add
        mixed = mixed_stage.run(MATH + EASY, step=step)
    metrics = source_metrics(mixed.sampled, mixed.groups, ["math", "easy"], 0.5)
    for name, prompts in (("math", MATH), ("easy", EASY)):
        alone_stage, _ = make_stage(policy, **options)
        for step in (1, 2):
            alone = alone_stage.run(prompts, step=step)
        expected = {k.removeprefix("rollout/"): v for k, v in alone.metrics.items()
                    if k.removeprefix("rollout/") not in PER_STEP_COUNTERS}
        got = {k.removeprefix(f"rollout/{name}/"): v for k, v in metrics.items()
               if k.startswith(f"rollout/{name}/")}
        assert got == pytest.approx(expected), name


def test_onpolicy_rollouts_put_back_the_displaced_sample():
    stage, _ = make_stage(lambda text, rng: "\\boxed{476}" if is_rephrase_prompt(text)
                          else "\\boxed{1}")
    (group,) = stage.run(MATH[:1], step=1).groups
    assert group.injected_index is not None
    rollouts = onpolicy_rollouts(group)
    assert len(rollouts) == 4 and not any(s.is_rephrased for s in rollouts)
    assert group.replaced in rollouts


def test_a_source_without_groups_reports_zero_groups():
    stage, _ = make_stage(policy)
    batch = stage.run(EASY, step=1)
    metrics = source_metrics(batch.sampled, batch.groups, ["math", "easy"], 0.5)
    assert metrics["rollout/math/groups"] == 0.0
    assert not [k for k in metrics if k.startswith("rollout/math/") and k != "rollout/math/groups"]
    assert metrics["rollout/easy/groups"] == 3.0


def test_the_plot_has_a_panel_of_each_sources_reward():
    from repo_megatron.metrics.plot import metric_curves

    rows = [{"step": 1, "rollout/reward_onpolicy_mean": 0.5, "rollout/math/reward_onpolicy_mean":
             0.25, "rollout/easy/reward_onpolicy_mean": 1.0},
            {"step": 2, "rollout/reward_onpolicy_mean": 0.5, "rollout/easy/groups": 0.0,
             "rollout/math/reward_onpolicy_mean": 0.5}]
    curves = metric_curves(rows)
    assert curves["on-policy reward per source"] == {"easy": [(1, 1.0)],
                                                     "math": [(1, 0.25), (2, 0.5)]}
    assert curves["reward"] == {"reward_onpolicy_mean": [(1, 0.5), (2, 0.5)]}
