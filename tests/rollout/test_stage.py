"""The RePO stage over a scripted engine: gate, rephrase, verify, inject, schedules, metrics."""

import random

import pytest

from .fakes import FORMATTER, StreamingEngine, is_rephrase_prompt, make_stage, prompt

HARD = prompt("hard", "Compute (23 + 45) * 7.", "476",
              solution="23 + 45 = 68. 68 * 7 = 476. \\boxed{476}")
EASY = prompt("easy", "Compute 2 + 2.", "4", solution="2 + 2 = 4. \\boxed{4}")
NO_SOLUTION = prompt("nosol", "Compute 9 * 9.", "81")


def fails_then_rephrases_with_meta(text, rng):
    """Rollouts of hard prompts fail; rephrases are right but mention the reference."""
    if is_rephrase_prompt(text):
        return "As shown in the reference solution, 68 * 7 = 476.\n\\boxed{476}"
    if "2 + 2" in text:
        return "\\boxed{4}" if rng.random() < 0.5 else "\\boxed{5}"
    return f"\\boxed{{{rng.randint(0, 9)}}}"


def test_fired_gate_injects_the_verified_rephrase_into_the_lowest_slot():
    stage, _ = make_stage(fails_then_rephrases_with_meta)
    (group,) = stage.run([HARD], step=0).groups
    assert group.failure_rate == 1.0 and group.gate_fired
    assert group.injected_index == 0             # all rewards 0: the first slot
    injected = group.samples[0]
    assert injected.is_rephrased and not injected.is_offpolicy
    assert injected.reward == 1.0
    assert group.replaced.reward == 0.0 and not group.replaced.is_rephrased
    assert [s.is_rephrased for s in group.samples] == [True, False, False, False]


def test_injected_rephrase_is_a_response_to_the_original_prompt_without_engine_logprobs():
    stage, _ = make_stage(fails_then_rephrases_with_meta)
    (group,) = stage.run([HARD], step=0).groups
    injected = group.samples[group.injected_index]
    assert injected.prompt_ids == HARD.prompt_ids
    assert injected.behaviour_logprobs is None and not injected.logprobs_valid
    assert all(s.logprobs_valid for s in group.samples if not s.is_rephrased)


def test_meta_text_is_stripped_and_the_response_re_encoded():
    stage, _ = make_stage(fails_then_rephrases_with_meta)
    (group,) = stage.run([HARD], step=0).groups
    injected = group.samples[group.injected_index]
    assert injected.response_text == "68 * 7 = 476.\n\\boxed{476}"
    assert injected.response_ids == FORMATTER.response_ids(injected.response_text, eos=True)
    assert len(injected.loss_mask) == len(injected.response_ids)


def test_unverified_rephrase_is_not_injected():
    stage, _ = make_stage(lambda text, rng: "\\boxed{1}")    # everything wrong
    (group,) = stage.run([HARD], step=0).groups
    assert group.gate_fired and group.injected_index is None
    assert len(group.rephrases) == 1 and group.rephrases[0].reward == 0.0
    assert not any(s.is_rephrased for s in group.samples)


def test_unverified_rephrase_is_injected_when_verification_is_off():
    stage, _ = make_stage(lambda text, rng: "\\boxed{1}", repo={"require_verified": False})
    (group,) = stage.run([HARD], step=0).groups
    assert group.injected_index == 0 and group.samples[0].is_rephrased


def test_first_verified_of_several_attempts_is_injected():
    def second_attempt_right(text, rng):
        return "\\boxed{476}" if is_rephrase_prompt(text) and rng.random() < 0.5 else "\\boxed{0}"
    stage, _ = make_stage(second_attempt_right, repo={"num_rephrase_attempts": 6})
    (group,) = stage.run([HARD], step=0).groups
    rewards = [s.reward for s in group.rephrases]
    assert len(rewards) == 6 and 1.0 in rewards
    assert group.samples[group.injected_index] is group.rephrases[rewards.index(1.0)]


def test_gate_stays_shut_when_the_group_solves_the_problem():
    stage, engine = make_stage(lambda text, rng: "\\boxed{4}")
    batch = stage.run([EASY], step=0)
    (group,) = batch.groups
    assert not group.gate_fired and group.rephrases == [] and group.injected_index is None
    assert len(engine.calls) == 1                # lazy: no rephrase round trip
    assert batch.metrics["rollout/gate_rate"] == 0.0


def test_no_rephrase_without_a_solution():
    stage, engine = make_stage(lambda text, rng: "\\boxed{0}", repo={"schedule": "eager"})
    (group,) = stage.run([NO_SOLUTION], step=0).groups
    assert group.failure_rate == 1.0 and not group.gate_fired
    assert not any(is_rephrase_prompt(t) for call in engine.calls for t in call)


def groups_signature(groups):
    return [(g.prompt.uid, g.failure_rate, g.gate_fired, g.injected_index,
             [(s.response_ids, s.reward, s.is_rephrased, s.behaviour_logprobs) for s in g.samples],
             [s.response_ids for s in g.rephrases]) for g in groups]


