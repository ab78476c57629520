"""The RePO gate and injection rules as small pure functions (no engine, no I/O)."""

from __future__ import annotations

import re
from dataclasses import replace
from typing import Optional, Sequence

from .types import Group, Sample


def failure_rate(rewards: Sequence[float], reward_threshold: float) -> float:
    """gamma = |{i : R_i < delta}| / G."""
    return sum(r < reward_threshold for r in rewards) / len(rewards)


def gate_fires(rewards: Sequence[float], reward_threshold: float, failure_rate_threshold: float,
               has_solution: bool) -> bool:
    """Inject only when gamma >= rho and there is a solution to rephrase."""
    return has_solution and failure_rate(rewards, reward_threshold) >= failure_rate_threshold


def lowest_reward_index(rewards: Sequence[float]) -> int:
    """Slot of the lowest reward; ties go to the first slot (rollouts are i.i.d., so the slot
    carries no information and the rule only has to be deterministic)."""
    return min(range(len(rewards)), key=lambda i: (rewards[i], i))


def best_candidate(candidates: Sequence[Sample]) -> Optional[Sample]:
    """The highest-reward candidate, the first on ties (None if there are none)."""
    if not candidates:
        return None
    return max(enumerate(candidates), key=lambda ic: (ic[1].reward, -ic[0]))[1]


def replace_lowest(group: Group, injected: Sample) -> Group:
    """``group`` with its lowest-reward sample replaced by ``injected``."""
    slot = lowest_reward_index(group.rewards)
    samples = list(group.samples)
    replaced, samples[slot] = samples[slot], injected
    return replace(group, samples=samples, injected_index=slot, replaced=replaced)


def rephrase_prompt(template: str, question: str, solution: str) -> str:
    """P(q, k): the rephrasing template with the problem and the expert solution filled in."""
    values = {"question": question, "solution": solution}
    # one pass, so braces inside the texts (\\boxed{...}, a literal "{solution}") stay as written
    return re.sub(r"\{(question|solution)\}", lambda m: values[m.group(1)], template)


def strip_meta(text: str, patterns: Sequence[str]) -> str:
    """``text`` without what ``patterns`` match (references to the expert solution,
    preambles); blank lines left behind are collapsed. Unchanged text is returned as is."""
    stripped = text
    for pattern in patterns:
        stripped = re.sub(pattern, "", stripped)
    if stripped == text:
        return text
    return re.sub(r"\n{3,}", "\n\n", stripped).strip()
