"""Per-step rollout metrics (pure): what the gate, the rephrases and the injection did."""

from __future__ import annotations

from statistics import fmean
from typing import Iterable, Sequence

from .dynamic_sampling import has_reward_variance
from .types import Group, Sample


def mean(values: Iterable[float]) -> float:
    """The mean of a non-empty sequence; never raises for huge or non-finite values
    (``statistics.fmean`` raises OverflowError on [1e308, 1e308] and ValueError on [inf, -inf])."""
    values = list(values)
    try:
        return fmean(values)
    except (OverflowError, ValueError):
        return sum(v / len(values) for v in values)


def rollout_metrics(groups: Sequence[Group], rollouts: Sequence[Sample], kept: int,
                    reward_threshold: float) -> dict[str, float]:
    """Metrics over every group sampled in the step (kept or dropped) and every on-policy
    rollout sampled (``rollouts``, before any was replaced). Means of empty sets are left out.

    ``gate_rate``, ``injection_rate``: share of groups; ``rephrase_verified_rate``: share of
    rephrase attempts (of fired gates) with reward >= delta; ``reward_onpolicy_mean``: mean
    reward of pi(. | q) (the solve rate); ``reward_injected_mean``: of injected samples;
    ``zero_variance_share``: share of groups with no reward variance after injection;
    ``failed_groups``: groups whose on-policy rollouts all failed (GRPO: zero advantage, no
    gradient), ``failed_groups_rescued``: those of them that got an injected sample with
    reward >= delta; ``reward_calls`` / ``reward_failures``: rewards computed / failed
    (rollouts and rephrases).
    """
    injected = [g.samples[g.injected_index] for g in groups if g.injected_index is not None]
    rephrases = [s for g in groups for s in g.rephrases]
    lengths = [len(s.response_ids) for s in rollouts]
    failed = [g for g in groups if g.failure_rate == 1.0]
    metrics = {
        "groups": float(len(groups)),
        "groups_kept": float(kept),
        "gate_rate": mean(g.gate_fired for g in groups),
        "injection_rate": mean(g.injected_index is not None for g in groups),
        "zero_variance_share": mean(not has_reward_variance(g) for g in groups),
        "reward_onpolicy_mean": mean(s.reward for s in rollouts),
        "response_length_mean": mean(lengths),
        "response_length_max": float(max(lengths)),
        "truncated_share": mean(s.finish_reason == "length" for s in rollouts),
        "reward_calls": float(len(rollouts) + len(rephrases)),
        "reward_failures": float(sum(s.reward_failed for s in [*rollouts, *rephrases])),
        "replayed_samples": float(sum(s.is_replay for g in groups for s in g.samples)),
        "rephrase_attempts": float(len(rephrases)),
        "failed_groups": float(len(failed)),
        "failed_groups_rescued": float(sum(
            g.injected_index is not None and g.samples[g.injected_index].reward >= reward_threshold
            for g in failed)),
    }
    optional = {
        "rephrase_verified_rate": [float(s.reward >= reward_threshold) for s in rephrases],
        "reward_rephrase": [s.reward for s in rephrases],
        "reward_injected": [s.reward for s in injected],
        "injected_length": [float(len(s.response_ids)) for s in injected],
    }
    for name, values in optional.items():
        if values:
            metrics[name if name.endswith("_rate") else f"{name}_mean"] = mean(values)
    return metrics