def random_script(text, rng):
    """Right with probability 1/4 for rollouts, 1/2 for rephrases, text varies by seed."""
    right = rng.random() < (0.5 if is_rephrase_prompt(text) else 0.25)
    answer = "476" if "23 + 45" in text else "4" if "2 + 2" in text else "81"
    return f"step {rng.randint(0, 999)}: \\boxed{{{answer if right else 'x'}}}"


MANY = [HARD, EASY, NO_SOLUTION] + [
    prompt(f"h{i}", f"Compute (23 + 45) * 7. #{i}", "476", solution="\\boxed{476}")
    for i in range(5)]
SCHEDULE_OPTIONS = {"group_size": 4,
                    "repo": {"failure_rate_threshold": 0.75, "num_rephrase_attempts": 2}}


def run_schedule(schedule, engine=None, step=3):
    stage, engine = make_stage(random_script, engine=engine, **{**SCHEDULE_OPTIONS, "repo": {
        **SCHEDULE_OPTIONS["repo"], "schedule": schedule}})
    return stage.run(MANY, step=step), engine


def test_eager_lazy_overlap_and_auto_give_the_same_groups_under_a_fixed_seed():
    lazy, _ = run_schedule("lazy")
    eager, _ = run_schedule("eager")
    overlap, _ = run_schedule("overlap")
    auto, _ = run_schedule("auto")
    assert groups_signature(lazy.groups) == groups_signature(eager.groups)
    assert groups_signature(lazy.groups) == groups_signature(overlap.groups)
    assert groups_signature(lazy.groups) == groups_signature(auto.groups)
    assert any(g.injected_index is not None for g in lazy.groups)     # the test means something
    assert any(g.gate_fired for g in lazy.groups) and not all(g.gate_fired for g in lazy.groups)
    # the trade-off: eager sends one request batch but samples rephrases it then discards;
    # on a batch-only engine the overlapped schedule runs in rounds, like lazy
    assert (lazy.metrics["rollout/engine_calls"], eager.metrics["rollout/engine_calls"],
            overlap.metrics["rollout/engine_calls"]) == (2, 1, 2)
    assert lazy.metrics["rollout/rephrase_discarded"] == 0
    assert overlap.metrics["rollout/rephrase_discarded"] == 0
    assert eager.metrics["rollout/rephrase_discarded"] > 0
    assert lazy.metrics["rollout/rephrase_requests"] == overlap.metrics["rollout/rephrase_requests"]


@pytest.mark.parametrize("schedule", ["lazy", "overlap", "eager", "auto"])
@pytest.mark.parametrize("order", ["reversed", "shuffled"])
def test_groups_do_not_depend_on_the_order_requests_finish_in(schedule, order):
    reference, _ = run_schedule(schedule)
    rank = random.Random(5)
    priority = (lambda text, ticket: -ticket) if order == "reversed" else \
        (lambda text, ticket: rank.random())
    streamed, _ = run_schedule(schedule, StreamingEngine(random_script, priority))
    assert groups_signature(streamed.groups) == groups_signature(reference.groups)


def test_overlap_sends_a_groups_rephrases_while_other_groups_still_decode():
    # HARD's rollouts finish first; the other hard prompt's rollouts are still running
    other = prompt("other", "Compute (11 + 12) * 3.", "69", solution="\\boxed{69}")
    engine = StreamingEngine(lambda text, rng: "\\boxed{0}",
                             priority=lambda text, ticket: ("(11 + 12)" in text, ticket))
    stage, _ = make_stage(None, engine=engine, repo={"schedule": "overlap"})
    batch = stage.run([HARD, other], step=0)
    assert all(g.gate_fired and len(g.rephrases) == 1 for g in batch.groups)
    events = engine.events
    hard_rephrase = next(i for i, (kind, text) in enumerate(events)
                         if kind == "submit" and is_rephrase_prompt(text) and "23 + 45" in text)
    other_rollouts_done = max(i for i, (kind, text) in enumerate(events)
                              if kind == "finish" and not is_rephrase_prompt(text)
                              and "(11 + 12)" in text)
    assert hard_rephrase < other_rollouts_done
    assert batch.metrics["rollout/engine_calls"] == 3   # rollouts, then one batch per group


def test_same_seed_same_groups_and_a_new_step_new_samples():
    stage_a, _ = make_stage(random_script)
    stage_b, _ = make_stage(random_script)
    step0 = stage_a.run([HARD, EASY], step=0)
    assert groups_signature(step0.groups) == groups_signature(stage_b.run([HARD, EASY], 0).groups)
    assert groups_signature(step0.groups) != groups_signature(stage_a.run([HARD, EASY], 1).groups)


def test_injection_none_is_plain_grpo():
    stage, engine = make_stage(fails_then_rephrases_with_meta, injection="none")
    batch = stage.run([HARD], step=0)
    (group,) = batch.groups
    assert group.gate_fired and group.injected_index is None and len(group.samples) == 4
    assert len(engine.calls) == 1
    assert batch.metrics["rollout/injection_rate"] == 0.0


