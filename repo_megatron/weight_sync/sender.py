"""One pipeline stage's sender: pushes that stage's buckets to every worker of a plan with the
configured strategy, on its own HTTP client and event loop (a sender need not be the rank that
holds the engine)."""

from __future__ import annotations

from typing import Any, Iterable, Optional

from ..config.rollout import SGLangConfig
from ..engines.sglang.client import LoopThread, SGLangClient
from .base import SyncPlan, SyncTarget
from .buckets import Bucket
from .registry import STRATEGIES


def make_client(cfg: SGLangConfig) -> SGLangClient:
    return SGLangClient(cfg.request_timeout_s, cfg.max_concurrency_per_server, cfg.max_retries,
                        cfg.retry_backoff_s)


class StageSender:
    """Sender of pipeline stage ``stage``. ``loop``/``client``: share the engine's (the
    engine's rank sends stage 0) instead of owning new ones."""

    def __init__(self, cfg: SGLangConfig, stage: int = 0, loop: Optional[LoopThread] = None,
                 client: Optional[SGLangClient] = None):
        self.cfg, self.stage = cfg, stage
        self.strategy = STRATEGIES.get(cfg.weight_sync)(cfg, stage)
        self.owns_loop = loop is None
        self.loop = loop or LoopThread(f"sglang-sender-pp{stage}")
        self.client = client or make_client(cfg)
        self.last: Optional[SyncTarget] = None

    def target(self, plan: SyncPlan) -> SyncTarget:
        return SyncTarget(self.client, plan, self.stage)

    def send(self, plan: SyncPlan, buckets: Iterable[Bucket]) -> Any:
        """Push every bucket of ``buckets`` (consumed here, one at a time); returns the
        strategy's result for this stage."""
        target = self.target(plan)
        self.last = target
        self.loop.run(self.strategy.prepare(target))
        for bucket in buckets:
            self.loop.run(self.strategy.push(target, bucket))
            del bucket                    # keep one bucket alive while the next one fills
        return self.strategy.stage_result()

    def close(self) -> None:
        """Release what the strategy holds (process groups) and the loop if it is ours."""
        if self.loop.closed:
            return
        if self.last is not None:
            self.loop.run(self.strategy.close(self.last))
        if self.owns_loop:
            self.loop.run(self.client.aclose())
            self.loop.close()
