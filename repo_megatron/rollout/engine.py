"""The rollout engine interface: what the RePO stage needs from anything that samples tokens.

Two implementations: the embedded CPU engine (:mod:`.hf_engine`, a transformers model in the
trainer process) and an SGLang HTTP client. The interface is batch-oriented -- one call carries
every request of a round, so a client can keep all servers busy -- and every request carries
its own seed, so the samples do not depend on how requests are batched, ordered or routed.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, replace
from typing import Iterable, Optional, Sequence

import torch


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request (SGLang's ``sampling_params`` names where they exist).

    ``temperature == 0`` is greedy. ``top_k == -1`` and ``top_p == 1`` switch those filters off.
    Generation stops at ``max_new_tokens``, at the tokenizer's EOS, at any of ``stop_token_ids``
    or once the decoded response contains one of ``stop``. ``seed`` fixes the sample.
    """
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    max_new_tokens: int = 512
    stop: tuple[str, ...] = ()
    stop_token_ids: tuple[int, ...] = ()
    seed: Optional[int] = None

    def with_seed(self, seed: int) -> "SamplingParams":
        return replace(self, seed=seed)


@dataclass
class GenerationResult:
    """One response: ``token_ids`` (stop token included), ``text`` = their decoding without
    special tokens, ``logprobs[t]`` = log-prob of ``token_ids[t]`` under the temperature-scaled
    distribution before top-k/top-p truncation (what the trainer recomputes), ``finish_reason``
    ``stop`` or ``length``, and the ``weight_version`` that produced it."""
    token_ids: list[int]
    text: str
    logprobs: list[float]
    finish_reason: str
    weight_version: int = 0
    matched_stop: Optional[object] = None  # the stop string or token id that ended it


def check_requests(prompts: Sequence, params: Sequence) -> None:
    """Every engine's ``generate`` precondition: one sampling-params entry per prompt."""
    if len(prompts) != len(params):
        raise ValueError(f"generate: {len(prompts)} prompts but {len(params)} sampling params")


class RolloutEngine(abc.ABC):
    """Samples responses for batches of tokenised prompts and accepts new weights."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams]) -> list[GenerationResult]:
        """One result per prompt, in order; ``params[i]`` applies to ``prompts[i]``."""

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: Optional[int] = None) -> None:
        """Load Hugging Face-named tensors (all or a subset of the model's) and set the weight
        version (default: the current one + 1)."""

    def release_memory(self) -> None:
        """Free what the engine holds on the trainer's GPUs while the trainer trains (a
        colocated SGLang server); the next update or generation takes it back. Default:
        nothing to free."""

    _version: int = 0  # implementations bump it when they load new weights

    @property
    def weight_version(self) -> int:
        """Version of the weights that the next :meth:`generate` call samples with."""
        return self._version
