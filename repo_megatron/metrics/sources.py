"""Rollout metrics per data source (``rollout/<source>/...``), for mixtures (pure).

The same :func:`~repo_megatron.rollout.metrics.rollout_metrics` as the step's totals, over the
groups of one source: what was sampled (kept or dropped by dynamic sampling), its on-policy
rollouts before any was replaced, and how many of its groups were kept.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from ..rollout.metrics import rollout_metrics
from ..rollout.types import Group, Sample


def onpolicy_rollouts(group: Group) -> list[Sample]:
    """The G rollouts of pi(. | q) of a group, including the one an injection displaced."""
    own = [s for s in group.samples if not (s.is_rephrased or s.is_offpolicy or s.is_replay)]
    return own + ([group.replaced] if group.replaced is not None else [])


def source_metrics(sampled: Sequence[Group], kept: Sequence[Group], sources: Sequence[str],
                   reward_threshold: float) -> dict[str, float]:
    """``rollout/<source>/<metric>`` for every source in ``sources``; a source with no group
    this step reports only ``groups = 0``."""
    kept_by_source = Counter(g.prompt.source for g in kept)
    metrics: dict[str, float] = {}
    for source in sources:
        groups = [g for g in sampled if g.prompt.source == source]
        values = {"groups": 0.0} if not groups else rollout_metrics(
            groups, [s for g in groups for s in onpolicy_rollouts(g)], kept_by_source[source],
            reward_threshold)
        metrics.update({f"rollout/{source}/{k}": v for k, v in values.items()})
    return metrics
