"""The RePO rollout stage: rollouts -> rewards -> gate -> rephrase -> inject (-> replay,
dynamic sampling), orchestrated over the :class:`~.engine.RolloutEngine` interface only.

    stage = RolloutStage(engine, formatter, RewardRunner("math"), cfg.rollout, cfg.algorithm,
                         seed=cfg.seed)
    batch = stage.run(prompts, step)        # RolloutBatch: groups + "rollout/..." metrics

No Megatron here: the stage sees the policy through ``engine.generate`` and hands the trainer
:class:`~.types.Group` s of :class:`~.types.Sample` s. Every request is seeded from
(run seed, step, round, prompt uid, kind, index), so the same prompt gets the same responses
whatever the batching, the engine's routing or the rephrase schedule.
"""

from __future__ import annotations

import random
import time
from collections import Counter
from dataclasses import replace
from typing import Callable, Optional, Sequence

from ..config.algorithm import AlgorithmConfig
from ..config.rollout import RolloutConfig
from ..engines.base import GenerationResult, RolloutEngine, SamplingParams
from ..rewards.base import RewardRequest, RewardResult
from .dynamic_sampling import informative_groups
from .gate import failure_rate, gate_fires
from .injection.base import Request
from .injection.registry import INJECTIONS
from .metrics import rollout_metrics
from .replay.buffer import ReplayBuffer
from .seeds import request_seed
from .types import Group, Prompt, RolloutBatch, Sample


def sampling_params(rollout: RolloutConfig) -> SamplingParams:
    """The ``rollout:`` section as engine sampling parameters (seeds are set per request)."""
    return SamplingParams(temperature=rollout.temperature, top_p=rollout.top_p,
                          top_k=rollout.top_k, max_new_tokens=rollout.max_new_tokens,
                          stop=tuple(rollout.stop), stop_token_ids=tuple(rollout.stop_token_ids))


class _StepTools:
    """Seeded sampling and scoring for one step, counting request batches and tokens."""

    def __init__(self, stage: "RolloutStage", step: int):
        self.stage, self.step, self.round = stage, step, 0
        self.counters: Counter = Counter()

    def params(self, request: Request) -> SamplingParams:
        stage = self.stage
        return stage.params.with_seed(request_seed(stage.seed, self.step, self.round,
                                                   request.prompt.uid, request.kind,
                                                   request.index))

    def sample(self, requests: Sequence[Request],
               on_finished: Optional[Callable[[list[tuple[Request, GenerationResult]]],
                                              Sequence[Request]]] = None
               ) -> dict[Request, GenerationResult]:
        """Sample ``requests`` on one engine stream. ``on_finished`` gets each batch of
        requests that finished together and may return more requests, which join the same
        stream at once. Returns every request's result."""
        results: dict[Request, GenerationResult] = {}
        with self.stage.engine.stream() as stream:
            tickets: dict[int, Request] = {}

            def submit(batch: Sequence[Request]) -> None:
                if batch:
                    self.counters["engine_calls"] += 1   # request batches sent
                for r in batch:
                    tickets[stream.submit(r.prompt_ids, self.params(r))] = r

            submit(requests)
            while tickets:
                finished = [(tickets.pop(t), result) for t, result in stream.wait()]
                self.counters["generated_tokens"] += sum(len(r.token_ids) for _, r in finished)
                results.update(finished)
                if on_finished is not None:
                    submit(on_finished(finished))
        return results

    def generate(self, requests: Sequence[Request]) -> list[GenerationResult]:
        """The results of ``requests``, in order."""
        if not requests:
            return []
        results = self.sample(requests)
        return [results[r] for r in requests]

    def score(self, prompts: Sequence[Prompt], texts: Sequence[str]) -> list[RewardResult]:
        if not prompts:
            return []
        return self.stage.rewards.score([RewardRequest.for_prompt(p, text)
                                         for p, text in zip(prompts, texts)])


