"""Deterministic stand-ins for the stage's collaborators: a byte tokenizer, a scripted engine
whose responses depend only on (prompt text, seed), and an in-process scorer."""

from __future__ import annotations

import random
from typing import Callable

from repo_megatron.config.algorithm import (AlgorithmConfig, DynamicSamplingConfig, RePOConfig,
                                            ReplayConfig)
from repo_megatron.config.rollout import RolloutConfig
from repo_megatron.data.chat import ChatFormatter
from repo_megatron.engines.base import GenerationResult, GenerationStream, RolloutEngine
from repo_megatron.rewards.base import call_reward, resolve_reward
from repo_megatron.rollout.stage import RolloutStage
from repo_megatron.rollout.types import Prompt

EOS = 256


class ByteTokenizer:
    """Token id = byte value; 256 is EOS."""
    eos_token_id = EOS
    pad_token_id = EOS

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        return list(text.encode())

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        return bytes(i for i in ids if i < 256).decode(errors="replace")


FORMATTER = ChatFormatter(ByteTokenizer(), apply_chat_template=False)

Script = Callable[[str, random.Random], str]


class ScriptedEngine(RolloutEngine):
    """``script(prompt text, rng seeded by the request seed) -> response text``."""

    def __init__(self, script: Script):
        self.script = script
        self.calls: list[list[str]] = []    # prompt texts of each generate() call
        self._version = 0

    @property
    def weight_version(self) -> int:
        return self._version

    def generate(self, prompts, params):
        texts = [FORMATTER.tokenizer.decode(p) for p in prompts]
        self.calls.append(texts)
        results = []
        for text, p in zip(texts, params):
            response = self.script(text, random.Random(p.seed))
            ids = FORMATTER.response_ids(response, eos=True)
            results.append(GenerationResult(ids, response, [-0.5] * len(ids), "stop",
                                            self._version, EOS))
        return results

    def update_weights(self, named_tensors, version=None):
        self._version = self._version + 1 if version is None else version


class OneAtATimeStream(GenerationStream):
    """Finishes one submitted request per :meth:`wait`: the one ``engine.priority`` ranks
    first (lowest key); records ``("submit" | "finish", prompt text)`` in ``engine.events``."""

    def __init__(self, engine: "StreamingEngine"):
        self.engine, self.pending, self.next_ticket = engine, {}, 0

    def submit(self, prompt, params):
        text = FORMATTER.tokenizer.decode(prompt)
        self.engine.events.append(("submit", text))
        self.pending[self.next_ticket] = (prompt, params, text)
        self.next_ticket += 1
        return self.next_ticket - 1

    def wait(self):
        if not self.pending:
            return []
        ticket = min(self.pending, key=lambda t: self.engine.priority(self.pending[t][2], t))
        prompt, params, text = self.pending.pop(ticket)
        self.engine.events.append(("finish", text))
        return [(ticket, self.engine.generate([prompt], [params])[0])]


class StreamingEngine(ScriptedEngine):
    """A :class:`ScriptedEngine` whose stream returns requests one by one, in the order
    ``priority(prompt text, ticket)`` gives (default: submission order)."""

    def __init__(self, script: Script, priority=None):
        super().__init__(script)
        self.priority = priority or (lambda text, ticket: ticket)
        self.events: list[tuple[str, str]] = []

    def stream(self):
        return OneAtATimeStream(self)


class InProcessScorer:
    """Scores with a registered reward in this process (the stage only needs ``score``)."""

    def __init__(self, reward: str = "exact"):
        self.fn = resolve_reward(reward)

    def score(self, requests):
        return [call_reward(self.fn, r) for r in requests]


def prompt(uid: str, question: str, answer: str, solution=None) -> Prompt:
    return Prompt(uid=uid, question=question, answer=answer,
                  prompt_ids=tuple(FORMATTER.prompt_ids(question)), solution=solution)


def make_stage(script: Script, *, group_size: int = 4, injection: str = "repo", seed: int = 7,
               rewards=None, repo: dict = None, replay: dict = None, dynamic: dict = None,
               engine: RolloutEngine = None):
    """A stage over ``engine`` (default: a :class:`ScriptedEngine` of ``script``); returns
    (stage, engine). The RePO schedule is ``lazy`` unless ``repo`` names one (one round trip
    per phase, which the engine-call counts here assume; the schedules are compared in
    test_stage.py)."""
    algorithm = AlgorithmConfig(injection=injection,
                                repo=RePOConfig(**{"schedule": "lazy", **(repo or {})}),
                                replay=ReplayConfig(**(replay or {})),
                                dynamic_sampling=DynamicSamplingConfig(**(dynamic or {})))
    engine = engine or ScriptedEngine(script)
    stage = RolloutStage(engine, FORMATTER, rewards or InProcessScorer(),
                         RolloutConfig(group_size=group_size), algorithm, seed=seed)
    return stage, engine


def is_rephrase_prompt(text: str) -> bool:
    return "Reference solution:" in text
