"""The training loop: rollout -> reward -> gate -> rephrase -> inject -> advantages -> train ->
sync -> checkpoint. Each phase is one call into the module that owns it (see session.py).

With ``rollout.max_staleness: k > 0`` the rollouts of the next k steps run on rank 0 while
Megatron trains (:mod:`.async_rollout`): the step takes a batch sampled while the step before
trained, and the weight sync waits for the rollouts in flight. ``k = 0`` is the same sequence
of calls with nothing ahead: the synchronous loop."""

from __future__ import annotations

import time

from tqdm import tqdm

from ..config import Config
from ..runtime.failpoints import failpoint
from .guard import RunGuard
from .session import Session
from .summary import print_run_summary


def train(cfg: Config, resume: bool = False) -> int:
    session = Session(cfg)
    guard = RunGuard(cfg.optimizer.max_nonfinite_steps, cfg.data.max_failed_reward_steps)
    try:
        start = session.restore() if resume else 0
        session.sync_weights()                                  # engine := Megatron's weights
        if start == 0 and not (resume and session.initial_eval_recorded()):
            session.writer.write(0, session.evaluate())
        bar = tqdm(range(start + 1, cfg.train_steps + 1), initial=start, total=cfg.train_steps,
                   desc="RePO", disable=not (session.is_rank0 and cfg.logging.progress_bar))
        for step in bar:
            t0 = time.perf_counter()
            bar.set_postfix_str("rollout")
            groups, metrics = session.rollout(step)             # sample, reward, gate, rephrase, inject
            session.rollout_ahead(step)                         # k > 0: steps up to step+k, meanwhile
            failpoint("after_rollout", step)
            if groups:
                bar.set_postfix_str("train")
                prepared = session.prepare(groups)              # advantages, old/ref log-probs under q
                metrics.update(session.update(prepared))        # ppo_epochs x micro-batched steps
                bar.set_postfix_str("sync")
                metrics.update(session.sync_weights())          # rollouts ahead done; Megatron -> engine
            last = step == cfg.train_steps
            every = cfg.data.eval_interval
            if last or (every and step % every == 0):
                metrics.update(session.evaluate())
            metrics["time/step_s"] = time.perf_counter() - t0
            session.writer.write(step, metrics)
            bar.set_postfix(reward=f"{metrics.get('rollout/reward_onpolicy_mean', 0):.2f}",
                            inject=f"{metrics.get('rollout/injection_rate', 0):.2f}")
            guard.check(step, metrics, failed_reward_reason(groups))  # stop on NaN or dead rewards
            interval = cfg.checkpoint.save_interval
            due = last or (interval and step % interval == 0)
            if due and not metrics.get("train/nonfinite_skipped"):  # never a skipped update's
                session.save(step)
            session.checkpoints.poll()                          # commit a finished background save
            export = cfg.checkpoint.hf_export_interval
            if (last and cfg.checkpoint.hf_export_at_end) or (export and step % export == 0):
                session.export_hf(step)
        if session.is_rank0:
            print_run_summary(cfg)                              # curves + what the run did
        return 0
    finally:
        session.close()


def failed_reward_reason(groups) -> str:
    """One failed reward's reason among ``groups`` (first line, at most 200 characters)."""
    for group in groups or ():
        for sample in [*group.samples, *group.rephrases]:
            if sample.reward_failed:
                return (sample.reward_reason.splitlines() or [""])[0][:200]
    return ""
