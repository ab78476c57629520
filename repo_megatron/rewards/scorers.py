"""The run's reward scorer: one per reward name, and a dispatcher when sources differ.

A scorer is anything with ``score(list[RewardRequest]) -> list[RewardResult]`` and
``close()``: a :class:`~.runner.RewardRunner` (functions in worker processes with a hard
timeout) or a :class:`~.judge.JudgeReward` (an LLM judge over HTTP, in this process).
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Optional, Protocol, Sequence

from ..config.data import DataConfig
from .base import RewardRequest, RewardResult


class Scorer(Protocol):
    def score(self, requests: Sequence[RewardRequest]) -> list[RewardResult]: ...

    def close(self) -> None: ...


def build_scorer(reward: str, cfg: DataConfig, log_dir: Optional[str] = None) -> Scorer:
    """The scorer of reward ``reward``: the LLM judge for ``judge`` (its servers, if it starts
    any, log to ``log_dir``), else a worker pool."""
    if reward == "judge":
        from .judge import JudgeReward
        return JudgeReward(cfg.judge, log_dir)
    from .runner import RewardRunner
    return RewardRunner(reward, cfg.reward_timeout_s, cfg.reward_workers, cfg.reward_max_abs)


class PerSourceRewards:
    """Scores each request with the reward of its source (``request.source``); prompts of
    other sources (the eval set) get ``default``. The scorers of one call run concurrently,
    so a slow judge and a math pool overlap."""

    def __init__(self, scorers: dict[str, Scorer], reward_of: dict[str, str], default: str):
        self.scorers, self.reward_of, self.default = scorers, reward_of, default

    def score(self, requests: Sequence[RewardRequest]) -> list[RewardResult]:
        by_reward: dict[str, list[int]] = {}
        for i, request in enumerate(requests):
            name = self.reward_of.get(request.source, self.default)
            if name not in self.scorers:
                raise KeyError(f"no reward for prompts of source {request.source!r}")
            by_reward.setdefault(name, []).append(i)
        results: list[RewardResult] = [None] * len(requests)  # type: ignore[list-item]
        with ThreadPoolExecutor(max_workers=max(1, len(by_reward))) as pool:
            futures = {name: pool.submit(self.scorers[name].score, [requests[i] for i in idx])
                       for name, idx in by_reward.items()}
            for name, future in futures.items():
                for i, result in zip(by_reward[name], future.result()):
                    results[i] = result
        return results

    def metrics(self) -> dict[str, float]:
        return {k: v for scorer in self.scorers.values() for k, v in scorer_metrics(scorer).items()}

    def close(self) -> None:
        for scorer in self.scorers.values():
            scorer.close()


def build_rewards(cfg: DataConfig, reward_of: dict[str, str],
                  log_dir: Optional[str] = None) -> Scorer:
    """The scorer for sources ``{name: reward}``: one scorer when they all share a reward,
    else a :class:`PerSourceRewards` over one scorer per distinct reward (``data.reward``
    scores the eval prompts)."""
    default = [cfg.reward] if cfg.eval_path or not reward_of else []
    names = list(dict.fromkeys([*default, *reward_of.values()]))
    scorers: dict[str, Scorer] = {}
    try:
        for name in names:
            scorers[name] = build_scorer(name, cfg, log_dir)
    except BaseException:
        for scorer in scorers.values():
            scorer.close()
        raise
    if len(scorers) == 1:
        return next(iter(scorers.values()))
    return PerSourceRewards(scorers, reward_of, cfg.reward)


def scorer_metrics(scorer: Scorer) -> dict[str, float]:
    """Counters a scorer keeps since the last call (the judge's requests, cache hits,
    failures...); empty for scorers that keep none."""
    metrics = getattr(scorer, "metrics", None)
    return metrics() if metrics is not None else {}