class RolloutStage:
    """One RL step's data: groups of G responses per prompt, gated injection, optional replay
    and dynamic sampling.

    ``engine``: a :class:`RolloutEngine`; ``formatter``: a
    :class:`~repo_megatron.data.ChatFormatter` (rephrase prompts, re-tokenising);
    ``rewards``: anything with ``score(list[RewardRequest]) -> list[RewardResult]`` (a
    :class:`~repo_megatron.rewards.RewardRunner`).
    """

    def __init__(self, engine: RolloutEngine, formatter, rewards, rollout: RolloutConfig,
                 algorithm: AlgorithmConfig, seed: int = 0):
        self.engine, self.rewards, self.seed = engine, rewards, seed
        self.group_size = rollout.group_size
        self.params = sampling_params(rollout)
        self.gate = algorithm.repo
        self.injection = INJECTIONS.get(algorithm.injection)(algorithm, formatter)
        self.replay_cfg = algorithm.replay
        self.replay = ReplayBuffer(algorithm.replay.buffer_size, algorithm.replay.strategy,
                                   algorithm.replay.min_buffer_size) \
            if algorithm.replay.enabled else None
        self.dynamic = algorithm.dynamic_sampling

    def run(self, prompts: Sequence[Prompt], step: int,
            refill: Optional[Callable[[int], Sequence[Prompt]]] = None) -> RolloutBatch:
        """Sample, score, gate and inject for ``prompts``.

        With dynamic sampling, zero-variance groups are dropped and, for up to
        ``max_oversample_rounds`` more rounds, ``refill(n)`` supplies n more prompts to make
        up for them. Returns the kept groups and ``rollout/*`` metrics of everything sampled.
        """
        start = time.perf_counter()
        tools = _StepTools(self, step)
        extra_rounds = self.dynamic.max_oversample_rounds if self.dynamic.enabled else 0
        sampled: list[Group] = []
        rollouts: list[Sample] = []
        kept: list[Group] = []
        batch = list(prompts)
        for round_index in range(1 + extra_rounds):
            tools.round = round_index
            groups, fresh = self.sample_groups(batch, tools)
            sampled += groups
            rollouts += fresh
            kept += informative_groups(groups) if self.dynamic.enabled else groups
            missing = len(prompts) - len(kept)
            if missing <= 0 or refill is None or round_index == extra_rounds:
                break
            batch = list(refill(missing))
            if not batch:
                break
        metrics = rollout_metrics(sampled, rollouts, len(kept), self.gate.reward_threshold)
        metrics.update({k: float(v) for k, v in tools.counters.items()})
        metrics["time_s"] = time.perf_counter() - start
        return RolloutBatch(groups=kept, metrics={f"rollout/{k}": v for k, v in metrics.items()},
                            sampled=sampled)

    def sample_groups(self, prompts: Sequence[Prompt],
                      tools: _StepTools) -> tuple[list[Group], list[Sample]]:
        """One round: G rollouts per prompt (with any prefetched requests on the same
        stream), rewards and the gate of each group as soon as its G rollouts are in (with
        the strategy's follow-up requests sent right then), injection, replay. Returns the
        groups and the fresh rollouts."""
        G = self.group_size
        # a prompt drawn twice (an epoch boundary) is sampled once: its seeds are the same
        unique = list({p.uid: p for p in prompts}.values())
        order = {p.uid: i for i, p in enumerate(unique)}
        requests = [Request(p, "rollout", i, p.prompt_ids) for p in unique for i in range(G)]
        prefetch = self.injection.prefetch(unique)
        rollouts: dict[str, list[tuple[Request, GenerationResult]]] = {p.uid: [] for p in unique}
        gated: dict[str, Group] = {}
        follow_ups: list[Request] = []

        def on_finished(finished):
            complete = []
            for request, result in finished:
                if request.kind == "rollout":
                    rollouts[request.prompt.uid].append((request, result))
                    if len(rollouts[request.prompt.uid]) == G:
                        complete.append(request.prompt)
            more = []
            for group in self.score_groups(complete, rollouts, tools):
                gated[group.prompt.uid] = group
                more += self.injection.follow_up(group)
            follow_ups.extend(more)
            return more

        results = tools.sample(requests + prefetch, on_finished)
        groups = [gated[p.uid] for p in prompts]
        fresh = [s for g in groups for s in g.samples]
        extra = prefetch + sorted(follow_ups, key=lambda r: (order[r.prompt.uid], r.index))
        groups, counters = self.injection.inject(groups, [(r, results[r]) for r in extra], tools)
        tools.counters.update(counters)
        if self.replay is not None:
            groups = self.add_replay(groups, tools)
            self.replay.add(fresh)
        return groups, fresh

    def score_groups(self, prompts: Sequence[Prompt],
                     rollouts: dict[str, list[tuple[Request, GenerationResult]]],
                     tools: _StepTools) -> list[Group]:
        """The gated groups of ``prompts``, whose G rollouts are all in, scored in one call."""
        pairs = [sorted(rollouts[p.uid], key=lambda pair: pair[0].index) for p in prompts]
        flat = [pair for group in pairs for pair in group]
        rewards = iter(tools.score([req.prompt for req, _ in flat], [res.text for _, res in flat]))
        return [self.gated_group(p, [Sample.from_generation(p, res, next(rewards))
                                     for _, res in group])
                for p, group in zip(prompts, pairs)]

    def gated_group(self, prompt: Prompt, samples: list[Sample]) -> Group:
        """The group with its failure rate gamma and whether the gate fired."""
        rewards = [s.reward for s in samples]
        delta, rho = self.gate.reward_threshold, self.gate.failure_rate_threshold
        return Group(prompt=prompt, samples=samples, failure_rate=failure_rate(rewards, delta),
                     gate_fired=gate_fires(rewards, delta, rho, prompt.solution is not None))

    def add_replay(self, groups: list[Group], tools: _StepTools) -> list[Group]:
        """Each group plus samples replayed from earlier steps (before this step's are added)."""
        out = []
        for group in groups:
            uid = group.prompt.uid
            rng = random.Random(request_seed(self.seed, tools.step, tools.round, uid, "replay"))
            past = self.replay.retrieve(uid, self.replay_cfg.samples_per_prompt, rng)
            out.append(replace(group, samples=group.samples + past))
        return out
