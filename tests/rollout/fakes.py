"""Deterministic stand-ins for the stage's collaborators: a byte tokenizer, a scripted engine
whose responses depend only on (prompt text, seed), and an in-process scorer."""

from __future__ import annotations

import random
from typing import Callable

from repo_megatron.config.algorithm import (AlgorithmConfig, DynamicSamplingConfig, RePOConfig,
                                            ReplayConfig)
from repo_megatron.config.rollout import RolloutConfig
from repo_megatron.data.chat import ChatFormatter
from repo_megatron.rewards.base import call_reward, resolve_reward
from repo_megatron.rollout.engine import GenerationResult, RolloutEngine
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
               rewards=None, repo: dict = None, replay: dict = None, dynamic: dict = None):
    """A stage over a :class:`ScriptedEngine`; returns (stage, engine)."""
    algorithm = AlgorithmConfig(injection=injection, repo=RePOConfig(**(repo or {})),
                                replay=ReplayConfig(**(replay or {})),
                                dynamic_sampling=DynamicSamplingConfig(**(dynamic or {})))
    engine = ScriptedEngine(script)
    stage = RolloutStage(engine, FORMATTER, rewards or InProcessScorer(),
                         RolloutConfig(group_size=group_size), algorithm, seed=seed)
    return stage, engine


def is_rephrase_prompt(text: str) -> bool:
    return "Reference solution:" in text
