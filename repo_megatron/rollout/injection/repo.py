"""``injection: repo``: rephrase the expert solution with the policy, verify, inject.

For each group whose gate fired: sample ``o_rep ~ pi(. | P(q, k))`` (``num_rephrase_attempts``
times), strip meta text, score it against q's answer, and replace the lowest-reward rollout
with the best attempt if it is verified (``R_rep >= delta``, unless ``require_verified`` is
off). The injected sample is a response to q: the engine's log-probs (computed under P(q, k))
are dropped, so the trainer recomputes old log-probs under q.

Schedules (per-request seeds make all four give the same groups):

- ``lazy``: rephrase after every group is gated (one more round after the rollouts, no wasted
  tokens);
- ``overlap``: rephrase a group as soon as its own G rollouts are scored and its gate fires,
  while the other groups are still decoding (no wasted tokens; on a streaming engine the
  rephrases join the running batch);
- ``eager``: rephrase every prompt with a solution together with its rollouts and discard
  the rephrases whose gate stays shut (no waiting for the gate, wasted tokens);
- ``auto``: eager for the prompts whose gate is likely to fire (:func:`likely_to_trip`: the
  prompt's own last group tripped it, or, for a prompt not sampled before, at least half the
  groups of the last round did, or no round has run yet), overlap for the others. Eager pays
  tokens for every gate that stays shut, overlap a second decode for every one that fires; on
  hard data (every group failing) auto decodes like eager, on easy data like overlap.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Optional, Sequence

from ...engines.base import GenerationResult
from ...rewards.base import RewardResult
from ..gate import best_candidate, rephrase_prompt, replace_lowest, strip_meta
from ..types import Group, Prompt, Sample
from .base import Injection, Request


def likely_to_trip(last_fired: Optional[bool], recent_rate: Optional[float]) -> bool:
    """``auto``'s forecast of a prompt's gate: how its own last group went, if it has been
    sampled before; otherwise whether at least half the groups (with a solution) of the last
    round tripped theirs. Before any round: True, RePO's data being the hard prompts that
    mostly fail early in training (on the quickstart, eager's first step took 31.7 s of
    generation and overlap's 45.7 s)."""
    if last_fired is not None:
        return last_fired
    return recent_rate is None or recent_rate >= 0.5


class RePOInjection(Injection):
    def __init__(self, algorithm, formatter):
        self.cfg = algorithm.repo
        self.formatter = formatter
        # auto's forecast: each prompt's last gate, the last round's rate, this round's eager set
        self.last_fired: dict[str, bool] = {}
        self.recent_rate: Optional[float] = None
        self.prefetched: set[str] = set()

    def rephrase_requests(self, prompts: Sequence[Prompt]) -> list[Request]:
        """``num_rephrase_attempts`` requests of P(q, k) per prompt."""
        requests = []
        for prompt in prompts:
            ids = tuple(self.formatter.prompt_ids(
                rephrase_prompt(self.cfg.rephrase_template, prompt.question, prompt.solution)))
            requests += [Request(prompt, "rephrase", i, ids)
                         for i in range(self.cfg.num_rephrase_attempts)]
        return requests

    def prefetch(self, prompts):
        schedule = self.cfg.schedule
        eager = [p for p in prompts if p.solution is not None and (
            schedule == "eager" or schedule == "auto" and
            likely_to_trip(self.last_fired.get(p.uid), self.recent_rate))]
        self.prefetched = {p.uid for p in eager}
        return self.rephrase_requests(eager) if schedule in ("eager", "auto") else []

    def follow_up(self, group):
        if self.cfg.schedule not in ("overlap", "auto") or not group.gate_fired or \
                group.prompt.uid in self.prefetched:
            return []
        return self.rephrase_requests([group.prompt])

    def state(self) -> dict:
        return {"last_fired": dict(self.last_fired), "recent_rate": self.recent_rate}

    def load_state(self, state: dict) -> None:
        self.last_fired = dict(state.get("last_fired", {}))
        self.recent_rate = state.get("recent_rate")

    def rephrased_sample(self, request: Request, result: GenerationResult,
                         reward: RewardResult, text: str) -> Sample:
        """o_rep as a response to the ORIGINAL prompt q, engine log-probs dropped."""
        ids = list(result.token_ids)
        if text != result.text:  # meta text was stripped: re-encode, keep the stop token
            ended_on_token = result.finish_reason == "stop" and isinstance(result.matched_stop, int)
            ids = self.formatter.response_ids(text, eos=False) + (ids[-1:] if ended_on_token else [])
        prompt = request.prompt
        return Sample(prompt_uid=prompt.uid, prompt_ids=prompt.prompt_ids, response_ids=ids,
                      response_text=text, reward=reward.value, reward_reason=reward.reason,
                      finish_reason=result.finish_reason, behaviour_logprobs=None,
                      weight_version=result.weight_version, reward_failed=reward.failed,
                      is_rephrased=True)

    def inject(self, groups, sampled, tools):
        tripped = [g for g in groups if g.gate_fired]
        tripped_uids = {g.prompt.uid for g in tripped}
        if self.cfg.schedule == "lazy":
            requests = self.rephrase_requests([g.prompt for g in tripped])
            pairs = list(zip(requests, tools.generate(requests)))
            discarded = 0
        else:
            pairs = [(r, res) for r, res in sampled if r.prompt.uid in tripped_uids]
            discarded = len(sampled) - len(pairs)
        texts = [strip_meta(result.text, self.cfg.meta_patterns) for _, result in pairs]
        rewards = tools.score([r.prompt for r, _ in pairs], texts)
        attempts: dict[str, list[Sample]] = {}
        for (request, result), reward, text in zip(pairs, rewards, texts):
            attempts.setdefault(request.prompt.uid, []).append(
                self.rephrased_sample(request, result, reward, text))
        out = [self.inject_group(g, attempts.get(g.prompt.uid, [])) if g.gate_fired else g
               for g in groups]
        with_solution = [g for g in groups if g.prompt.solution is not None]
        self.last_fired.update({g.prompt.uid: g.gate_fired for g in with_solution})
        if with_solution:
            self.recent_rate = sum(g.gate_fired for g in with_solution) / len(with_solution)
        return out, {"rephrase_requests": float(len(pairs) + discarded),
                     "rephrase_discarded": float(discarded)}

    def inject_group(self, group: Group, attempts: list[Sample]) -> Group:
        """``group`` with its rephrase attempts recorded and the best one injected if allowed."""
        group = replace(group, rephrases=attempts)
        best = best_candidate(attempts)
        if best is None or (self.cfg.require_verified and best.reward < self.cfg.reward_threshold):
            return group
        return replace_lowest(group, best)
