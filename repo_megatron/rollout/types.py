"""What the rollout stage hands to the trainer: prompts, samples and groups (pure data).

A :class:`Sample` is always a response to its group's ORIGINAL prompt ``q`` (``prompt_ids``),
whatever prompt the engine actually saw: a rephrased trace was sampled under ``P(q, k)`` but is
trained as a response to ``q``, so the log-probs the engine returned for it are dropped
(``behaviour_logprobs is None``) and the trainer recomputes old log-probs under ``q``.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Optional

if TYPE_CHECKING:
    from ..engines.base import GenerationResult
    from ..rewards.base import RewardResult


@dataclass(frozen=True)
class Prompt:
    """One dataset row, ready to sample from.

    ``uid`` identifies the prompt across steps (replay buffer key, per-request seeds);
    ``solution`` is the off-policy knowledge ``k`` (an expert's worked solution) or None;
    ``source`` names the dataset source it came from (per-source rewards and metrics).
    """
    uid: str
    question: str
    answer: str
    prompt_ids: tuple[int, ...]
    solution: Optional[str] = None
    source: str = ""


@dataclass
class Sample:
    """One response to ``prompt_ids`` with its reward and provenance.

    ``behaviour_logprobs[t]`` is the log-prob of ``response_ids[t]`` under the policy that
    produced it, conditioned on ``prompt_ids`` -- or None where no such number exists
    (rephrased traces were sampled under another prompt; LUFFY's expert trace was not sampled
    by us at all). ``loss_mask[t]`` says whether token ``t`` is trained on.
    """
    prompt_uid: str
    prompt_ids: tuple[int, ...]
    response_ids: list[int]
    response_text: str
    reward: float
    reward_reason: str
    finish_reason: str                      # "stop" (EOS, stop id or string), "length", "expert"
    behaviour_logprobs: Optional[list[float]] = None
    weight_version: Optional[int] = None    # engine weights that sampled it (None: not sampled)
    loss_mask: list[int] = field(default_factory=list)
    reward_failed: bool = False             # the reward raised or timed out; reward is 0
    is_rephrased: bool = False              # RePO: o_rep ~ pi(. | P(q, k)), injected into q's group
    is_offpolicy: bool = False              # not sampled from pi(. | q): LUFFY expert, replay
    is_replay: bool = False                 # Replay-Enhanced PO: retrieved from the buffer

    def __post_init__(self) -> None:
        if not self.loss_mask:
            self.loss_mask = [1] * len(self.response_ids)
        if self.behaviour_logprobs is not None and len(self.behaviour_logprobs) != len(self.response_ids):
            raise ValueError(f"sample of prompt {self.prompt_uid}: {len(self.behaviour_logprobs)} "
                             f"log-probs for {len(self.response_ids)} response tokens")

    @classmethod
    def from_generation(cls, prompt: Prompt, result: "GenerationResult",
                        reward: "RewardResult") -> "Sample":
        """An on-policy rollout of ``prompt``: the engine's tokens and log-probs, scored."""
        return cls(prompt_uid=prompt.uid, prompt_ids=prompt.prompt_ids,
                   response_ids=list(result.token_ids), response_text=result.text,
                   reward=reward.value, reward_reason=reward.reason,
                   finish_reason=result.finish_reason, behaviour_logprobs=list(result.logprobs),
                   weight_version=result.weight_version, reward_failed=reward.failed)

    @classmethod
    def from_plain(cls, data: dict) -> "Sample":
        """The sample ``dataclasses.asdict`` made ``data`` of (checkpoints hold plain data)."""
        return cls(**{**data, "prompt_ids": tuple(data["prompt_ids"])})

    @property
    def logprobs_valid(self) -> bool:
        """True when ``behaviour_logprobs`` may be used (ratio to pi_behaviour, mismatch metrics)."""
        return self.behaviour_logprobs is not None


@dataclass
class Group:
    """The final group of one prompt: G samples (one may be injected) plus replayed ones.

    ``failure_rate`` is gamma over the G on-policy rollouts; ``gate_fired`` says gamma >= rho
    and a solution exists; ``injected_index`` is the slot of the injected sample (None if none);
    ``replaced`` is the on-policy rollout it displaced and ``rephrases`` every scored rephrase
    attempt (both kept for metrics only).
    """
    prompt: Prompt
    samples: list[Sample]
    failure_rate: float = 0.0
    gate_fired: bool = False
    injected_index: Optional[int] = None
    replaced: Optional[Sample] = None
    rephrases: list[Sample] = field(default_factory=list)

    def to_plain(self) -> dict:
        """The group as plain data (dicts, lists, numbers, text), for a checkpoint."""
        return asdict(self)

    @classmethod
    def from_plain(cls, data: dict) -> "Group":
        """The group :meth:`to_plain` made ``data`` of."""
        return cls(prompt=Prompt(**{**data["prompt"],
                                    "prompt_ids": tuple(data["prompt"]["prompt_ids"])}),
                   samples=[Sample.from_plain(s) for s in data["samples"]],
                   failure_rate=data["failure_rate"], gate_fired=data["gate_fired"],
                   injected_index=data["injected_index"],
                   replaced=None if data["replaced"] is None else Sample.from_plain(data["replaced"]),
                   rephrases=[Sample.from_plain(s) for s in data["rephrases"]])

    @property
    def rewards(self) -> list[float]:
        return [s.reward for s in self.samples]

    @property
    def grpo_samples(self) -> list[Sample]:
        """The samples normalised together by GRPO (replayed ones get their own statistics)."""
        return [s for s in self.samples if not s.is_replay]


@dataclass
class RolloutBatch:
    """What one call of the rollout stage returns: the groups to train on and step metrics;
    ``sampled`` holds every group sampled in the step, kept or dropped by dynamic sampling
    (for per-source metrics and the hard-sample ledger)."""
    groups: list[Group]
    metrics: dict[str, float]
    sampled: list[Group] = field(default_factory=list)
