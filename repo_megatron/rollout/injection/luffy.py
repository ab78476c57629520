"""``injection: luffy``: the expert solution itself joins the group as an off-policy sample.

As in LUFFY, every prompt with a solution gets it (no gate, no rephrasing). The sample has no
behaviour log-probs (we did not sample it); ``is_offpolicy`` tells the trainer to use policy
shaping ``f(p) = p / (p + gamma)`` on its tokens instead of a ratio to old log-probs.
"""

from __future__ import annotations

from dataclasses import replace

from ...rewards.base import RewardResult
from ..types import Prompt, Sample
from .base import Injection


class LuffyInjection(Injection):
    def __init__(self, algorithm, formatter):
        self.formatter = formatter

    def expert_sample(self, prompt: Prompt, reward: RewardResult) -> Sample:
        """The solution, tokenised as a finished response to the original prompt."""
        return Sample(prompt_uid=prompt.uid, prompt_ids=prompt.prompt_ids,
                      response_ids=self.formatter.response_ids(prompt.solution, eos=True),
                      response_text=prompt.solution, reward=reward.value,
                      reward_reason=reward.reason, finish_reason="expert",
                      reward_failed=reward.failed, is_offpolicy=True)

    def inject(self, groups, sampled, tools):
        with_solution = [g.prompt for g in groups if g.prompt.solution is not None]
        rewards = iter(tools.score(with_solution, [p.solution for p in with_solution]))
        out = []
        for group in groups:
            if group.prompt.solution is None:
                out.append(group)
                continue
            expert = self.expert_sample(group.prompt, next(rewards))
            out.append(replace(group, samples=group.samples + [expert],
                               injected_index=len(group.samples)))
        return out, {}