def test_luffy_adds_the_expert_solution_as_an_off_policy_sample():
    stage, engine = make_stage(fails_then_rephrases_with_meta, injection="luffy")
    hard, no_solution = stage.run([HARD, NO_SOLUTION], step=0).groups
    assert len(hard.samples) == 5 and hard.injected_index == 4
    expert = hard.samples[4]
    assert expert.is_offpolicy and not expert.is_rephrased and not expert.is_replay
    assert expert.response_text == HARD.solution and expert.reward == 1.0
    assert expert.response_ids == FORMATTER.response_ids(HARD.solution, eos=True)
    assert expert.behaviour_logprobs is None and expert.finish_reason == "expert"
    assert len(no_solution.samples) == 4
    assert len(engine.calls) == 1


def test_step_metrics():
    stage, _ = make_stage(fails_then_rephrases_with_meta)
    metrics = stage.run([HARD, NO_SOLUTION], step=0).metrics
    assert metrics["rollout/gate_rate"] == 0.5
    assert metrics["rollout/injection_rate"] == 0.5
    assert metrics["rollout/rephrase_verified_rate"] == 1.0
    assert metrics["rollout/reward_onpolicy_mean"] == 0.0
    assert metrics["rollout/reward_injected_mean"] == 1.0
    assert metrics["rollout/zero_variance_share"] == 0.5     # NO_SOLUTION's group: all 0
    assert metrics["rollout/engine_calls"] == 2
    for name in ("response_length_mean", "response_length_max", "truncated_share",
                 "generated_tokens", "time_s", "reward_failures"):
        assert f"rollout/{name}" in metrics


def rephrases_with_the_rollouts(engine):
    """How many rephrase prompts the first engine call (the rollouts' batch) held."""
    return sum(is_rephrase_prompt(t) for t in engine.calls[0])


def test_auto_samples_rephrases_eagerly_only_for_prompts_likely_to_trip_the_gate():
    from repo_megatron.rollout.injection.repo import likely_to_trip

    assert likely_to_trip(True, 0.0) and not likely_to_trip(False, 1.0)      # own history first
    assert likely_to_trip(None, 0.5) and not likely_to_trip(None, 0.49)
    assert likely_to_trip(None, None)                     # the first round: RePO's hard data

    options = {**SCHEDULE_OPTIONS, "repo": {**SCHEDULE_OPTIONS["repo"], "schedule": "auto"}}
    stage, engine = make_stage(random_script, **options)
    first = stage.run(MANY, step=0)
    # nothing known yet: every prompt with a solution is rephrased with its rollouts
    with_solution = {p.uid for p in MANY if p.solution is not None}
    assert stage.injection.prefetched == with_solution
    assert rephrases_with_the_rollouts(engine) == 2 * len(with_solution)    # 2 attempts each
    tripped = {g.prompt.uid for g in first.groups if g.gate_fired}
    assert tripped and tripped != with_solution                  # the test means something
    assert first.metrics["rollout/rephrase_discarded"] == 2 * len(with_solution - tripped)

    # the next steps: the tripped prompts go eagerly, an unseen one if half the gates fired,
    # and the gates that fired unforeseen follow up (overlap)
    wasted, unforeseen = set(), set()
    for step, rate_low in ((1, False), (2, True)):
        unseen = prompt(f"new{step}", f"Compute (30 + {step}) * 2.", "62",
                        solution="\\boxed{62}")
        if rate_low:                  # forecast from a round where fewer than half fired
            stage.injection.recent_rate = 0.25
        rate = stage.injection.recent_rate
        last = dict(stage.injection.last_fired)
        engine.calls.clear()
        batch = stage.run(MANY + [unseen], step=step)
        expected = {p.uid for p in MANY if last.get(p.uid)} | (
            {unseen.uid} if rate >= 0.5 else set())
        assert stage.injection.prefetched == expected
        assert rephrases_with_the_rollouts(engine) == 2 * len(expected)
        fired = {g.prompt.uid for g in batch.groups if g.gate_fired}
        assert batch.metrics["rollout/rephrase_discarded"] == 2 * len(expected - fired)
        assert batch.metrics["rollout/rephrase_requests"] == 2 * len(expected | fired)
        wasted |= expected - fired
        unforeseen |= fired - expected
    assert wasted and unforeseen                    # both ways a forecast can miss were seen
    second = batch

    # the same groups as lazy whatever was forecast; the forecast's state survives a resume
    lazy, _ = make_stage(random_script, **SCHEDULE_OPTIONS)
    assert groups_signature(second.groups) == groups_signature(
        lazy.run(MANY + [unseen], step=2).groups)
    state = stage.injection.state()
    assert set(state["last_fired"]) == with_solution | {"new1", "new2"}
    assert all(state["last_fired"][g.prompt.uid] == g.gate_fired for g in second.groups
               if g.prompt.solution is not None)
    resumed, _ = make_stage(random_script, **options)
    resumed.injection.load_state(state)
    assert resumed.injection.state() == state
