"""What each rank contributes to the rollout, behind one interface.

The session (:mod:`.session`) makes the same calls on every rank and never asks which rank it
runs on: the choice is made once, when the session is built. Rank 0 holds an
:class:`EngineRollout` (the tokenizer, the prompts, the rollout engine, the rewards and the RePO
stage); every other rank holds a :class:`NoRollout`, whose calls do nothing, and waits for rank
0's results on the control plane; the dry run gives rank 0 a
:class:`~repo_megatron.run.dry_run.SyntheticRollout` instead. The session wraps rank 0's side in
an :class:`~.async_rollout.AsyncRollout`, which runs its rollouts ahead of the trainer when
``rollout.max_staleness > 0``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from abc import ABC, abstractmethod
from statistics import fmean
from typing import Optional

from ..config import Config
from ..data.run_data import RunData
from ..metrics.ledger import LEDGER_FILE, HardSampleLedger
from ..metrics.sources import source_metrics
from ..rewards.scorers import build_rewards, scorer_metrics
from ..rollout.types import Group
from .prompts import MixtureSampler

log = logging.getLogger(__name__)

# (groups to train on, rollout metrics) of one step
RolloutResult = tuple[list[Group], dict]


def write_hf_export(weights: dict, out: str, hf_config, tokenizer) -> None:
    """``weights`` (HF name -> tensor) as safetensors with the model's config and tokenizer in
    ``out``: written aside, then swapped in whole, so a reader never sees a mix of two
    exports."""
    from ..convert.output import atomic_directory
    from ..convert.safetensors_io import write_safetensors

    with atomic_directory(out, overwrite=True, flag="export") as tmp:
        write_safetensors(tmp, weights.items(), max_shard_bytes=4 << 30)
        hf_config.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    log.info("Exported Hugging Face weights to %s", out)


class RolloutSide(ABC):
    """One rank's part of the rollout. ``engine`` is the rollout engine the weight sync feeds
    from this rank (None where there is none)."""

    engine = None

    @abstractmethod
    def rollout(self, step: int) -> Optional[RolloutResult]:
        """The groups and rollout metrics of ``step`` (None on ranks that do not roll out)."""

    @abstractmethod
    def evaluate(self) -> dict:
        """Evaluation metrics under the current engine weights (empty where none)."""

    @abstractmethod
    def state(self) -> dict:
        """What a checkpoint keeps of this side (plain data: checkpoints are loaded with
        ``weights_only``); merged into the trainer state."""

    @abstractmethod
    def load_state(self, state: dict) -> None:
        """Restore :meth:`state` from a checkpoint's trainer state."""

    @abstractmethod
    def export(self, weights: dict, out: str) -> None:
        """Write the Hugging Face export of ``weights`` (HF name -> tensor) to ``out``."""

    def ahead(self, step: int) -> None:
        """Start the rollouts of the steps after ``step`` in the background, as far as
        ``rollout.max_staleness`` allows (:class:`~.async_rollout.AsyncRollout`); by default
        none runs ahead."""

    def wait(self) -> None:
        """Return once no rollout runs in the background (by default none does)."""

    def close(self) -> None:
        """Stop whatever this side started."""


class NoRollout(RolloutSide):
    """The rollout side of a rank that does not roll out: every call does nothing."""

    def rollout(self, step: int) -> None:
        return None

    def evaluate(self) -> dict:
        return {}

    def state(self) -> dict:
        return {}

    def load_state(self, state: dict) -> None:
        pass

    def export(self, weights: dict, out: str) -> None:
        pass


