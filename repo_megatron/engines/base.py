"""The rollout engine interface: what every engine must do for the RePO stage and the trainer.

Two implementations: the embedded CPU engine (:mod:`.embedded`, a transformers model in the
trainer process) and an SGLang HTTP client (:mod:`.sglang`). Requests go in batches
(:meth:`RolloutEngine.generate`, one call per round, so a client can keep all servers busy) or
through a :class:`GenerationStream`, where requests join while others run and come back as they
finish (the RePO stage sends a group's rephrase requests as soon as the group is scored). Every
request carries its own seed, so the samples do not depend on how requests are batched,
ordered, routed or timed. New weights arrive as Hugging Face-named tensors
(:meth:`RolloutEngine.update_weights`) or, for an engine that names its own
``weight_sync_strategy``, the way that strategy of :mod:`repo_megatron.weight_sync` takes them.
"""

from __future__ import annotations

import abc
import concurrent.futures
import itertools
from dataclasses import dataclass, replace
from typing import Callable, Iterable, Optional, Sequence

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


class GenerationStream(abc.ABC):
    """Requests in flight on one engine: :meth:`submit` them at any time, :meth:`wait` for the
    ones that have finished. Use it as a context manager (:meth:`close` drops what is left)."""

    @abc.abstractmethod
    def submit(self, prompt: Sequence[int], params: SamplingParams) -> int:
        """Queue one request; returns its ticket."""

    @abc.abstractmethod
    def wait(self) -> list[tuple[int, GenerationResult]]:
        """Block until at least one submitted request has finished; returns every finished
        request not returned before as ``(ticket, result)``, or ``[]`` when none is pending."""

    def close(self) -> None:
        """Forget the requests not returned yet."""

    def __enter__(self) -> "GenerationStream":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class RoundStream(GenerationStream):
    """A stream over a batch-only engine: :meth:`wait` generates everything submitted since
    the previous wait in one :meth:`RolloutEngine.generate` call (so requests submitted while
    a round runs form the next round)."""

    def __init__(self, engine: "RolloutEngine"):
        self.engine = engine
        self.pending: list[tuple[int, Sequence[int], SamplingParams]] = []
        self.tickets = itertools.count()

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> int:
        ticket = next(self.tickets)
        self.pending.append((ticket, prompt, params))
        return ticket

    def wait(self) -> list[tuple[int, GenerationResult]]:
        batch, self.pending = self.pending, []
        if not batch:
            return []
        results = self.engine.generate([p for _, p, _ in batch], [q for _, _, q in batch])
        return [(ticket, result) for (ticket, _, _), result in zip(batch, results)]

    def close(self) -> None:
        self.pending = []


class FutureStream(GenerationStream):
    """A stream over an engine whose requests run concurrently on their own (an HTTP client
    with its own event loop): ``start(prompt, params)`` launches one request and returns its
    :class:`concurrent.futures.Future`."""

    def __init__(self, start: Callable[[Sequence[int], SamplingParams],
                                       "concurrent.futures.Future[GenerationResult]"]):
        self.start = start
        self.running: dict["concurrent.futures.Future[GenerationResult]", int] = {}
        self.tickets = itertools.count()

    def submit(self, prompt: Sequence[int], params: SamplingParams) -> int:
        ticket = next(self.tickets)
        self.running[self.start(prompt, params)] = ticket
        return ticket

    def wait(self) -> list[tuple[int, GenerationResult]]:
        if not self.running:
            return []
        done, _ = concurrent.futures.wait(self.running,
                                          return_when=concurrent.futures.FIRST_COMPLETED)
        # results in submission order; the first failure is raised as it was
        return [(self.running.pop(f), f.result())
                for f in sorted(done, key=self.running.__getitem__)]

    def close(self) -> None:
        for future in self.running:
            future.cancel()
        self.running = {}


class RolloutEngine(abc.ABC):
    """Samples responses for batches of tokenised prompts and accepts new weights."""

    @abc.abstractmethod
    def generate(self, prompts: Sequence[Sequence[int]],
                 params: Sequence[SamplingParams]) -> list[GenerationResult]:
        """One result per prompt, in order; ``params[i]`` applies to ``prompts[i]``."""

    def stream(self) -> GenerationStream:
        """A :class:`GenerationStream` on this engine. Engines that can take requests while
        others run override it; the default runs rounds of :meth:`generate` calls."""
        return RoundStream(self)

    @abc.abstractmethod
    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]],
                       version: Optional[int] = None) -> None:
        """Load Hugging Face-named tensors (all or a subset of the model's) and set the weight
        version (default: the current one + 1)."""

    def release_memory(self) -> None:
        """Free what the engine holds on the trainer's GPUs while the trainer trains (a
        colocated SGLang server); the next update or generation takes it back. Default:
        nothing to free."""

    # Whether a weight update ends by taking back the memory generation needs (SGLang's KV
    # cache and CUDA graphs). A colocated run whose trainer leaves the GPU for the rollout sets
    # it False (repo_megatron.run.colocation): that memory then comes back at the next
    # generation, once the trainer has let go of the GPU, not while it still holds it.
    generation_memory_after_update: bool = True

    _version: int = 0  # implementations bump it when they load new weights

    @property
    def weight_version(self) -> int:
        """Version of the weights that the next :meth:`generate` call samples with."""
        return self._version

    def set_weight_version(self, version: int) -> None:
        """Record that the engine now serves weight ``version`` (a weight update that the
        engine does not carry out itself calls it once the update has finished)."""
        self._version = version

    # How the trainer's weights reach this engine: a strategy class of repo_megatron.weight_sync
    # (its trainer side streams the pipeline stages' buckets). None: the embedded way, every
    # stage's buckets to rank 0, whose engine loads them through update_weights.
    weight_sync_strategy: Optional[type] = None
