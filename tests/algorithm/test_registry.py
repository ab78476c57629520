import dataclasses

import pytest
import torch

from repo_megatron.algorithm import (ADVANTAGE_ESTIMATORS, AGG_MODES, KL_ESTIMATORS,
                                     POLICY_LOSSES, LossParams, compute_advantages,
                                     compute_policy_loss, get_advantage_estimator,
                                     get_policy_loss, grpo_advantages, ppo_clip_loss,
                                     register_advantage_estimator, register_policy_loss)
from repo_megatron.config.algorithm import AlgorithmConfig
from repo_megatron.config.base import build
from repo_megatron.errors import ConfigError
from repo_megatron.registry import Registry

from .inputs import random_batch


def test_builtin_variants_are_registered_under_their_config_names():
    assert get_policy_loss("ppo_clip") is ppo_clip_loss
    assert get_advantage_estimator("grpo") is grpo_advantages
    assert {"grpo", "drgrpo"} <= set(ADVANTAGE_ESTIMATORS)


def test_unknown_name_error_names_the_config_key_and_lists_registered_names():
    with pytest.raises(ConfigError, match=r"algorithm\.policy_loss=gspo is not a registered "
                                          r"policy loss \(registered: .*ppo_clip"):
        get_policy_loss("gspo")
    with pytest.raises(ConfigError, match=r"algorithm\.advantage_estimator=rloo.*drgrpo, grpo"):
        compute_advantages(torch.ones(2, 2), estimator="rloo")


@pytest.fixture
def scratch_registries(monkeypatch):
    """Let a test register variants without leaving them behind."""
    monkeypatch.setattr(POLICY_LOSSES, "_entries", dict(POLICY_LOSSES._entries))
    monkeypatch.setattr(ADVANTAGE_ESTIMATORS, "_entries", dict(ADVANTAGE_ESTIMATORS._entries))


def test_a_decorated_policy_loss_is_selectable_by_name(scratch_registries):
    @register_policy_loss("reinforce")
    def reinforce(logprobs, old_logprobs, advantages, mask, params):
        return torch.where(mask, -advantages * logprobs, 0.0), {}

    batch = random_batch(0)
    loss, metrics = compute_policy_loss(batch["logprobs"], batch["old_logprobs"],
                                        batch["advantages"], batch["response_mask"],
                                        params=LossParams(policy_loss="reinforce"))
    mask = batch["response_mask"]
    expected = (-batch["advantages"][:, None] * batch["logprobs"])[mask].sum() / mask.sum()
    torch.testing.assert_close(loss, expected)
    assert set(metrics) == {"pg_loss"}


def test_a_decorated_advantage_estimator_is_selectable_by_name(scratch_registries):
    @register_advantage_estimator("sign")
    def sign(rewards, group_index, num_groups, eps):
        return torch.sign(rewards - 0.5)

    advantages = compute_advantages(torch.tensor([[1.0, 0.0], [0.0, 0.0]]), estimator="sign")
    assert advantages.tolist() == [[1.0, -1.0], [-1.0, -1.0]]


def test_a_name_cannot_be_registered_twice():
    registry = Registry("policy loss", "algorithm.policy_loss")
    registry.register("mine")(ppo_clip_loss)
    with pytest.raises(ValueError, match="'mine' is already registered by .*ppo_clip_loss"):
        registry.register("mine")(grpo_advantages)


def test_config_rejects_unregistered_names_naming_the_key():
    with pytest.raises(ConfigError, match=r"algorithm\.advantage_estimator=rloo is not a "
                                          r"registered advantage estimator \(registered: drgrpo"):
        build(AlgorithmConfig, {"advantage_estimator": "rloo"}, "algorithm")
    with pytest.raises(ConfigError, match=r"algorithm\.policy_loss=gspo .*ppo_clip"):
        build(AlgorithmConfig, {"policy_loss": "gspo"}, "algorithm")


def test_config_choices_are_the_ones_the_library_implements():
    fields = {f.name: f for f in dataclasses.fields(AlgorithmConfig)}
    assert tuple(fields["loss_agg_mode"].metadata["choices"]) == AGG_MODES
    assert tuple(fields["kl_estimator"].metadata["choices"]) == KL_ESTIMATORS


def test_loss_params_from_config_resolve_a_null_norm_length_to_the_generation_budget():
    cfg = build(AlgorithmConfig, {"loss_agg_mode": "seq-mean-token-sum-norm", "dual_clip": 3,
                                  "luffy": {"shaping_gamma": 0.5}, "replay": {"coef": 0.3}},
                "algorithm")
    params = LossParams.from_config(cfg, max_new_tokens=1024)
    assert (params.loss_norm_length, params.dual_clip, params.luffy_shaping_gamma,
            params.replay_coef, params.clip_high) == (1024, 3.0, 0.5, 0.3, 0.28)
    assert (params.log_ratio_clamp, params.kl_k3_clamp) == (20.0, 10.0)  # verl's values


def test_loss_params_from_config_carry_null_clamps_as_off():
    cfg = build(AlgorithmConfig, {"log_ratio_clamp": None, "kl_k3_clamp": 5}, "algorithm")
    params = LossParams.from_config(cfg)
    assert (params.log_ratio_clamp, params.kl_k3_clamp) == (None, 5.0)


@pytest.mark.parametrize("bad", [dict(dual_clip=1.0), dict(kl_estimator="k4"),
                                 dict(loss_agg_mode="sum"), dict(clip_low=1.5),
                                 dict(loss_agg_mode="seq-mean-token-sum-norm"),
                                 dict(log_ratio_clamp=0.0), dict(kl_k3_clamp=-1.0)])
def test_loss_params_reject_invalid_values(bad):
    with pytest.raises(ValueError, match=next(iter(bad))):
        LossParams(**bad)
