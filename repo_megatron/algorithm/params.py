"""The knobs of the loss, as one immutable value the per-micro-batch functions receive."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from .aggregation import AGG_MODES
from .kl import KL_ESTIMATORS


@dataclass(frozen=True)
class LossParams:
    """Loss hyper-parameters (the top of ``algorithm:`` in the YAML, plus LUFFY and replay).

    ``clip_low``/``clip_high``: PPO clip range ``[1 - clip_low, 1 + clip_high]`` (DAPO's
    clip-higher when ``clip_high > clip_low``). ``dual_clip``: constant ``c > 1`` bounding the
    loss of negative-advantage tokens (None = off). ``kl_coef``: beta. ``loss_norm_length``:
    the constant ``L`` of ``seq-mean-token-sum-norm``. ``log_ratio_clamp``: bound on every
    log-ratio before ``exp`` (PPO's and replay's ratios, k3); ``kl_k3_clamp``: bound on the k3
    estimate; verl's 20 and 10 by default, None = off.
    """
    policy_loss: str = "ppo_clip"
    clip_low: float = 0.2
    clip_high: float = 0.28
    dual_clip: Optional[float] = None
    kl_coef: float = 0.0
    kl_estimator: str = "k3"
    entropy_coef: float = 0.0
    loss_agg_mode: str = "token-mean"
    loss_norm_length: Optional[int] = None
    luffy_shaping_gamma: float = 0.1
    replay_coef: float = 1.0
    replay_clip: float = 0.2
    log_ratio_clamp: Optional[float] = 20.0
    kl_k3_clamp: Optional[float] = 10.0

    def __post_init__(self) -> None:
        if not 0 <= self.clip_low <= 1 or self.clip_high < 0:
            raise ValueError(f"clip_low={self.clip_low} must be in [0, 1] and "
                             f"clip_high={self.clip_high} >= 0")
        if self.dual_clip is not None and self.dual_clip <= 1:
            raise ValueError(f"dual_clip={self.dual_clip} must be > 1 (or None)")
        if self.kl_estimator not in KL_ESTIMATORS:
            raise ValueError(f"kl_estimator={self.kl_estimator!r} must be one of "
                             f"{', '.join(KL_ESTIMATORS)}")
        if self.loss_agg_mode not in AGG_MODES:
            raise ValueError(f"loss_agg_mode={self.loss_agg_mode!r} must be one of "
                             f"{', '.join(AGG_MODES)}")
        if self.loss_agg_mode == "seq-mean-token-sum-norm" and self.loss_norm_length is None:
            raise ValueError("loss_agg_mode=seq-mean-token-sum-norm needs loss_norm_length")
        if self.luffy_shaping_gamma <= 0:
            raise ValueError(f"luffy_shaping_gamma={self.luffy_shaping_gamma} must be > 0")
        for name in ("log_ratio_clamp", "kl_k3_clamp"):
            if getattr(self, name) is not None and getattr(self, name) <= 0:
                raise ValueError(f"{name}={getattr(self, name)} must be > 0 (or None)")

    @classmethod
    def from_config(cls, algorithm: Any, max_new_tokens: Optional[int] = None) -> "LossParams":
        """From an ``AlgorithmConfig`` (or anything with its attributes).

        ``loss_norm_length: null`` in the config means the generation budget: pass
        ``rollout.max_new_tokens`` as ``max_new_tokens``.
        """
        norm_length = algorithm.loss_norm_length
        return cls(policy_loss=algorithm.policy_loss, clip_low=algorithm.clip_low,
                   clip_high=algorithm.clip_high, dual_clip=algorithm.dual_clip,
                   kl_coef=algorithm.kl_coef, kl_estimator=algorithm.kl_estimator,
                   entropy_coef=algorithm.entropy_coef, loss_agg_mode=algorithm.loss_agg_mode,
                   loss_norm_length=max_new_tokens if norm_length is None else norm_length,
                   luffy_shaping_gamma=algorithm.luffy.shaping_gamma,
                   replay_coef=algorithm.replay.coef, replay_clip=algorithm.replay.clip,
                   log_ratio_clamp=algorithm.log_ratio_clamp, kl_k3_clamp=algorithm.kl_k3_clamp)
