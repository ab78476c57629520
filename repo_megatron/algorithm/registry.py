"""The registries of policy losses and advantage estimators, read by name.

A built-in variant is one function in its own file plus one line below, e.g.
``"my_loss": "repo_megatron.algorithm.my_loss:my_loss"``; the YAML then says
``algorithm.policy_loss: my_loss``. Code outside the package registers with a decorator::

    @register_policy_loss("my_loss")
    def my_loss(logprobs, old_logprobs, advantages, mask, params): ...

and must be imported before the config is built. This module imports no variant (and no
torch): the config reads the names from here.
"""

from __future__ import annotations

from typing import Callable, TypeVar

from ..registry import Registry

F = TypeVar("F", bound=Callable)

POLICY_LOSSES: Registry[Callable] = Registry("policy loss", "algorithm.policy_loss", {
    "ppo_clip": "repo_megatron.algorithm.ppo_clip:ppo_clip_loss",
})
ADVANTAGE_ESTIMATORS: Registry[Callable] = Registry(
    "advantage estimator", "algorithm.advantage_estimator", {
        "grpo": "repo_megatron.algorithm.advantages:grpo_advantages",
        "drgrpo": "repo_megatron.algorithm.advantages:drgrpo_advantages",
    })


def register_policy_loss(name: str) -> Callable[[F], F]:
    """Register a per-token policy loss under ``name``.

    Signature of the decorated function (all tensors ``[batch, seq]``)::

        fn(logprobs, old_logprobs, advantages, mask, params: LossParams)
            -> (token_loss, token_metrics: dict[str, Tensor])

    ``mask`` (bool) selects the tokens the loss applies to. ``token_loss`` must be 0 outside
    ``mask``, and so must each per-token metric (e.g. a 0/1 "was clipped" indicator);
    :func:`~repo_megatron.algorithm.loss.compute_policy_loss` aggregates them.
    """
    return POLICY_LOSSES.register(name)


def register_advantage_estimator(name: str) -> Callable[[F], F]:
    """Register a group advantage estimator under ``name``.

    Signature of the decorated function::

        fn(rewards [N], group_index [N] (int64 in 0..num_groups-1), num_groups, eps) -> [N]

    Groups are already validated (every group has >= 2 samples);
    :func:`~repo_megatron.algorithm.advantages.compute_advantages` does the reshaping and the
    on/off-policy split.
    """
    return ADVANTAGE_ESTIMATORS.register(name)


def get_policy_loss(name: str) -> Callable:
    """The policy loss registered as ``name`` (ConfigError naming the config key)."""
    return POLICY_LOSSES.get(name)


def get_advantage_estimator(name: str) -> Callable:
    """The advantage estimator registered as ``name`` (ConfigError naming the config key)."""
    return ADVANTAGE_ESTIMATORS.get(name)
