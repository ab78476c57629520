"""``algorithm:`` GRPO / RePO / LUFFY / Replay, advantages and the loss."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from ..algorithm.registry import ADVANTAGE_ESTIMATORS, POLICY_LOSSES
from ..errors import ConfigError
from ..rollout.injection.registry import INJECTIONS
from ..rollout.replay.registry import RETRIEVALS
from .base import knob, section

DEFAULT_REPHRASE_TEMPLATE = (
    "Here is a problem and a reference solution written by an expert.\n\n"
    "Problem:\n{question}\n\n"
    "Reference solution:\n{solution}\n\n"
    "Study the reference until you understand it. Then solve the problem yourself, in your own "
    "words and in your usual format, as if you had never seen the reference: do not mention it, "
    "and end with the final answer."
)

DEFAULT_META_PATTERNS = [
    r"(?im)^\s*(sure|okay|ok|certainly|of course)[,!.].*$",
    r"(?i)\b(as|like) (shown|given|stated|done) in the (reference|expert'?s?) solution,?\s*",
    r"(?i)\b(according to|following|based on) the (reference|expert'?s?) solution,?\s*",
    r"(?i)\bthe (reference|expert'?s?) solution (says|shows|states) that\s*",
    # then whole lines that still talk about the reference (seen from SmolLM2: "I'll provide a
    # reference that...", "I will not mention the reference in my answer")
    r"(?im)^.*\b(reference|expert)\b.*$",
]


@dataclass
class RePOConfig:
    reward_threshold: float = knob(
        0.5, "delta: a response with reward < delta counts as failed (ours: rewards are 0/1)")
    failure_rate_threshold: float = knob(
        1.0, "rho: rephrase and inject when the group's failure rate gamma >= rho (ours: only "
             "groups that failed entirely, where GRPO has no signal)", ge=0, le=1)
    schedule: str = knob("auto", "`lazy`: rephrase once every group is gated (one more round); "
                                 "`overlap`: rephrase a group as soon as its own rollouts are "
                                 "scored and its gate fires, while others still decode; `eager`: "
                                 "rephrase alongside the rollouts, discard if the gate stays shut "
                                 "(wasted tokens, no wait); `auto`: eager for prompts whose "
                                 "gate is likely to fire (their last group tripped it; unseen "
                                 "ones when half the last round's groups did, and all before the "
                                 "first round), overlap for the "
                                 "rest", choices=["lazy", "overlap", "eager", "auto"])
    rephrase_template: str = knob(DEFAULT_REPHRASE_TEMPLATE,
                                  "Prompt P(q, k); {question} and {solution} are filled in")
    meta_patterns: list[str] = knob(default_factory=lambda: list(DEFAULT_META_PATTERNS),
                                    help="Regular expressions removed from rephrased traces")
    require_verified: bool = knob(True, "Inject only rephrases with reward >= delta")
    num_rephrase_attempts: int = knob(1, "Rephrases sampled per tripped gate; the highest-"
                                         "reward one (the first on ties) is injected", ge=1)


@dataclass
class LuffyConfig:
    shaping_gamma: float = knob(0.1, "Policy shaping f(p) = p / (p + gamma) on off-policy "
                                     "tokens", gt=0)


@dataclass
class ReplayConfig:
    enabled: bool = knob(False, "Replay-Enhanced PO: add past samples from a per-prompt buffer")
    buffer_size: int = knob(16, "Samples kept per prompt (FIFO)", ge=1)
    strategy: str = knob("recency", "Which past samples to replay", choices=RETRIEVALS)
    samples_per_prompt: int = knob(2, "Replayed samples added to each group", ge=1)
    min_buffer_size: int = knob(2, "Replay only once a prompt has this many past samples", ge=1)
    coef: float = knob(1.0, "Weight of the off-policy loss term", ge=0)
    clip: float = knob(0.2, "Clip of the importance ratio pi_theta / pi_behaviour", gt=0)


@dataclass
class DynamicSamplingConfig:
    enabled: bool = knob(False, "Drop groups whose rewards have zero variance (after injection)")
    max_oversample_rounds: int = knob(0, "Extra rollout rounds to refill the batch", ge=0)


@dataclass
class AlgorithmConfig:
    injection: str = knob("repo", "`repo` (rephrase + inject), `none` (GRPO), `luffy` (raw "
                                  "expert trace joins the group)", choices=INJECTIONS)
    advantage_estimator: str = knob("grpo", "Registered advantage estimator (`grpo` = "
                                            "mean/std in the group, `drgrpo` = no std; "
                                            "docs/algorithm.md)", choices=ADVANTAGE_ESTIMATORS)
    advantage_eps: float = knob(1e-6, "Added to the group std by `grpo`", gt=0)
    policy_loss: str = knob("ppo_clip", "Registered policy loss of on-policy tokens "
                                        "(docs/algorithm.md)", choices=POLICY_LOSSES)
    clip_low: float = knob(0.2, "PPO clip: ratio >= 1 - clip_low", ge=0, le=1)
    clip_high: float = knob(0.28, "PPO clip: ratio <= 1 + clip_high (clip-higher)", ge=0)
    dual_clip: Optional[float] = knob(None, "Dual-clip constant c > 1: the loss of a token with "
                                            "A < 0 is capped at -A*c (null = off)", gt=1)
    kl_coef: float = knob(0.0, "beta: KL to the reference policy (0 = no reference model)", ge=0)
    kl_estimator: str = knob("k3", "KL estimator", choices=["k1", "k2", "k3"])
    log_ratio_clamp: Optional[float] = knob(
        20.0, "Log-ratios are clamped to [-c, c] before exp: PPO's pi_theta / pi_old, replay's "
              "pi_theta / pi_behaviour and k3's (verl's 20; null = off; docs/algorithm.md)", gt=0)
    kl_k3_clamp: Optional[float] = knob(
        10.0, "The k3 KL estimate of each token is clamped to [-c, c] (verl's 10; null = off)",
        gt=0)
    entropy_coef: float = knob(0.0, "Entropy bonus coefficient", ge=0)
    loss_agg_mode: str = knob("token-mean", "Loss aggregation",
                              choices=["token-mean", "seq-mean-token-mean",
                                       "seq-mean-token-sum", "seq-mean-token-sum-norm"])
    loss_norm_length: Optional[int] = knob(
        None, "seq-mean-token-sum-norm divides by this (null = rollout.max_new_tokens)", ge=1)
    tis_cap: Optional[float] = knob(
        None, "Truncated importance sampling: weight on-policy tokens by min(pi_old / "
              "pi_rollout, cap) to correct the rollout engine's numerical mismatch (null = off)",
        gt=0)
    stale_tis_cap: Optional[float] = knob(
        2.0, "Correction of stale samples (rollout.max_staleness > 0): tokens of an on-policy "
             "rollout generated by an older weight version than the one trained are weighted "
             "by min(pi_old / pi_behaviour, cap), pi_old the log-probs Megatron recomputes "
             "before the update (decoupled PPO's proximal policy, truncated as in TIS); "
             "rollouts of the current version take tis_cap (null: stale ones too; "
             "docs/algorithm.md)", gt=0)
    ppo_epochs: int = knob(1, "Optimizer passes over each rollout batch", ge=1)
    global_batch_size: Optional[int] = knob(
        None, "Sequences per optimizer step (null = the whole rollout batch)", ge=1)
    micro_batch_size: int = knob(4, "Sequences per forward/backward micro-batch (without "
                                    "max_tokens_per_microbatch)", ge=1)
    max_tokens_per_microbatch: Optional[int] = knob(
        None, "Token budget of a micro-batch: the step's sequences are balanced over the DP "
              "ranks by tokens, sorted by length and binned so that no micro-batch computes "
              "more positions (rows x padded length, or the packed row) than this; a longer "
              "sequence runs alone. Old, reference log-probs and the loss use the same "
              "micro-batches (null = micro_batch_size sequences each; docs/training.md)", ge=2)
    microbatch_overhead_tokens: int = knob(
        64, "With max_tokens_per_microbatch, unpacked: what one more micro-batch costs, in "
            "padded positions (its kernel launches, pipeline exchanges, loss bookkeeping); the "
            "planner cuts the length-sorted sequences where computed positions plus this per "
            "micro-batch are least (0 = only padding counts: every distinct length may run "
            "alone)", ge=0)
    strict_token_budget: bool = knob(
        False, "A sequence that does not fit max_tokens_per_microbatch alone stops the run "
               "with an error instead of running in a micro-batch of its own")
    sequence_packing: bool = knob(
        False, "Run each micro-batch's sequences as one packed row: THD with cu_seqlens under "
               "Transformer Engine, a block-diagonal causal mask on the local spec; positions "
               "restart per sequence, log-probs are unpacked per sequence (docs/training.md)")
    repo: RePOConfig = section(RePOConfig, "The RePO gate, rephrasing and injection")
    luffy: LuffyConfig = section(LuffyConfig, "LUFFY-style off-policy guidance")
    replay: ReplayConfig = section(ReplayConfig, "Replay-Enhanced Policy Optimization")
    dynamic_sampling: DynamicSamplingConfig = section(DynamicSamplingConfig, "Dynamic sampling")

    def validate(self, path: str) -> None:
        if self.strict_token_budget and self.max_tokens_per_microbatch is None:
            raise ConfigError(f"{path}.strict_token_budget=true needs "
                              f"{path}.max_tokens_per_microbatch")
        if self.injection == "repo" and "{solution}" not in self.repo.rephrase_template:
            raise ConfigError(f"{path}.repo.rephrase_template must contain {{solution}}")
        if self.injection == "repo" and "{question}" not in self.repo.rephrase_template:
            raise ConfigError(f"{path}.repo.rephrase_template must contain {{question}}")
