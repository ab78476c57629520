"""Prompt order: seeded epochs, weighted mixtures deterministic per seed and resumed exactly."""

from collections import Counter

from repo_megatron.rollout.types import Prompt
from repo_megatron.run.prompts import MixtureSampler, PromptSampler


def prompts(source: str, n: int) -> list[Prompt]:
    return [Prompt(uid=f"{source}:{i}", question=f"{source} {i}", answer="0", prompt_ids=(i,),
                   source=source) for i in range(1, n + 1)]


MIXTURE = {"math": (prompts("math", 7), 3.0), "finance": (prompts("finance", 5), 1.0)}


def uids(sampler, n):
    return [p.uid for p in sampler.take(n)]


def test_the_same_seed_gives_the_same_mixture_order_and_another_seed_another():
    assert uids(MixtureSampler(MIXTURE, seed=1), 40) == uids(MixtureSampler(MIXTURE, seed=1), 40)
    assert uids(MixtureSampler(MIXTURE, seed=1), 40) != uids(MixtureSampler(MIXTURE, seed=2), 40)


def test_sources_are_drawn_in_proportion_to_their_weights():
    taken = MixtureSampler(MIXTURE, seed=0).take(4000)
    share = Counter(p.source for p in taken)["math"] / len(taken)
    assert abs(share - 0.75) < 0.03, share


def test_each_source_goes_through_whole_epochs_in_its_own_order():
    taken = [p.uid for p in MixtureSampler(MIXTURE, seed=0).take(200) if p.source == "finance"]
    for start in range(0, len(taken) - 5, 5):
        assert sorted(taken[start:start + 5]) == [f"finance:{i}" for i in range(1, 6)]


def test_resuming_from_state_continues_exactly(tmp_path):
    full = MixtureSampler(MIXTURE, seed=5)
    expected = uids(full, 13) + uids(full, 17)
    first = MixtureSampler(MIXTURE, seed=5)
    head = uids(first, 13)
    state = first.state()
    resumed = MixtureSampler(MIXTURE, seed=5)
    resumed.load_state(state)
    assert head + uids(resumed, 17) == expected
    assert state["draws"] == 13 and set(state["sources"]) == {"math", "finance"}


def test_one_source_keeps_the_order_of_a_single_file_run():
    single = {"arith": (prompts("arith", 6), 1.0)}
    assert uids(MixtureSampler(single, seed=9), 20) == \
        [p.uid for p in PromptSampler(single["arith"][0], seed=9).take(20)]


def test_a_one_file_checkpoint_resumes_into_the_sampler():
    single = {"arith": (prompts("arith", 6), 1.0)}
    old = PromptSampler(single["arith"][0], seed=9)
    old.take(8)
    sampler = MixtureSampler(single, seed=9)
    sampler.load_state(old.state())             # {"epoch", "index"} of the one-file sampler
    assert uids(sampler, 5) == [p.uid for p in old.take(5)]


def test_a_source_added_after_the_checkpoint_starts_at_its_beginning(caplog):
    first = MixtureSampler({"math": MIXTURE["math"]}, seed=3)
    first.take(4)
    grown = MixtureSampler(MIXTURE, seed=3)
    grown.load_state({"draws": 4, "sources": {"math": first.samplers["math"].state()}})
    assert "finance is not in the checkpoint" in caplog.text
    assert grown.samplers["finance"].state() == {"epoch": 0, "index": 0}
    assert grown.samplers["math"].state() == first.samplers["math"].state()