class EngineRollout(RolloutSide):
    """Rank 0's half of the run: tokenizer, prompts, the rollout engine the config asks for
    (:mod:`repo_megatron.engines.factory`, after any SGLang servers this run launches are up),
    rewards, the RePO stage."""

    def __init__(self, cfg: Config, data: RunData):
        from ..engines.factory import build_engine, hf_config
        from ..rollout.stage import RolloutStage

        self.cfg = cfg
        self.engine = self.servers = None
        self.hf_config = hf_config(cfg)
        # started first: the reward workers import the reward while the engine is built
        self.rewards = build_rewards(cfg.data, {s.name: s.reward for s, _ in data.sources},
                                     log_dir=os.path.join(cfg.run_dir, "judge_servers"))
        tokenizer, self.formatter = data.tokenizer, data.formatter
        self.sampler = MixtureSampler({s.name: (prompts, s.weight) for s, prompts in data.sources},
                                      cfg.seed, cfg.data.shuffle)
        self.ledger = HardSampleLedger(cfg.algorithm.repo.reward_threshold)
        self.eval_prompts = data.eval_prompts
        try:
            if cfg.rollout.sglang.launch.num_servers > 0:  # SGLang servers this run starts
                cfg = self._launch_servers(cfg)
            self.engine = build_engine(cfg, tokenizer, self.hf_config)
        except BaseException:
            self.close()
            raise
        self.stage = RolloutStage(self.engine, self.formatter, self.rewards, cfg.rollout,
                                  cfg.algorithm, seed=cfg.seed)

    def _launch_servers(self, cfg: Config) -> Config:
        """Start ``rollout.sglang.launch`` servers (and router); the config pointing at them."""
        from ..engines.sglang.launcher import ServerLauncher

        sg = cfg.rollout.sglang
        self.servers = ServerLauncher(dataclasses.replace(sg.launch, args=sg.server_args),
                                      log_dir=os.path.join(cfg.run_dir, "servers"))
        try:
            urls, router_url = self.servers.start()
        except BaseException:
            self.servers.stop()
            raise
        sg = dataclasses.replace(sg, urls=urls, router_url=router_url)
        return dataclasses.replace(cfg, rollout=dataclasses.replace(cfg.rollout, sglang=sg))

    def rollout(self, step: int) -> RolloutResult:
        n = self.cfg.rollout.prompts_per_step
        batch = self.stage.run(self.sampler.take(n), step, refill=self.sampler.take)
        self.engine.release_memory()          # colocated servers free their GPU for training
        threshold = self.cfg.algorithm.repo.reward_threshold
        metrics = {**batch.metrics, **scorer_metrics(self.rewards),
                   **self.ledger.record(step, batch.sampled)}
        if len(self.sampler.names) > 1:
            metrics.update(source_metrics(batch.sampled, batch.groups, self.sampler.names,
                                          threshold))
        self.ledger.export(self.ledger_path, step)
        return batch.groups, metrics

    @property
    def ledger_path(self) -> str:
        return os.path.join(self.cfg.run_dir, LEDGER_FILE)

    def evaluate(self) -> dict:
        """Solve rate of greedy answers on the held-out prompts (the hard-set solve rate)."""
        from ..rewards.base import RewardRequest
        from ..rollout.stage import sampling_params

        if not self.eval_prompts:
            return {}
        params = sampling_params(self.cfg.rollout)
        greedy = type(params)(**{**params.__dict__, "temperature": 0.0, "seed": 0})
        results = self.engine.generate([list(p.prompt_ids) for p in self.eval_prompts],
                                       [greedy] * len(self.eval_prompts))
        scores = self.rewards.score([RewardRequest.for_prompt(p, r.text)
                                     for p, r in zip(self.eval_prompts, results)])
        threshold = self.cfg.algorithm.repo.reward_threshold
        return {"eval/solve_rate": fmean(s.value >= threshold for s in scores),
                "eval/prompts": float(len(scores))}

    def export(self, weights: dict, out: str) -> None:
        write_hf_export(weights, out, self.hf_config, self.formatter.tokenizer)

    def state(self) -> dict:
        replay = self.stage.replay
        return {"sampler": self.sampler.state(),
                "replay": replay.state() if replay is not None else None,
                "ledger": self.ledger.state(), "injection": self.stage.injection.state()}

    def load_state(self, state: dict) -> None:
        self.sampler.load_state(state["sampler"])
        if self.stage.replay is not None and state.get("replay") is not None:
            self.stage.replay.load_state(state["replay"])
        self.ledger.load_state(state.get("ledger"))
        self.stage.injection.load_state(state.get("injection") or {})
        self.ledger.export(self.ledger_path)    # drop what a killed run recorded after it

    def close(self) -> None:
        """Stop the reward workers, judge servers, engine and rollout servers (whatever was
        started)."""
        if self.rewards is not None:
            self.rewards.close()
        if hasattr(self.engine, "close"):
            self.engine.close()
        if self.servers is not None:
            self.servers.stop()
